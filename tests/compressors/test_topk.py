import math
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_compress.compressors import TopK
from lightning_compress.compressors import topk as topk_module
from lightning_compress.compressors.topk import segment_ks, topk_indices


def assert_is_topk(x: torch.Tensor, positions: torch.Tensor, k: int) -> None:
    flat = x.reshape(-1).float()
    assert positions.numel() == k
    assert positions.unique().numel() == k  # no position twice
    kept = flat[positions.long()].abs().sort().values
    assert torch.equal(kept, torch.topk(flat.abs(), k).values.sort().values)


def test_class_attributes():
    assert (TopK.name, TopK.exchange, TopK.unbiased) == ("topk", "allgather", False)
    codec = TopK()
    assert (codec.k, codec.ratio, codec.value_dtype) == (None, 0.01, torch.float32)
    assert repr(codec) == "TopK(k=None, ratio=0.01, value_dtype=torch.float32, per_layer=False)"


@settings(max_examples=60, deadline=None)
@given(
    numel=st.integers(1, 3000),
    k=st.integers(1, 3000),
    levels=st.sampled_from([3, 50, 0]),
    seed=st.integers(0, 2**31),
)
def test_keeps_exactly_the_k_largest(numel, k, levels, seed):
    generator = torch.Generator().manual_seed(seed)
    # Few distinct levels make many ties; levels=0 means continuous values.
    x = (
        torch.randint(-levels, levels + 1, (numel,), generator=generator).float()
        if levels
        else (torch.randn(numel, generator=generator))
    )
    codec = TopK(k=k)
    payload = codec.compress(x)
    kk = min(k, numel)
    assert payload.meta["k"] == kk
    assert_is_topk(x, payload.data["indices"], kk)
    y = codec.decompress(payload)
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[payload.data["indices"].long()] = True
    assert torch.equal(y, torch.where(mask, x, torch.zeros(())))


@pytest.mark.parametrize("k", [1, 7, 500, 43_500, 150_000, 299_999, 300_000])
def test_large_tensors_sampled_threshold(k):
    x = torch.randn(300_000, generator=torch.Generator().manual_seed(k))
    positions = topk_indices(x, k)
    assert_is_topk(x, positions, k)
    assert (positions[1:] > positions[:-1]).all()  # sorted, distinct


def test_misleading_sample_falls_back_to_an_exact_selection():
    n, k = 200_000, 100_000
    x = torch.randn(n, generator=torch.Generator().manual_seed(0)) * 0.01
    # The sampled coordinates are the largest ones: the threshold from the sample keeps only them,
    # fewer than k, and the selection must fall back to the whole tensor.
    x[topk_module._sample_positions(n, x.device)] = 100.0
    x[:10] = 1000.0
    assert_is_topk(x, topk_indices(x, k), k)


def test_selection_beyond_the_kthvalue_size(monkeypatch):
    monkeypatch.setattr(topk_module, "_KTHVALUE_MAX", 1000)
    x = torch.randint(-20, 21, (100_000,), generator=torch.Generator().manual_seed(0)).float()
    for k in (3, 5000, 60_000):
        positions = topk_indices(x, k)
        assert_is_topk(x, positions, k)
        assert (positions[1:] > positions[:-1]).all()


def test_ties_go_to_the_lowest_index():
    x = torch.ones(100_000)
    assert torch.equal(topk_indices(x, 10), torch.arange(10))
    y = torch.zeros(1000)
    y[500] = -3.0
    assert torch.equal(topk_indices(y, 3), torch.tensor([0, 1, 500]))


def test_index_dtype_follows_the_size():
    assert TopK(k=3).compress(torch.randn(2**15)).data["indices"].dtype == torch.int16
    assert TopK(k=3).compress(torch.randn(2**15 + 1)).data["indices"].dtype == torch.int32


def test_k_for():
    codec = TopK(ratio=0.07)
    assert codec.k_for(100) == 7  # 0.07 * 100 == 7.000000000000001 in floating point
    assert codec.k_for(1) == 1 and codec.k_for(0) == 0
    assert TopK().k_for(1000) == 10
    assert TopK(ratio=0.001).k_for(10) == 1
    assert TopK(k=50).k_for(20) == 20
    assert TopK(ratio=1.0).k_for(33) == 33


@pytest.mark.parametrize("value_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("numel", [1, 100, 40_000])
def test_payload_size_is_exact(value_dtype, numel):
    codec = TopK(ratio=0.05, value_dtype=value_dtype)
    payload = codec.compress(torch.randn(numel))
    k = max(1, math.ceil(0.05 * numel))
    index_bytes = 2 if numel <= 2**15 else 4
    assert payload.nbytes == codec.payload_nbytes(numel) == k * (value_dtype.itemsize + index_bytes)
    assert payload.fields() == codec.layout(numel)


def test_float16_values_are_clamped():
    x = torch.tensor([1e6, -1e6, 1.0, 0.5])
    payload = TopK(k=3, value_dtype=torch.float16).compress(x)
    assert payload.data["values"].dtype == torch.float16
    assert torch.isfinite(payload.data["values"]).all()
    assert payload.data["values"].tolist() == [65504.0, -65504.0, 1.0]


def test_k_and_ratio_are_mutable():
    codec = TopK(ratio=0.1)
    codec.k = 5
    assert (codec.k, codec.ratio, codec.k_for(1000)) == (5, None, 5)
    assert codec.compress(torch.randn(1000)).data["values"].numel() == 5
    codec.ratio = 0.5
    assert (codec.k, codec.ratio, codec.k_for(10)) == (None, 0.5, 5)


def test_scatter_add_into_sums_payloads():
    codec = TopK(k=20)
    a, b = torch.randn(3, 50), torch.randn(3, 50)
    pa, pb = codec.compress(a), codec.compress(b)
    out = torch.zeros(150)
    codec.scatter_add_into(out, pa)
    codec.scatter_add_into(out, pb)
    assert torch.allclose(out.view(3, 50), codec.decompress(pa) + codec.decompress(pb))
    with pytest.raises(ValueError, match="1-D float32 tensor of 150"):
        codec.scatter_add_into(torch.zeros(149), pa)
    with pytest.raises(ValueError, match="out_flat"):
        codec.scatter_add_into(torch.zeros(150, dtype=torch.float64), pa)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_dtype_and_shape_round_trip(dtype):
    x = torch.randn(4, 5, 6).to(dtype)
    codec = TopK(k=10)
    y = codec.decompress(codec.compress(x))
    assert y.shape == x.shape and y.dtype == dtype
    kept = y != 0
    assert kept.sum() == 10 and torch.equal(y[kept], x[kept])
    empty = codec.decompress(codec.compress(torch.zeros(0, 3, dtype=dtype)))
    assert empty.shape == (0, 3) and empty.dtype == dtype


@pytest.mark.parametrize("value_dtype", [torch.float32, torch.float16])
def test_from_bytes_round_trip(value_dtype):
    codec = TopK(ratio=0.1, value_dtype=value_dtype)
    x = torch.randn(7, 301)
    payload = codec.compress(x)
    received = codec.from_bytes(payload.to_bytes(), x.shape, x.dtype)
    assert received.meta == payload.meta
    assert all(torch.equal(received.data[k], payload.data[k]) for k in payload.data)
    assert torch.equal(codec.decompress(received), codec.decompress(payload))


def test_bad_arguments():
    with pytest.raises(ValueError, match="exactly one of k or ratio"):
        TopK(k=5, ratio=0.1)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="k must be an integer >= 1"):
            TopK(k=bad)
    for bad in (0.0, -0.1, 1.5, True, "0.1"):
        with pytest.raises(ValueError, match=r"ratio must be a float in \(0, 1\]"):
            TopK(ratio=bad)
    with pytest.raises(ValueError, match="value_dtype"):
        TopK(value_dtype=torch.bfloat16)
    codec = TopK()
    with pytest.raises(ValueError, match="k must be"):
        codec.k = 0
    assert codec.ratio == 0.01


def test_pickles():
    codec = TopK(k=3, value_dtype=torch.float16)
    clone = pickle.loads(pickle.dumps(codec))
    assert clone.meta() == codec.meta()


def test_per_layer_keeps_each_layers_share():
    codec = TopK(ratio=0.01, per_layer=True)
    codec.segments = (100, 1000, 5000)
    x = torch.randn(6100, generator=torch.Generator().manual_seed(0))
    x[100:1100] *= 1e-3  # a layer of small gradients: a global threshold would never pick it
    payload = codec.compress(x)
    positions = payload.data["indices"].to(torch.int64)
    for (lo, hi), k in zip([(0, 100), (100, 1100), (1100, 6100)], [1, 10, 50], strict=True):
        inside = positions[(positions >= lo) & (positions < hi)] - lo
        assert_is_topk(x[lo:hi], inside, k)
    assert TopK(ratio=0.01).compress(x).data["indices"].to(torch.int64).lt(1100).sum() < 11


@pytest.mark.parametrize("value_dtype", [torch.float32, torch.float16])
def test_per_layer_payload_size_is_exact(value_dtype):
    codec = TopK(ratio=0.01, per_layer=True, value_dtype=value_dtype)
    codec.segments = (5, 150, 40_000)
    n = 40_155
    k = 1 + 2 + 400  # ceil(1% of each layer), at least 1
    payload = codec.compress(torch.randn(n))
    assert payload.nbytes == codec.payload_nbytes(n) == k * (value_dtype.itemsize + 4)
    assert payload.fields() == codec.layout(n) and codec.k_for(n) == k
    assert codec.decompress(codec.from_bytes(payload.to_bytes(), (n,), torch.float32)).count_nonzero() <= k
    # a tensor whose size does not match the segments is one layer
    assert codec.k_for(1000) == 10 and codec.compress(torch.randn(1000)).data["values"].numel() == 10
    codec.segments = None
    assert codec.k_for(n) == TopK(ratio=0.01).k_for(n) == 402


def test_segment_ks_with_an_absolute_k():
    assert segment_ks((100, 1000, 5000), None, 0.01) == [1, 10, 50]
    assert segment_ks((100, 1000, 5000), 61, None) == [1, 10, 50]
    assert segment_ks((3, 3, 3), 4, None) == [2, 1, 1]  # largest remainder, ties to the first
    assert segment_ks((1, 1, 10), 3, None) == [1, 1, 1]  # at least one each, k in total
    assert segment_ks((5, 5, 5, 5), 2, None) == [1, 1, 1, 1]  # more layers than k: one each
    assert segment_ks((2, 0, 2), 100, None) == [2, 0, 2]  # at most all of a layer
    codec = TopK(k=61, per_layer=True)
    codec.segments = (100, 1000, 5000)
    assert codec.k_for(6100) == 61 and codec.compress(torch.randn(6100)).data["values"].numel() == 61


def test_per_layer_bad_arguments():
    with pytest.raises(TypeError, match="per_layer"):
        TopK(per_layer=1)
    with pytest.raises(ValueError, match="segments"):
        TopK(per_layer=True).segments = (10, -1)
    assert TopK(per_layer=True).meta()["per_layer"] is True


@pytest.mark.parametrize("numel", [300, 40_000])  # int16 and int32 indices
@pytest.mark.parametrize("bad", [-1, "numel", "max"])
def test_from_bytes_refuses_out_of_range_indices_on_cpu(numel, bad):
    codec = TopK(k=5)
    x = torch.randn(numel)
    payload = codec.compress(x)
    indices = payload.data["indices"].clone()
    dtype_max = torch.iinfo(indices.dtype).max
    indices[2] = {"numel": numel, "max": dtype_max}.get(bad, bad)
    payload.data["indices"] = indices
    with pytest.raises(ValueError, match=rf"indices outside \[0, {numel}\)"):
        codec.from_bytes(payload.to_bytes(), x.shape, x.dtype)
    # the intact payload still goes through
    intact = codec.compress(x)
    received = codec.from_bytes(intact.to_bytes(), x.shape, x.dtype)
    assert torch.equal(received.data["indices"], intact.data["indices"])
