import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from qsgd_stats import assert_unbiased, exact_variance

from lightning_compress.compressors import QSGD
from lightning_compress.compressors.base import Compressor

# One compress call gives many independent draws: x tiled DRAWS times with bucket_size = len(x),
# so that every copy is its own bucket with the same scale.
DRAWS = 4000


def draws(codec: QSGD, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    codec.bucket_size = x.numel()
    tiled = x.repeat(DRAWS)
    out = codec.decompress(codec.compress(tiled, generator=torch.Generator().manual_seed(seed)))
    return out.view(DRAWS, x.numel())


def test_class_attributes():
    assert issubclass(QSGD, Compressor)
    assert (QSGD.name, QSGD.exchange, QSGD.unbiased) == ("qsgd", "two_phase", True)
    codec = QSGD()
    assert (codec.bits, codec.bucket_size, codec.norm) == (8, 512, "max")
    assert codec.meta() == {"bits": 8, "bucket_size": 512, "norm": "max"}
    assert repr(codec) == "QSGD(bits=8, bucket_size=512, norm='max')"


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("numel", [0, 1, 7, 8, 513, 1024, 5000])
def test_payload_size_is_exact(bits, numel):
    codec = QSGD(bits=bits, bucket_size=512)
    payload = codec.compress(torch.randn(numel))
    expected = 4 * math.ceil(numel / 512) + math.ceil(numel / 8) * bits
    assert payload.nbytes == codec.payload_nbytes(numel) == expected
    assert sum(f.nbytes for f in codec.layout(numel)) == expected
    assert payload.fields() == codec.layout(numel)


@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(1, 8),
    bucket_size=st.integers(1, 70),
    numel=st.integers(0, 300),
    norm=st.sampled_from(["max", "l2"]),
    seed=st.integers(0, 2**31),
)
def test_decoded_values_lie_on_the_grid(bits, bucket_size, numel, norm, seed):
    x = torch.randn(numel, generator=torch.Generator().manual_seed(seed)) * 10
    codec = QSGD(bits=bits, bucket_size=bucket_size, norm=norm)
    payload = codec.compress(x, generator=torch.Generator().manual_seed(seed))
    y = codec.decompress(payload)
    assert payload.nbytes == codec.payload_nbytes(numel)
    assert torch.isfinite(y).all()
    scales = payload.data["scales"].repeat_interleave(bucket_size)[:numel]
    levels = 1 if bits == 1 else 2 ** (bits - 1) - 1
    assert (y.abs() <= scales * (1 + 1e-6)).all()
    if bits == 1:
        assert torch.allclose(y.abs(), scales)
    else:
        units = y / torch.where(scales > 0, scales, 1) * levels
        assert torch.allclose(units, units.round(), atol=1e-4)
        # Stochastic rounding moves each value to one of its two neighbouring levels only.
        exact = x / torch.where(scales > 0, scales, 1) * levels
        assert ((units - exact).abs() <= 1 + 1e-4).all()


@pytest.mark.parametrize("norm", ["max", "l2"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_unbiased(bits, norm):
    x = torch.randn(128, generator=torch.Generator().manual_seed(bits))
    samples = draws(QSGD(bits=bits, norm=norm), x)
    assert_unbiased(samples, x, bits, norm)


@pytest.mark.parametrize("norm", ["max", "l2"])
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_variance_matches_theory_and_the_qsgd_bound(bits, norm):
    x = torch.randn(256, generator=torch.Generator().manual_seed(bits)) * 3
    samples = draws(QSGD(bits=bits, norm=norm), x, seed=1)
    mse = (samples.double() - x.double()).pow(2).sum(1)  # ||Q(x) - x||^2 per draw
    expected = exact_variance(x, bits, norm).sum()
    assert abs(mse.mean() - expected) <= 5 * mse.std() / math.sqrt(DRAWS) + 1e-9
    s = 2 ** (bits - 1) - 1
    n = x.numel()
    bound = min(n / s**2, math.sqrt(n) / s) * x.double().pow(2).sum()  # arXiv 1610.02132, Lemma 3.1
    assert mse.mean() <= bound


def test_one_bit_variance():
    x = torch.randn(256, generator=torch.Generator().manual_seed(0))
    samples = draws(QSGD(bits=1), x)
    mse = (samples.double() - x.double()).pow(2).sum(1)
    n, m2, sq = x.numel(), x.abs().max().double() ** 2, x.double().pow(2).sum()
    assert abs(mse.mean() - (n * m2 - sq)) <= 5 * mse.std() / math.sqrt(DRAWS)
    assert mse.mean() <= (n - 1) * sq  # since M^2 <= ||x||^2
    assert set(samples.abs().unique().tolist()) == {x.abs().max().item()}


def test_max_norm_has_lower_variance_than_l2():
    x = torch.randn(512, generator=torch.Generator().manual_seed(0))
    for bits in (2, 4):
        assert exact_variance(x, bits, "max").sum() < exact_variance(x, bits, "l2").sum()


def test_scales():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    buckets = list(x.split(300))
    max_scales = QSGD(bucket_size=300).compress(x).data["scales"]
    l2_scales = QSGD(bucket_size=300, norm="l2").compress(x).data["scales"]
    assert torch.equal(max_scales, torch.stack([b.abs().max() for b in buckets]))
    assert torch.allclose(l2_scales, torch.stack([b.norm() for b in buckets]), rtol=1e-5)
    # One bit always uses max-abs, whatever the norm.
    assert torch.equal(QSGD(bits=1, bucket_size=300, norm="l2").compress(x).data["scales"], max_scales)


@pytest.mark.parametrize("bits", [1, 4, 8])
def test_seeded_generator_reproduces_exactly(bits):
    x = torch.randn(3000)
    codec = QSGD(bits=bits, bucket_size=100)
    a = codec.compress(x, generator=torch.Generator().manual_seed(7))
    b = codec.compress(x, generator=torch.Generator().manual_seed(7))
    c = codec.compress(x, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(a.data[k], b.data[k]) for k in a.data)
    assert not torch.equal(a.data["codes"], c.data["codes"])
    torch.manual_seed(3)
    d = codec.compress(x)
    torch.manual_seed(3)
    assert torch.equal(d.data["codes"], codec.compress(x).data["codes"])


@pytest.mark.parametrize("norm", ["max", "l2"])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_zero_tiny_and_huge_values(bits, norm):
    codec = QSGD(bits=bits, bucket_size=16, norm=norm)
    zeros = torch.zeros(100)
    y = codec.decompress(codec.compress(zeros))
    assert torch.equal(y, zeros)
    signs = torch.ones(64)
    signs[::3] = -1
    # Values that are exactly +-scale are quantized exactly under max-abs scaling.
    for magnitude in (1e-30, 1e-20, 1.0, 1e20, 1e30):
        x = signs * magnitude
        y = codec.decompress(codec.compress(x))
        assert torch.isfinite(y).all()
        if norm == "max" or bits == 1:
            assert torch.allclose(y, x, rtol=1e-6, atol=0)
    # Denormals, the largest floats, and mixtures: finite, and within one bucket scale of x.
    for x in (signs * 1e-40, signs * 3e38, torch.cat([signs * 1e-40, signs * 1e30, torch.zeros(16)])):
        y = codec.decompress(codec.compress(x))
        assert torch.isfinite(y).all()
        assert not torch.isnan(y).any()
    mixed = torch.zeros(64)
    mixed[5] = 2.0
    y = codec.decompress(codec.compress(mixed))
    assert torch.equal(y[16:], torch.zeros(48))


def test_denormal_buckets_stay_unbiased():
    x = torch.full((64,), 1e-40)
    samples = draws(QSGD(bits=4), x)
    assert torch.isfinite(samples).all()
    # The scale floor (2**-120) makes these buckets coarse but keeps them unbiased.
    step = 2.0**-120 / 7
    value = x.double().mean().item()
    # Each draw is 0 or one step, so its variance is below value * step.
    assert abs(samples.double().mean().item() - value) < 5 * math.sqrt(value * step / samples.numel())
    assert samples.unique().tolist() == [0.0, pytest.approx(step, rel=1e-6)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(), (5,), (3, 0), (4, 5, 6)])
def test_dtype_and_shape_round_trip(dtype, shape):
    x = torch.randn(shape).to(dtype)
    codec = QSGD(bits=8, bucket_size=7)
    y = codec.decompress(codec.compress(x))
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    if x.numel():
        assert torch.allclose(y.float(), x.float(), atol=float(x.float().abs().max()) / 127 + 1e-2)


def test_non_contiguous_input():
    x = torch.randn(30, 40).t()
    codec = QSGD(bits=8)
    y = codec.decompress(codec.compress(x, generator=torch.Generator().manual_seed(0)))
    z = codec.decompress(codec.compress(x.contiguous(), generator=torch.Generator().manual_seed(0)))
    assert torch.equal(y, z)


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_from_bytes_round_trip(bits):
    x = torch.randn(1001).to(torch.bfloat16)
    codec = QSGD(bits=bits, bucket_size=64)
    payload = codec.compress(x)
    buf = payload.to_bytes()
    assert buf.numel() == payload.nbytes
    received = codec.from_bytes(buf, x.shape, x.dtype)
    assert received.meta == payload.meta
    assert all(torch.equal(received.data[k], payload.data[k]) for k in payload.data)
    assert torch.equal(codec.decompress(received), codec.decompress(payload))


def test_bits_is_mutable_and_payloads_keep_their_own():
    x = torch.randn(999)
    codec = QSGD(bits=4, bucket_size=100)
    payload = codec.compress(x)
    before = codec.decompress(payload)
    codec.bits = 8
    assert codec.bits == 8 and codec.meta()["bits"] == 8
    assert codec.payload_nbytes(999) == 4 * 10 + 125 * 8
    assert payload.meta["bits"] == 4
    assert torch.equal(codec.decompress(payload), before)
    assert codec.compress(x).nbytes == codec.payload_nbytes(999)


@pytest.mark.parametrize("bits", [0, 9, -3, 2.5, True, "4", None])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match=r"bits must be an integer in 1\.\.8"):
        QSGD(bits=bits)
    codec = QSGD()
    with pytest.raises(ValueError, match="bits"):
        codec.bits = bits
    assert codec.bits == 8


def test_bad_arguments():
    with pytest.raises(ValueError, match="bits must be an integer in 1..8, got 9"):
        QSGD(bits=9)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="bucket_size must be an integer >= 1"):
            QSGD(bucket_size=bad)
    with pytest.raises(ValueError, match="norm must be one of"):
        QSGD(norm="l1")
    with pytest.raises(TypeError, match="floating-point"):
        QSGD().compress(torch.arange(10))
    with pytest.raises(TypeError, match="torch.Tensor"):
        QSGD().compress([1.0, 2.0])
