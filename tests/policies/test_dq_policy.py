"""DQPolicy's rule and budget tracking on synthetic norm sequences (one process)."""

from __future__ import annotations

import math
import random

import pytest

from lightning_compress.compressors import QSGD, TopK
from lightning_compress.policies import DQPolicy


def norms(n, seed=0, start=5.0, decay=300.0, noise=0.3):
    """A decaying, noisy gradient-norm sequence like training produces."""
    rnd = random.Random(seed)
    return [start * math.exp(-i / decay) * math.exp(rnd.gauss(0.0, noise)) for i in range(n)]


def run(policy, seq, total=None):
    policy.setup(0, total)
    return [policy.decide(g, step) for step, g in enumerate(seq)]


def test_bits_non_decreasing_in_the_norm_for_fixed_t():
    p = DQPolicy(mean_bits=4, min_bits=2, max_bits=8)
    grid = [10 ** (e / 20) for e in range(-120, 121)]
    for t in (1e-3, 1.0, 7.0, 1e4):
        bits = [p.bits_for(g, t) for g in grid]
        assert bits == sorted(bits)
        assert bits[0] == 2 and bits[-1] == 8  # clamped at both ends
    # the paper's rule itself, where it is not clamped: B = log2(t·g + 1) + 1
    assert p.bits_for(1.0, 7.0) == 4  # log2(8) + 1
    assert p.bits_for(1.0, 15.0) == 5
    assert p.bits_for(1.0, 2**7 - 1) == 8
    assert p.bits_for(math.inf, 1.0) == 8


def test_first_step_uses_round_mean_bits_and_then_follows_the_norm():
    p = DQPolicy(mean_bits=5.0, gain=0.1)
    p.setup(0)
    assert p.decide(None) == 5 and p.t is None
    assert p.decide(2.0) == 5  # first norm defines the usual norm: the budget
    assert p.t == pytest.approx((2**4 - 1) / 2.0)
    big = p.decide(16.0)  # 8x the usual norm: about 3 more bits
    assert big >= 7
    p2 = DQPolicy(mean_bits=5.0)
    p2.setup(0)
    p2.decide(None), p2.decide(2.0)
    assert p2.decide(0.25) <= 3


@pytest.mark.parametrize("mean_bits", [2.0, 3.0, 4.0, 4.5, 5.3, 7.8, 8.0])
def test_budget_tracking_converges_to_mean_bits(mean_bits):
    bits = run(DQPolicy(mean_bits=mean_bits), norms(2000))
    assert abs(sum(bits) / len(bits) - mean_bits) < 0.02
    assert abs(sum(bits[:200]) / 200 - mean_bits) < 0.1  # already early on
    assert min(bits) >= 2 and max(bits) <= 8


def test_budget_holds_with_clamping_and_degenerate_norms():
    seq = [1e-30, 0.0, math.nan, math.inf, None] * 20 + norms(400, noise=1.5)
    p = DQPolicy(mean_bits=4.0, min_bits=3, max_bits=6)
    bits = run(p, seq)
    assert set(bits) <= {3, 4, 5, 6}
    assert abs(sum(bits) / len(bits) - 4.0) < 0.05
    assert len(set(bits[100:])) >= 3  # large noise: the width moves through the range


def test_more_bits_for_larger_norms_within_a_run():
    seq = norms(3000, decay=1e9, noise=0.5)
    p = DQPolicy(mean_bits=4.0)
    p.setup(0)
    pairs = []
    for g in seq:
        ref = p.budget.log2_ref
        pairs.append((None if ref is None else math.log2(g) - ref, p.decide(g)))
    above = [b for x, b in pairs if x is not None and x > 0.5]
    below = [b for x, b in pairs if x is not None and x < -0.5]
    assert sum(above) / len(above) > sum(below) / len(below) + 0.8


def test_strongly_convex_spends_more_bits_late_and_meets_budget():
    p = DQPolicy(mean_bits=4.0, variant="strongly_convex")
    bits = run(p, norms(1000, decay=1e9), total=1000)
    assert abs(sum(bits) / len(bits) - 4.0) < 0.05
    assert sum(bits[-250:]) / 250 > sum(bits[:250]) / 250 + 0.8
    assert 0 < p.resolved_alpha < 1
    # an explicit alpha: ramp of ½·log2(1/α) bits per step
    q = DQPolicy(mean_bits=4.0, variant="strongly_convex", alpha=0.998)
    q.setup(0, 1000)
    assert q.target(999) - q.target(0) == pytest.approx(999 * 0.5 * math.log2(1 / 0.998))


def test_strongly_convex_needs_the_run_length():
    p = DQPolicy(variant="strongly_convex")
    with pytest.raises(ValueError, match="total_steps"):
        p.setup(0, math.inf)
    DQPolicy(variant="strongly_convex", total_steps=10).setup(0, math.inf)  # given explicitly: fine


def test_state_dict_round_trip_continues_identically():
    seq = norms(200, seed=3)
    a = DQPolicy(mean_bits=3.7)
    a.setup(0)
    first = [a.decide(g, i) for i, g in enumerate(seq[:100])]
    state = a.state_dict()
    b = DQPolicy(mean_bits=3.7)
    b.load_state_dict(state)
    b.setup(0)
    assert b.state_dict() == state
    rest_a = [a.decide(g, i) for i, g in enumerate(seq[100:], 100)]
    rest_b = [b.decide(g, i) for i, g in enumerate(seq[100:], 100)]
    assert rest_a == rest_b and len(set(first + rest_a)) > 1
    with pytest.raises(ValueError, match="budget"):
        b.load_state_dict({"value": 3})


def test_compressor_checks():
    p = DQPolicy(mean_bits=3.4)
    p.check_compressor(QSGD(bits=8))
    with pytest.raises(TypeError, match="bit width"):
        p.check_compressor(TopK(ratio=0.1))
    c = p.default_compressor()
    assert isinstance(c, QSGD) and c.bits == 3
    p.apply(c, 6)
    assert c.bits == 6


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mean_bits": 9}, "mean_bits"),
        ({"mean_bits": 1.5}, "mean_bits"),
        ({"mean_bits": "4"}, "mean_bits"),
        ({"min_bits": 0}, "min_bits"),
        ({"max_bits": 9}, "max_bits"),
        ({"min_bits": 6, "max_bits": 4}, "min_bits"),
        ({"min_bits": 2.5}, "min_bits"),
        ({"variant": "convex"}, "variant"),
        ({"alpha": 1.0}, "alpha"),
        ({"total_steps": 0}, "total_steps"),
        ({"gain": 0.0}, "gain"),
        ({"norm_decay": 1.0}, "norm_decay"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DQPolicy(**kwargs)
