"""AdaptiveTopKPolicy's rule and budget tracking on synthetic norm sequences (one process)."""

from __future__ import annotations

import math
import random

import pytest

from lightning_compress.compressors import QSGD, TopK
from lightning_compress.policies import AdaptiveTopKPolicy

D = 70_000


def norms(n, seed=0, decay=300.0, noise=0.3):
    rnd = random.Random(seed)
    return [5.0 * math.exp(-i / decay) * math.exp(rnd.gauss(0.0, noise)) for i in range(n)]


def test_k_grows_with_the_norm_for_fixed_t_and_is_clamped():
    p = AdaptiveTopKPolicy(mean_ratio=0.01)
    p.setup(D)
    lo, hi = p.k_bounds()
    assert (lo, hi) == (175, 2800)
    ks = [p.k_for(10 ** (e / 20), 700.0) for e in range(-80, 81)]
    assert ks == sorted(ks) and ks[0] == lo and ks[-1] == hi
    assert p.k_for(1.0, 700.0) == 700  # K = t·||g|| where not clamped
    assert p.k_for(math.inf, 1.0) == hi


@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.05, 0.3])
def test_budget_tracking_converges_to_mean_ratio(ratio):
    p = AdaptiveTopKPolicy(mean_ratio=ratio)
    p.setup(D)
    ks = [p.decide(g, i) for i, g in enumerate([None, *norms(1999)])]
    assert ks[0] == round(ratio * D)
    assert abs(sum(ks) / len(ks) / D - ratio) < 0.01 * ratio
    assert len(set(ks)) > 10
    assert p.mean_k == pytest.approx(sum(ks) / len(ks))


def test_state_dict_round_trip_continues_identically():
    seq = norms(200, seed=5)
    a = AdaptiveTopKPolicy(mean_ratio=0.02, norm_power=2.0)
    a.setup(D)
    [a.decide(g) for g in seq[:100]]
    b = AdaptiveTopKPolicy(mean_ratio=0.02, norm_power=2.0)
    b.load_state_dict(a.state_dict())
    b.setup(D)
    assert [a.decide(g) for g in seq[100:]] == [b.decide(g) for g in seq[100:]]


def test_compressor_checks_and_apply():
    p = AdaptiveTopKPolicy(mean_ratio=0.05)
    with pytest.raises(TypeError, match="TopK"):
        p.check_compressor(QSGD(bits=4))
    c = p.default_compressor()
    p.check_compressor(c)
    p.apply(c, 123)
    assert c.k == 123 and c.k_for(D) == 123
    with pytest.raises(RuntimeError, match="setup"):
        AdaptiveTopKPolicy().decide(1.0)
    assert isinstance(c, TopK)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mean_ratio": 0.0}, "mean_ratio"),
        ({"mean_ratio": 1.5}, "mean_ratio"),
        ({"min_ratio": 0.5}, "mean_ratio must lie"),
        ({"max_ratio": 0.001}, "mean_ratio must lie"),
        ({"norm_power": -1}, "norm_power"),
        ({"gain": 2.0}, "gain"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaptiveTopKPolicy(**kwargs)
