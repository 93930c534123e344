"""QSGD's exact per-coordinate variance, shared by the CPU and the CUDA quantizer tests."""

import torch


def bucket_scale(x: torch.Tensor, bits: int, norm: str) -> float:
    return float(x.abs().max() if norm == "max" or bits == 1 else x.norm())


def exact_variance(x: torch.Tensor, bits: int, norm: str) -> torch.Tensor:
    """Per-coordinate variance of Q(x)_i: f(1-f) step^2 for B >= 2, M^2 - x_i^2 for 1 bit."""
    x = x.double()
    scale = bucket_scale(x, bits, norm)
    if bits == 1:
        return scale**2 - x**2
    s = 2 ** (bits - 1) - 1
    frac = torch.frac(x.abs() * s / scale)
    return frac * (1 - frac) * (scale / s) ** 2


def assert_unbiased(samples: torch.Tensor, x: torch.Tensor, bits: int, norm: str) -> None:
    """The mean of ``samples`` (draws of Q(x), one per row) is x within 5 standard deviations.

    Plus the documented bias bound (2**-15 of a step). The check has power: round-to-nearest
    (biased) would fail it for many coordinates.
    """
    draws = samples.shape[0]
    mean = samples.double().mean(0)
    std_of_mean = (exact_variance(x, bits, norm) / draws).sqrt()
    step = bucket_scale(x, bits, norm) / (1 if bits == 1 else 2 ** (bits - 1) - 1)
    tolerance = 5 * std_of_mean + 2**-14 * step + 1e-6
    assert ((mean - x.double()).abs() <= tolerance).all()
    if bits >= 2:
        nearest = torch.round(x.double() / step) * step
        assert ((nearest - x.double()).abs() > tolerance).sum() > 10
