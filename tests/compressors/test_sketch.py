import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_compress.compressors import CountSketch
from lightning_compress.compressors.sketch import _median_


def planted(numel: int = 100_000, heavy: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=generator) * 0.01
    positions = torch.randperm(numel, generator=generator)[:heavy]
    signs = torch.randint(0, 2, (heavy,), generator=generator) * 2 - 1
    x[positions] = signs * (5.0 + torch.rand(heavy, generator=generator))
    return x, positions


def test_class_attributes():
    assert (CountSketch.name, CountSketch.exchange, CountSketch.unbiased) == ("sketch", "sketch", False)
    codec = CountSketch()
    assert codec.meta() == {"rows": 5, "cols": None, "k": None, "ratio": 0.01, "candidates": 4, "seed": 0}
    assert repr(codec) == "CountSketch(rows=5, cols=None, k=None, ratio=0.01, candidates=4, seed=0)"


def test_default_cols_and_layout():
    codec = CountSketch(rows=3)
    assert codec.k_for(1_000_000) == 10_000 and codec.cols_for(1_000_000) == 40_000
    assert codec.cols_for(1000) == 256  # floor for small k
    assert CountSketch(cols=100).cols_for(10**6) == 100
    payload = codec.compress(torch.randn(20_000))
    assert payload.nbytes == codec.payload_nbytes(20_000) == 4 * 3 * 800
    assert payload.data["table"].dtype == torch.float32
    assert payload.meta == {"rows": 3, "cols": 800, "k": 200, "ratio": 0.01, "candidates": 4, "seed": 0}


@pytest.mark.parametrize("seed", range(5))
def test_recovers_planted_heavy_hitters(seed):
    x, heavy = planted(seed=seed)
    codec = CountSketch(k=10, seed=seed)
    candidates = codec.candidates(codec.sketch(x), x.numel())
    assert candidates.dtype == torch.int64 and candidates.numel() == 40
    assert torch.isin(heavy, candidates).all()
    # Second round: exact values at the candidates, keep the top k.
    top = candidates[torch.topk(x[candidates].abs(), 10).indices]
    assert set(top.tolist()) == set(heavy.tolist())


def test_decompress_returns_the_heavy_hitters_with_a_wide_table():
    x, heavy = planted()
    codec = CountSketch(k=10, cols=4096)
    y = codec.decompress(codec.compress(x))
    assert set(y.nonzero().squeeze(1).tolist()) == set(heavy.tolist())
    assert torch.allclose(y[heavy], x[heavy], atol=0.2)


def test_estimate_is_exact_without_collisions():
    x = torch.zeros(1000)
    x[123] = 2.5
    codec = CountSketch(rows=4, cols=64, k=1)
    estimate = codec.estimate(codec.sketch(x), 1000)
    assert estimate[123] == 2.5
    assert torch.equal(codec.decompress(codec.compress(x)), x)


@settings(max_examples=25, deadline=None)
@given(numel=st.integers(1, 5000), rows=st.integers(1, 6), seed=st.integers(0, 2**31))
def test_sketch_is_linear(numel, rows, seed):
    generator = torch.Generator().manual_seed(seed)
    a, b = torch.randn(numel, generator=generator), torch.randn(numel, generator=generator)
    codec = CountSketch(rows=rows, cols=97, seed=seed)
    sa, sb, sab = codec.sketch(a), codec.sketch(b), codec.sketch(a + b)
    assert sa.shape == (rows, 97)
    assert torch.allclose(sa + sb, sab, atol=1e-4)
    assert torch.allclose(codec.sketch(3 * a), 3 * sa, atol=1e-4)
    # A one-hot vector lands in exactly one column of each row, with sign +-1.
    one_hot = torch.zeros(numel)
    one_hot[seed % numel] = 1.0
    table = codec.sketch(one_hot)
    assert torch.equal((table != 0).sum(1), torch.ones(rows, dtype=torch.int64))
    assert torch.equal(table.abs().sum(1), torch.ones(rows))


def test_same_seed_same_hashes_across_instances():
    x = torch.randn(5000)
    a, b, c = CountSketch(seed=3), CountSketch(seed=3), CountSketch(seed=4)
    assert torch.equal(a.sketch(x), b.sketch(x))
    assert not torch.equal(a.sketch(x), c.sketch(x))
    ha, hb = a._row_hashes(5000, x.device, 256), b._row_hashes(5000, x.device, 256)
    assert all(torch.equal(p, q) for p, q in zip(ha, hb, strict=True))
    assert all(h.dtype == torch.int32 and int(h.min()) >= 0 and int(h.max()) < 512 for h in ha)
    # Rows use different hashes, and so do different sizes.
    assert not torch.equal(ha[0], ha[1])
    assert not torch.equal(a._row_hashes(5001, x.device, 256)[0][:5000], ha[0])


def test_signs_are_balanced():
    codec = CountSketch(rows=2, cols=300)
    hashes = codec._row_hashes(100_000, torch.device("cpu"), 300)
    negative = torch.stack([(h >= 300).float().mean() for h in hashes])
    assert ((negative - 0.5).abs() < 0.01).all()


def test_candidates_are_capped_and_sorted():
    codec = CountSketch(k=30, candidates=5)
    x = torch.randn(100)
    candidates = codec.candidates(codec.sketch(x), 100)
    assert torch.equal(candidates, torch.arange(100))
    x = torch.randn(10_000)
    candidates = codec.candidates(codec.sketch(x), 10_000)
    assert candidates.numel() == 150 and (candidates[1:] > candidates[:-1]).all()


@pytest.mark.parametrize("rows", range(1, 9))
def test_median(rows):
    values = torch.randn(rows, 1001)
    ordered = values.sort(0).values
    expected = ordered[rows // 2] if rows % 2 else (ordered[rows // 2 - 1] + ordered[rows // 2]) / 2
    assert torch.allclose(_median_([v.clone() for v in values]), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_dtype_and_shape_round_trip(dtype):
    x = torch.randn(4, 50, 6).to(dtype)
    codec = CountSketch(k=5)
    y = codec.decompress(codec.compress(x))
    assert y.shape == x.shape and y.dtype == dtype
    assert (y != 0).sum() == 5


def test_from_bytes_round_trip():
    codec = CountSketch(rows=3, k=7)
    x = torch.randn(30, 70)
    payload = codec.compress(x)
    received = codec.from_bytes(payload.to_bytes(), x.shape, x.dtype)
    assert received.meta == payload.meta
    assert torch.equal(received.data["table"], payload.data["table"])
    assert torch.equal(codec.decompress(received), codec.decompress(payload))


def test_k_is_mutable_and_overrides_ratio():
    codec = CountSketch(k=20)
    assert (codec.k, codec.ratio) == (20, None)
    codec.ratio = 0.5
    assert (codec.k, codec.ratio, codec.k_for(10)) == (None, 0.5, 5)
    codec.k = 3
    assert (codec.k, codec.ratio, codec.k_for(10)) == (3, None, 3)


def test_bad_arguments():
    for name, bad in [("rows", 0), ("cols", 0), ("candidates", 0), ("rows", 1.5), ("cols", True)]:
        with pytest.raises(ValueError, match=f"{name} must be an integer >= 1"):
            CountSketch(**{name: bad})
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        CountSketch(k=0)
    with pytest.raises(ValueError, match=r"ratio must be a float in \(0, 1\]"):
        CountSketch(ratio=2.0)
    with pytest.raises(ValueError, match="seed must be an integer"):
        CountSketch(seed="a")
    with pytest.raises(ValueError, match="x_flat must be 1-D"):
        CountSketch().sketch(torch.zeros(2, 2))
    with pytest.raises(TypeError, match="floating-point"):
        CountSketch().sketch(torch.zeros(4, dtype=torch.int64))


def test_pickle_drops_the_hash_cache():
    codec = CountSketch(k=3)
    codec.sketch(torch.randn(1000))
    clone = pickle.loads(pickle.dumps(codec))
    assert len(clone._hashes) == 0 and clone.meta() == codec.meta()
    x = torch.randn(1000)
    assert torch.equal(clone.sketch(x), codec.sketch(x))
