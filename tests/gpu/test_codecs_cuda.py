"""The codecs on a CUDA device: what they send must not depend on where they ran.

Ranks of one job may encode on different devices (a CPU-only evaluation rank, a GPU trainer), and
a payload is decoded by whoever receives it, so the deterministic codecs (NoCompression, TopK,
CountSketch, the bit packing under QSGD) must produce the same bytes on CUDA as on CPU. QSGD draws
its rounding noise from a generator on the tensor's device: CUDA streams differ from CPU ones, so
its codes are compared through their law instead (unbiased, as on CPU in
``tests/compressors/test_quantize.py``). Every payload tensor must stay on the GPU: a hidden
host copy would cost a sync per tensor per step.

Every test is skipped without a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from qsgd_stats import assert_unbiased, exact_variance

from lightning_compress.compressors import QSGD, CountSketch, NoCompression, Payload, TopK
from lightning_compress.compressors.pack import pack_bits, unpack_bits

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.cuda,
]

DEVICE = torch.device("cuda")
#: Independent QSGD draws per unbiasedness test, as in tests/compressors/test_quantize.py.
DRAWS = 4000


def cpu_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_on_device(payload: Payload) -> None:
    for name, tensor in payload.data.items():
        assert tensor.device.type == DEVICE.type, f"payload field {name!r} left the device: {tensor.device}"


def assert_same_bytes(on_device: Payload, on_cpu: Payload) -> None:
    assert on_device.meta == on_cpu.meta
    assert on_device.fields() == on_cpu.fields()
    wire = on_device.to_bytes()
    assert wire.device.type == DEVICE.type
    assert torch.equal(wire.cpu(), on_cpu.to_bytes())


def distinct_magnitudes(numel: int, seed: int) -> torch.Tensor:
    """Integers ``+-1 .. +-numel``, each magnitude once: a top-k with no ties, so one right answer."""
    generator = cpu_generator(seed)
    signs = torch.randint(0, 2, (numel,), generator=generator) * 2 - 1
    return ((torch.randperm(numel, generator=generator) + 1) * signs).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_no_compression_sends_the_same_bytes(dtype):
    x = torch.randn(3, 1001, generator=cpu_generator(0)).to(dtype)
    codec = NoCompression()
    payload = codec.compress(x.to(DEVICE))
    assert_on_device(payload)
    assert_same_bytes(payload, codec.compress(x))
    y = codec.decompress(codec.from_bytes(payload.to_bytes(), x.shape, x.dtype))
    assert y.device.type == DEVICE.type and y.dtype == dtype and torch.equal(y.cpu(), x)


# 1000 elements: int16 indices and an exact selection on CPU; 300_000: int32 indices and the
# sampled threshold on CPU, torch.topk on CUDA. Both must pick the same k coordinates.
@pytest.mark.parametrize("numel", [1000, 300_000])
@pytest.mark.parametrize("value_dtype", [torch.float32, torch.float16])
def test_topk_sends_the_same_bytes(numel, value_dtype):
    x = distinct_magnitudes(numel, seed=numel)  # float16 clamps the largest, identically on both
    codec = TopK(ratio=0.01, value_dtype=value_dtype)
    payload = codec.compress(x.to(DEVICE))
    assert_on_device(payload)
    assert_same_bytes(payload, codec.compress(x))
    received = codec.from_bytes(payload.to_bytes(), x.shape, x.dtype)
    assert_on_device(received)
    assert torch.equal(codec.decompress(received).cpu(), codec.decompress(codec.compress(x)))
    torch.cuda.synchronize()  # surfaces a device-side assert, had from_bytes raised one


def test_topk_per_layer_sends_the_same_bytes():
    x = distinct_magnitudes(6100, seed=1)
    codec = TopK(ratio=0.01, per_layer=True)
    codec.segments = (100, 1000, 5000)
    assert_same_bytes(codec.compress(x.to(DEVICE)), codec.compress(x))


def test_topk_from_bytes_does_not_synchronize():
    # The index check runs as a device-side assert: no host sync per received payload.
    x = distinct_magnitudes(50_000, seed=2).to(DEVICE)
    codec = TopK(ratio=0.01)
    wire = codec.compress(x).to_bytes()
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        received = codec.from_bytes(wire, x.shape, x.dtype)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert_on_device(received)
    torch.cuda.synchronize()


# 2**23 + 12345 elements: two hash chunks on the GPU against one table on CPU.
@pytest.mark.parametrize("numel", [1, 1000, 300_000, 2**23 + 12345])
@pytest.mark.parametrize("rows", [1, 5])
def test_count_sketch_sends_the_same_bytes(numel, rows):
    # Values in {-1, 0, 1}: every column sum is an integer below 2**24, exact in float32 in any
    # order, so CUDA's atomic additions must give exactly the CPU's table when the hashes agree.
    x = torch.randint(-1, 2, (numel,), generator=cpu_generator(numel)).float()
    codec = CountSketch(rows=rows, ratio=0.01, seed=7)
    payload = codec.compress(x.to(DEVICE))
    assert_on_device(payload)
    expected = codec.compress(x)
    assert_same_bytes(payload, expected)
    # Estimates are medians of table entries: exact too.
    table = payload.data["table"]
    assert torch.equal(codec.estimate(table, numel).cpu(), codec.estimate(expected.data["table"], numel))


def test_count_sketch_recovers_heavy_hitters_on_the_device():
    generator = cpu_generator(0)
    numel, heavy = 100_000, 10
    x = torch.randn(numel, generator=generator) * 0.01
    positions = torch.randperm(numel, generator=generator)[:heavy]
    x[positions] = 5.0 + torch.rand(heavy, generator=generator)
    codec = CountSketch(k=heavy)
    table = codec.sketch(x.to(DEVICE))
    candidates = codec.candidates(table, numel)
    assert candidates.device.type == DEVICE.type
    assert torch.isin(positions, candidates.cpu()).all()
    y = codec.decompress(codec.compress(x.to(DEVICE), generator=None))
    assert y.device.type == DEVICE.type
    assert set(y.cpu().nonzero().squeeze(1).tolist()) <= set(candidates.cpu().tolist())


def test_count_sketch_keeps_nothing_on_the_device():
    numel = 2**23 + 5
    x = torch.randn(numel, generator=cpu_generator(3)).to(DEVICE)
    codec = CountSketch(rows=5, ratio=0.01)
    # a first call on another size: whatever CUDA itself sets up lazily is in the baseline, and a
    # cache keyed by size would still show below
    codec.estimate(codec.sketch(x[:1000]), 1000)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(DEVICE)
    estimates = codec.estimate(codec.sketch(x), numel)
    assert estimates.shape == (numel,) and estimates.device.type == DEVICE.type
    del estimates
    torch.cuda.synchronize()
    # no hash table (20 bytes per coordinate before) outlives the call
    assert torch.cuda.memory_allocated(DEVICE) == before


def test_count_sketch_refuses_tensors_beyond_the_hash_range():
    codec = CountSketch(rows=2, cols=4)
    with pytest.raises(ValueError, match=r"2\*\*31 - 1"):
        codec.estimate(torch.zeros(8, device=DEVICE), 2**31)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [0, 1, 7, 8, 1001, 2**20 + 3])
def test_bit_packing_gives_the_same_bytes(bits, count):
    codes = torch.randint(0, 2**bits, (count,), generator=cpu_generator(bits), dtype=torch.uint8)
    packed = pack_bits(codes.to(DEVICE), bits)
    assert packed.device.type == DEVICE.type
    assert torch.equal(packed.cpu(), pack_bits(codes, bits))
    unpacked = unpack_bits(packed, bits, count)
    assert unpacked.device.type == DEVICE.type and torch.equal(unpacked.cpu(), codes)


@pytest.mark.parametrize("norm", ["max", "l2"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_qsgd_stays_on_the_device_and_decodes_as_on_cpu(bits, norm):
    x = torch.randn(10_007, generator=cpu_generator(bits)) * 3
    codec = QSGD(bits=bits, bucket_size=512, norm=norm)
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    payload = codec.compress(x.to(DEVICE), generator=generator)
    assert_on_device(payload)
    assert payload.nbytes == codec.payload_nbytes(x.numel())
    assert payload.fields() == codec.layout(x.numel())
    # Scales are data, not noise: max-abs is exact everywhere, an L2 norm agrees to rounding.
    scales = codec.compress(x).data["scales"]
    if norm == "max" or bits == 1:
        assert torch.equal(payload.data["scales"].cpu(), scales)
    else:
        torch.testing.assert_close(payload.data["scales"].cpu(), scales)
    # The same received bytes decode to the same values on either device.
    wire = payload.to_bytes()
    on_device = codec.decompress(codec.from_bytes(wire, x.shape, x.dtype))
    on_cpu = codec.decompress(codec.from_bytes(wire.cpu(), x.shape, x.dtype))
    assert on_device.device.type == DEVICE.type
    torch.testing.assert_close(on_device.cpu(), on_cpu)


@pytest.mark.parametrize("bits", [1, 4, 8])
def test_qsgd_cuda_generator_reproduces_exactly(bits):
    x = torch.randn(3000, generator=cpu_generator(0)).to(DEVICE)
    codec = QSGD(bits=bits, bucket_size=100)
    a = codec.compress(x, generator=torch.Generator(device=DEVICE).manual_seed(7))
    b = codec.compress(x, generator=torch.Generator(device=DEVICE).manual_seed(7))
    c = codec.compress(x, generator=torch.Generator(device=DEVICE).manual_seed(8))
    assert all(torch.equal(a.data[k], b.data[k]) for k in a.data)
    assert not torch.equal(a.data["codes"], c.data["codes"])


@pytest.mark.parametrize("norm", ["max", "l2"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_qsgd_is_unbiased_with_a_cuda_generator(bits, norm):
    # As on CPU: x tiled DRAWS times, one bucket per copy, so one call gives DRAWS independent draws.
    x = torch.randn(128, generator=cpu_generator(bits))
    codec = QSGD(bits=bits, bucket_size=x.numel(), norm=norm)
    generator = torch.Generator(device=DEVICE).manual_seed(bits)
    payload = codec.compress(x.repeat(DRAWS).to(DEVICE), generator=generator)
    assert_on_device(payload)
    samples = codec.decompress(payload).view(DRAWS, x.numel()).cpu()
    assert_unbiased(samples, x, bits, norm)
    # and the variance is the theoretical one, as on CPU
    mse = (samples.double() - x.double()).pow(2).sum(1)
    assert abs(mse.mean() - exact_variance(x, bits, norm).sum()) <= 5 * mse.std() / math.sqrt(DRAWS) + 1e-9
