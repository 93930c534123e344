"""Numeric edges (issue 13, item 7): finite inputs give finite averages; NaN under "ignore" spreads.

1. float16 inputs of large magnitude through every codec decode to finite float16.
2. Gradients near float32's maximum on every rank average to a finite value (the sum must not
   overflow before the division by the world size), dense or compressed.
3. ``nonfinite="ignore"`` with Top-K: a NaN gradient on one rank completes the exchange and
   reaches every rank's gradient, as with stock DDP (it used to crash on a short payload).
"""

from __future__ import annotations

import pytest
import torch
from launch import init_process_group, run_distributed
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_compress.compressors import QSGD, CountSketch, NoCompression, TopK
from lightning_compress.compressors.topk import topk_indices
from lightning_compress.hooks import CompressionState, register_compression_hook

_F16_MAX = torch.finfo(torch.float16).max
_F32_MAX = torch.finfo(torch.float32).max


def _large_float16(n: int = 8192, seed: int = 0) -> torch.Tensor:
    """Magnitudes in [300, 60000] with random signs, as float16 (all finite)."""
    g = torch.Generator().manual_seed(seed)
    magnitude = torch.rand(n, generator=g) * 59700 + 300
    sign = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    return (magnitude * sign).to(torch.float16)


# -- 1. float16 inputs of large magnitude -------------------------------------------------------
@pytest.mark.parametrize("norm", ["max", "l2"])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_qsgd_float16_large_values_decode_finite_and_unbiased(norm, bits):
    x = _large_float16()
    codec = QSGD(bits=bits, norm=norm, bucket_size=512)
    gen = torch.Generator().manual_seed(1)
    trials = 32
    errors = []
    for _ in range(trials):
        y = codec.decompress(codec.compress(x, gen))
        assert y.dtype == torch.float16
        assert torch.isfinite(y).all(), f"QSGD(bits={bits}, norm={norm!r}) decoded Inf from finite float16"
        # signed towards |x|: a scale clamped below max-abs would shrink magnitudes, a bias < 0
        errors.append((y.double() - x.double()) * x.double().sign())
    e = torch.stack(errors)
    bias, standard_error = e.mean(), e.std() / e.numel() ** 0.5
    assert bias.abs() < 5 * standard_error + 1e-3 * x.double().abs().mean(), (bias, standard_error)


def test_qsgd_scales_capped_at_the_input_dtype_range():
    x = _large_float16()
    scales = QSGD(bits=2, norm="l2").compress(x).data["scales"]
    assert scales.max() <= _F16_MAX
    assert (scales >= x.float().abs().view(-1, 512).amax(dim=1)).all()  # still >= max-abs: unbiased


@pytest.mark.parametrize("bits", range(1, 9))
def test_qsgd_decodes_finite_at_float32_max(bits):
    # fl(scale / s) * s rounds past float32's maximum for s = 31 and 127 (6 and 8 bits)
    x = torch.full((1024,), _F32_MAX)
    x[::2] = -_F32_MAX
    for norm in ("max", "l2"):
        codec = QSGD(bits=bits, norm=norm)
        assert torch.isfinite(codec.decompress(codec.compress(x))).all(), (bits, norm)


def test_qsgd_bucket_with_nan_decodes_to_nan_not_zero():
    x = torch.randn(1024)
    x[7] = float("nan")
    y = QSGD(bits=4).decompress(QSGD(bits=4).compress(x))
    assert torch.isnan(y[:512]).all()  # the scale is shared: the NaN spreads over its bucket
    assert torch.isfinite(y[512:]).all()


@pytest.mark.parametrize("value_dtype", [torch.float32, torch.float16])
def test_topk_float16_large_values_round_trip(value_dtype):
    x = _large_float16()
    codec = TopK(ratio=0.05, value_dtype=value_dtype)
    y = codec.decompress(codec.compress(x))
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    kept = y != 0
    assert int(kept.sum()) == codec.k_for(x.numel())
    assert torch.equal(y[kept], x[kept])  # the kept values are exact


def test_count_sketch_float16_large_values_decode_finite():
    x = _large_float16()
    codec = CountSketch(ratio=0.05, cols=256)  # narrow table: many collisions, large sums
    y = codec.decompress(codec.compress(x))
    assert y.dtype == torch.float16 and torch.isfinite(y).all()


# -- NaN handling of the Top-K selection (the cause of item 3) -----------------------------------
@pytest.mark.parametrize("n", [1000, 200_000])
@pytest.mark.parametrize("nans", [1, 5, 50_000])
def test_topk_selection_counts_nan_as_largest(n, nans):
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    k = 100
    nans = min(nans, n)
    x[torch.randperm(n, generator=torch.Generator().manual_seed(1))[:nans]] = float("nan")
    positions = topk_indices(x, k)
    assert positions.numel() == k, "Top-K must always select exactly k positions"
    assert torch.equal(positions, positions.sort().values) and positions.unique().numel() == k
    chosen_nan = int(torch.isnan(x[positions]).sum())
    assert chosen_nan == min(k, nans), "NaN ranks above every number, as torch.topk orders it"
    if nans < k:  # the rest are the largest finite magnitudes
        finite = x.abs().nan_to_num(nan=-1.0)
        expected = torch.topk(finite, k - nans).values.min()
        assert (x[positions].abs().nan_to_num(nan=float("inf")) >= expected).all()


def test_topk_payload_has_full_size_with_nan():
    codec = TopK(ratio=0.01)
    for x in (torch.full((1000,), float("nan")), torch.tensor([float("nan")] * 3 + [1.0] * 997)):
        payload = codec.compress(x)
        assert payload.nbytes == codec.payload_nbytes(x.numel())
        assert torch.isnan(codec.decompress(payload)).any()


# -- 2. and 3. through the hook on real 2-rank gloo groups --------------------------------------
class _Big(nn.Module):
    """One large weight (compressed) and one small bias (dense); the loss sets their gradient."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(4096))
        self.bias = nn.Parameter(torch.zeros(16))

    def forward(self, scale):
        return (self.weight * scale[:4096]).sum() + (self.bias * scale[4096:]).sum()


def _codec(name):
    codecs = {"none": NoCompression(), "qsgd": QSGD(bits=4), "topk": TopK(ratio=0.05)}
    return QSGD(bits=2, norm="l2") if name == "qsgd_l2" else codecs[name]


def _exchange_once(rank, world_size, name, value, nonfinite, nan_rank, dtype=torch.float32):
    init_process_group(rank, world_size)
    model = DistributedDataParallel(_Big().to(dtype))
    state = CompressionState(_codec(name), min_compression_size=1024, nonfinite=nonfinite)
    register_compression_hook(model, state)
    scale = torch.full((4096 + 16,), value, dtype=dtype)
    if rank == nan_rank:
        scale[7] = float("nan")
    model(scale).backward()
    return {
        "weight": model.module.weight.grad.clone(),
        "bias": model.module.bias.grad.clone(),
        "skipped": state.last_step_skipped,
    }


@pytest.mark.parametrize("name", ["none", "qsgd", "topk"])
def test_gradients_near_float32_max_average_to_finite(name):
    value = 3e38  # 2 * 3e38 overflows float32: the sum must not be formed before dividing
    out = run_distributed(_exchange_once, 2, name, value, "skip", -1)
    for r in out:
        assert not r["skipped"]
        for grad in (r["weight"], r["bias"]):
            assert torch.isfinite(grad).all(), f"{name}: finite gradients averaged to NaN/Inf"
        assert torch.allclose(r["bias"], torch.full((16,), value), rtol=1e-6)
        sent = r["weight"] != 0  # Top-K sends 5%
        assert sent.sum() >= 0.05 * 4096
        assert torch.allclose(r["weight"][sent], torch.full((int(sent.sum()),), value), rtol=1e-6)
    assert torch.equal(out[0]["weight"], out[1]["weight"])


@pytest.mark.parametrize("name", ["none", "qsgd", "topk"])
def test_nan_with_nonfinite_ignore_spreads_like_stock_ddp(name):
    out = run_distributed(_exchange_once, 2, name, 1.0, "ignore", 1)
    for r in out:
        assert not r["skipped"]
        assert torch.isnan(r["weight"][7]), f"{name}: NaN must reach every rank's gradient, as in DDP"
        assert torch.isfinite(r["bias"]).all()
    assert torch.equal(out[0]["weight"].isnan(), out[1]["weight"].isnan())


def test_float16_gradients_with_l2_qsgd_stay_finite_in_the_bucket():
    # the exchange runs in float32; an L2-scaled level of 60000-valued buckets is about 1.4e6,
    # which the float16 bucket cannot hold: the write saturates at 65504 instead of giving Inf
    out = run_distributed(_exchange_once, 2, "qsgd_l2", 60000.0, "skip", -1, torch.float16)
    for r in out:
        assert r["weight"].dtype == torch.float16
        assert torch.isfinite(r["weight"]).all() and torch.isfinite(r["bias"]).all()
        assert (r["bias"] == 60000.0).all()
    assert torch.equal(out[0]["weight"], out[1]["weight"])
