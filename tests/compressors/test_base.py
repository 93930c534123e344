import pytest
import torch

from lightning_compress.compressors import (
    ALIASES,
    QSGD,
    Compressor,
    CountSketch,
    Field,
    NoCompression,
    Payload,
    TopK,
    resolve_compressor,
)
from lightning_compress.compressors.base import check_float_input, index_dtype, wire_order


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_no_compression_round_trip(dtype):
    x = torch.randn(3, 4, 5).to(dtype)
    codec = NoCompression()
    payload = codec.compress(x)
    assert payload.data["values"].dtype == torch.float32
    assert payload.nbytes == codec.payload_nbytes(60) == 240 == sum(f.nbytes for f in codec.layout(60))
    y = codec.decompress(payload)
    assert y.shape == x.shape and y.dtype == dtype and torch.equal(y, x)
    assert (NoCompression.name, NoCompression.exchange, NoCompression.unbiased) == ("none", "allreduce", True)


def test_field_and_wire_order():
    fields = [
        Field("codes", torch.uint8, 5),
        Field("indices", torch.int16, 3),
        Field("scales", torch.float32, 2),
    ]
    assert [f.nbytes for f in fields] == [5, 6, 8]
    assert [f.name for f in wire_order(fields)] == ["scales", "indices", "codes"]


def test_payload_bytes_round_trip_with_mixed_fields():
    data = {
        "codes": torch.arange(7, dtype=torch.uint8),
        "values": torch.tensor([1.5, -2.0, 3.25], dtype=torch.float16),
        "scales": torch.tensor([0.1, 7.0], dtype=torch.float32),
        "indices": torch.tensor([1, 40000, 7], dtype=torch.int32),
    }
    payload = Payload(data, torch.Size([2, 3]), torch.bfloat16, {"bits": 3})
    buf = payload.to_bytes()
    assert buf.dtype == torch.uint8 and buf.numel() == payload.nbytes == 7 + 6 + 8 + 12
    back = Payload.from_bytes(buf, payload.fields(), payload.shape, payload.dtype, payload.meta)
    assert list(back.data) == list(data)  # the codec's own field order
    assert all(torch.equal(back.data[k], data[k]) and back.data[k].dtype == data[k].dtype for k in data)
    assert (back.shape, back.dtype, back.meta, back.numel) == (payload.shape, payload.dtype, {"bits": 3}, 6)
    # Received in the middle of a larger buffer, at an offset no field is aligned to.
    shifted = torch.cat([torch.zeros(3, dtype=torch.uint8), buf])[3:]
    again = Payload.from_bytes(shifted, payload.fields(), payload.shape, payload.dtype, payload.meta)
    assert all(torch.equal(again.data[k], data[k]) for k in data)


def test_payload_from_bytes_errors():
    fields = [Field("values", torch.float32, 2)]
    with pytest.raises(ValueError, match="needs 8"):
        Payload.from_bytes(torch.zeros(7, dtype=torch.uint8), fields, torch.Size([2]), torch.float32, {})
    with pytest.raises(ValueError, match="1-D uint8"):
        Payload.from_bytes(torch.zeros(8, dtype=torch.int8), fields, torch.Size([2]), torch.float32, {})


@pytest.mark.parametrize(
    "codec", [NoCompression(), QSGD(bits=3), TopK(ratio=0.1), CountSketch(k=4)], ids=lambda c: c.name
)
def test_every_codec_survives_the_wire(codec):
    x = torch.randn(17, 33)
    payload = codec.compress(x, generator=torch.Generator().manual_seed(0))
    assert payload.nbytes == codec.payload_nbytes(x.numel()) == sum(f.nbytes for f in codec.layout(x.numel()))
    received = codec.from_bytes(payload.to_bytes(), x.shape, x.dtype)
    assert torch.equal(codec.decompress(received), codec.decompress(payload))


def test_index_dtype():
    assert index_dtype(1) == torch.int16
    assert index_dtype(2**15) == torch.int16
    assert index_dtype(2**15 + 1) == torch.int32
    assert index_dtype(2**31) == torch.int32
    assert index_dtype(2**31 + 1) == torch.int64


def test_check_float_input():
    check_float_input(torch.zeros(2, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="grad must be a floating-point tensor"):
        check_float_input(torch.zeros(2, dtype=torch.int32), "grad")
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        check_float_input([1.0])


@pytest.mark.parametrize(
    "alias, cls", [("qsgd", QSGD), ("topk", TopK), ("sketch", CountSketch), ("none", NoCompression)]
)
def test_resolve_aliases(alias, cls):
    codec = resolve_compressor(alias)
    assert type(codec) is cls and codec.name == alias
    assert type(resolve_compressor(f"  {alias.upper()} ")) is cls
    assert ALIASES[alias] is cls


def test_resolve_passes_instances_through_and_rejects_the_rest():
    codec = QSGD(bits=2)
    assert resolve_compressor(codec) is codec
    with pytest.raises(ValueError, match=r"compressor='powersgd' is not a known compressor; use one of \["):
        resolve_compressor("powersgd")
    with pytest.raises(TypeError, match="grad_codec must be a Compressor instance"):
        resolve_compressor(4, param="grad_codec")
    assert all(issubclass(cls, Compressor) and cls.name == alias for alias, cls in ALIASES.items())


@pytest.mark.parametrize(
    "codec",
    [NoCompression(), QSGD(bits=1), QSGD(bits=5, norm="l2"), QSGD(bits=8), TopK(k=9), CountSketch(k=3)],
    ids=repr,
)
def test_no_host_tensors_in_the_hot_path(codec):
    # The "meta" device refuses to mix with CPU tensors, as CUDA does: a codec that runs here
    # creates every tensor on the input's device (the CI has no GPU).
    x = torch.empty(3000, device="meta")
    payload = codec.compress(x)
    assert all(t.device.type == "meta" for t in payload.data.values())
    assert payload.nbytes == codec.payload_nbytes(3000)
    y = codec.decompress(payload)
    assert y.device.type == "meta" and y.shape == x.shape and y.dtype == x.dtype
