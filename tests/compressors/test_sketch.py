import math
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_compress.compressors import CountSketch
from lightning_compress.compressors import sketch as sketch_module
from lightning_compress.compressors.sketch import _check_numel, _hash_into, _median_, _row_constants

P = 2**31 - 1


def reference_hash(seed: int, numel: int, row: int, cols: int, i: int) -> int:
    """``g_row(i) = ((a * i + b) mod p) mod (2 * cols)`` in Python integers (no overflow possible)."""
    a, b = _row_constants(seed, numel, row)
    return ((a * i + b) % P) % (2 * cols)


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


def test_hashes_follow_the_carter_wegman_formula():
    numel, cols, seed = 50_000, 123, 9
    codec = CountSketch(rows=3, cols=cols, seed=seed)
    hashes = codec._row_hashes(numel, "cpu", cols)
    positions = [0, 1, 2, 17, 4096, numel // 2, numel - 2, numel - 1]
    for row, h in enumerate(hashes):
        a, b = _row_constants(seed, numel, row)
        assert 1 <= a < P and 0 <= b < P
        assert h.dtype == torch.int32 and h.shape == (numel,)
        assert [int(h[i]) for i in positions] == [
            reference_hash(seed, numel, row, cols, i) for i in positions
        ]
    # Exact int64 arithmetic at the top of the range, where a * i nears 2**62.
    index = torch.tensor([0, 1, 2**30, P - 2, P - 1], dtype=torch.int64)
    for a, b in [(P - 1, P - 1), (1, 0), (2**30 + 12345, 777)]:
        got = _hash_into(index, a, b, 1000, torch.empty_like(index), torch.empty(5, dtype=torch.int32))
        assert got.tolist() == [((a * i + b) % P) % 2000 for i in index.tolist()]


def test_hashes_are_deterministic_and_independent_of_the_instance():
    numel, cols = 20_000, 200
    codec = CountSketch(rows=4, seed=5)
    first = [h.clone() for h in codec._row_hashes(numel, "cpu", cols)]
    codec._hashes.clear()  # rebuilt, not just returned from the cache
    again = codec._row_hashes(numel, "cpu", cols)
    clone = pickle.loads(pickle.dumps(codec))
    assert len(clone._hashes) == 0
    for hashes in (
        again,
        clone._row_hashes(numel, "cpu", cols),
        CountSketch(rows=4, seed=5)._row_hashes(numel, "cpu", cols),
    ):
        assert all(torch.equal(p, q) for p, q in zip(first, hashes, strict=True))
    # Rows, seeds and sizes each give other hashes.
    assert all(not torch.equal(first[r], first[s]) for r in range(4) for s in range(r))
    other_seed = CountSketch(rows=4, seed=6)._row_hashes(numel, "cpu", cols)
    assert all(not torch.equal(p, q) for p, q in zip(first, other_seed, strict=True))
    assert not torch.equal(codec._row_hashes(numel + 1, "cpu", cols)[0][:numel], first[0])


def test_buckets_are_roughly_uniform():
    numel, cols = 200_000, 300
    for h in CountSketch(rows=5, seed=1)._row_hashes(numel, "cpu", cols):
        for values, bins in ((h, 2 * cols), (h % cols, cols)):  # bucket and sign together; bucket alone
            counts = torch.bincount(values.long(), minlength=bins).double()
            expected = numel / bins
            chi2 = float(((counts - expected) ** 2 / expected).sum())
            # chi-square with bins - 1 degrees of freedom: mean bins - 1, sd sqrt(2 * (bins - 1))
            assert chi2 < bins - 1 + 6 * math.sqrt(2 * (bins - 1))


def test_random_pairs_collide_at_the_pairwise_rate():
    numel, cols, pairs = 1_000_000, 300, 200_000
    generator = torch.Generator().manual_seed(0)
    i = torch.randint(numel, (pairs,), generator=generator)
    j = (i + torch.randint(1, numel, (pairs,), generator=generator)) % numel  # j != i
    for h in CountSketch(rows=5, seed=2)._row_hashes(numel, "cpu", cols):
        for same, rate in (((h[i] == h[j]), 1 / (2 * cols)), ((h[i] % cols == h[j] % cols), 1 / cols)):
            expected = pairs * rate
            assert abs(int(same.sum()) - expected) < 5 * math.sqrt(expected)


@pytest.mark.parametrize("pair", [(0, 1), (7, 7 + 16), (7, 7 + 8), (3, 999_999), (123_456, 654_321)])
def test_a_fixed_pair_collides_at_most_at_the_pairwise_rate_over_seeds(pair):
    # What count sketch needs (Charikar et al.): for any two coordinates, over the choice of the
    # constants, P[g(i) = g(j)] <= 1 / (2 * cols). Pairs at a distance of cols or 2 * cols would
    # always collide under a hash like i mod (2 * cols).
    numel, cols, seeds = 1_000_000, 8, 4000
    i, j = pair
    same = sum(
        reference_hash(s, numel, 0, cols, i) == reference_hash(s, numel, 0, cols, j) for s in range(seeds)
    )
    bucket = sum(
        reference_hash(s, numel, 1, cols, i) % cols == reference_hash(s, numel, 1, cols, j) % cols
        for s in range(seeds)
    )
    for count, rate in ((same, 1 / (2 * cols)), (bucket, 1 / cols)):
        expected = seeds * rate
        assert abs(count - expected) < 5 * math.sqrt(expected * (1 - rate))


def test_numel_limit():
    _check_numel(2**31 - 1)  # the largest tensor that hashes: coordinates 0 .. p - 1
    codec = CountSketch(rows=2, cols=4)
    with pytest.raises(ValueError, match=r"at most 2\*\*31 - 1 .* got numel=2147483648"):
        codec.estimate(torch.zeros(2, 4), 2**31)
    with pytest.raises(ValueError, match=r"2\*\*31 - 1"):
        codec._row_hashes(2**31, "cpu", 4)


def test_cpu_cache_is_bounded():
    codec = CountSketch(rows=2, cols=16)
    for numel in range(100, 107):
        codec.sketch(torch.randn(numel))
    assert len(codec._hashes) == sketch_module._HASHES_CACHED == 4
    assert list(codec._hashes) == [(numel, 16) for numel in range(103, 107)]


def test_computed_hashes_match_the_cached_tables(monkeypatch):
    # Off the CPU the hashes are computed per call in chunks; run that path on CPU, with chunks
    # small enough that a tensor spans several, and check it against the cached tables.
    numel, cols = 10_007, 64
    x, _ = planted(numel, heavy=5)
    cached = CountSketch(rows=5, cols=cols, k=5, seed=3)
    tables, table = cached._row_hashes(numel, "cpu", cols), cached.sketch(x)
    estimates = cached.estimate(table, numel)
    monkeypatch.setattr(sketch_module, "_CHUNK", 1000)
    monkeypatch.setattr(sketch_module, "_caches_hashes", lambda device: False)
    computed = CountSketch(rows=5, cols=cols, k=5, seed=3)
    assert all(
        torch.equal(p, q) for p, q in zip(tables, computed._row_hashes(numel, "cpu", cols), strict=True)
    )
    assert torch.allclose(computed.sketch(x), table, atol=1e-5)
    assert torch.equal(computed.estimate(table, numel), estimates)
    assert torch.equal(computed.decompress(computed.compress(x)), cached.decompress(cached.compress(x)))
    assert len(computed._hashes) == 0  # nothing kept
    assert computed.sketch(torch.zeros(0)).shape == (5, cols) and computed.estimate(table, 0).numel() == 0


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
    codec = CountSketch(k=3, seed=11)
    codec.sketch(torch.randn(1000))
    clone = pickle.loads(pickle.dumps(codec))
    assert len(clone._hashes) == 0 and clone.meta() == codec.meta()
    x = torch.randn(1000)
    assert torch.equal(clone.sketch(x), codec.sketch(x))
    assert torch.equal(clone.estimate(codec.sketch(x), 1000), codec.estimate(codec.sketch(x), 1000))
