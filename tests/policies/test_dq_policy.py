"""DQPolicy's rule, its error-bound form and its run budget on synthetic norm sequences (one process)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from lightning_compress.compressors import QSGD, TopK
from lightning_compress.policies import DQPolicy


def norms(n, seed=0, start=5.0, fall=100.0, noise=0.3):
    """A noisy gradient-norm sequence falling ``fall``-fold (log-linearly) over ``n`` steps."""
    rnd = random.Random(seed)
    return [start * fall ** (-i / max(1, n - 1)) * math.exp(rnd.gauss(0.0, noise)) for i in range(n)]


def run(policy, seq, total=None):
    policy.setup(0, len(seq) if total is None else total)
    return [policy.decide(g, step) for step, g in enumerate(seq)]


def quarters(xs):
    n = len(xs)
    return [sum(xs[i * n // 4 : (i + 1) * n // 4]) / len(xs[i * n // 4 : (i + 1) * n // 4]) for i in range(4)]


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


def test_width_follows_a_100x_fall_and_meets_the_run_budget():
    seq = norms(2000)
    p = DQPolicy(mean_bits=4.0)
    p.setup(0, len(seq))
    bits, log2_t = [], []
    for step, g in enumerate(seq):
        bits.append(p.decide(g, step))
        assert bits[-1] == p.bits_for(g, p.t)  # the paper's rule at this step's t
        log2_t.append(math.log2(p.t))
    q = quarters(bits)
    assert q[0] >= q[3] + 3.0, q  # log2(100) = 6.6 bits of fall, less the clamping at min_bits
    assert q == sorted(q, reverse=True), q
    assert abs(sum(bits) / len(bits) - 4.0) < 0.01
    # once the trend is learned (the first quarter), t is nearly one constant, as in the paper's
    # rule: the width moves with the norm, not with t
    settled = log2_t[len(seq) // 4 : 3 * len(seq) // 4]
    assert max(settled) - min(settled) < 1.0, (min(settled), max(settled))


@pytest.mark.parametrize("mean_bits", [2.0, 3.0, 4.0, 4.5, 5.3, 7.8, 8.0])
def test_run_budget_is_met_for_any_mean_bits(mean_bits):
    bits = run(DQPolicy(mean_bits=mean_bits), norms(1000, fall=30.0, noise=0.6))
    assert abs(sum(bits) / len(bits) - mean_bits) < 0.02
    assert min(bits) >= 2 and max(bits) <= 8


def test_flat_norms_give_no_spurious_trend():
    bits = run(DQPolicy(mean_bits=4.0), norms(1600, fall=1.0, noise=0.5))
    assert all(abs(q - 4.0) < 0.3 for q in quarters(bits)), quarters(bits)


def test_larger_norm_gets_more_bits_at_the_same_moment():
    # two policies in the same state; a 16x larger norm at the same step: 4 more levels-bits, or clamped
    seq = norms(300)
    a, b = DQPolicy(mean_bits=4.0), DQPolicy(mean_bits=4.0)
    run(a, seq, 600)
    b.setup(0, 600)
    b.load_state_dict(a.state_dict())
    assert b.decide(seq[-1] * 16, 300) > a.decide(seq[-1], 300)


def test_budget_holds_with_clamping_and_degenerate_norms():
    seq = [1e-30, 0.0, math.nan, math.inf, None] * 20 + norms(400, noise=1.5)
    p = DQPolicy(mean_bits=4.0, min_bits=3, max_bits=6)
    bits = run(p, seq)
    assert set(bits) <= {3, 4, 5, 6}
    assert abs(sum(bits) / len(bits) - 4.0) < 0.05
    assert len(set(bits[100:])) >= 3  # large noise: the width moves through the range


def test_unknown_run_length_keeps_the_budget_over_windows():
    seq = norms(3000, fall=1.0, noise=0.5)
    bits = run(DQPolicy(mean_bits=4.0), seq, total=math.inf)
    assert abs(sum(bits) / len(bits) - 4.0) < 0.1


def test_error_bound_form_keeps_one_t_and_bounds_the_quantization_variance():
    eps = 1e-3
    p = DQPolicy(max_variance=eps)
    codec = QSGD(bits=8, bucket_size=512, norm="l2")
    p.check_compressor(codec)
    p.setup(4096, math.inf)
    gen = torch.Generator().manual_seed(0)
    for step, scale in enumerate((0.005, 0.015, 0.05)):  # the width rises with the norm, t does not move
        x = torch.randn(4096, generator=gen) * scale / math.sqrt(4096)
        bits = p.decide(float(x.norm()), step)
        assert p.t == pytest.approx(math.sqrt(512 / eps))
        assert bits == math.ceil(math.log2(p.t * float(x.norm()) + 1) + 1) < 8  # fewest bits, not clamped
        codec.bits = bits
        err = torch.stack(
            [(codec.decompress(codec.compress(x, gen)) - x).square().sum() for _ in range(200)]
        ).mean()
        assert err <= eps, (scale, bits, float(err))  # the paper's constraint: added variance <= ε


def test_strongly_convex_spends_more_bits_late_and_meets_budget():
    p = DQPolicy(mean_bits=4.0, variant="strongly_convex")
    bits = run(p, norms(1000, fall=1.0), total=1000)
    assert abs(sum(bits) / len(bits) - 4.0) < 0.05
    assert sum(bits[-250:]) / 250 > sum(bits[:250]) / 250 + 0.8
    assert 0 < p.resolved_alpha < 1


def test_strongly_convex_needs_the_run_length():
    p = DQPolicy(variant="strongly_convex")
    with pytest.raises(ValueError, match="total_steps"):
        p.setup(0, math.inf)
    DQPolicy(variant="strongly_convex", total_steps=10).setup(0, math.inf)  # given explicitly: fine


def test_state_dict_round_trip_continues_identically():
    seq = norms(200, seed=3)
    a = DQPolicy(mean_bits=3.7)
    a.setup(0, 200)
    first = [a.decide(g, i) for i, g in enumerate(seq[:100])]
    state = a.state_dict()
    b = DQPolicy(mean_bits=3.7)
    b.load_state_dict(state)
    b.setup(0, 200)
    assert b.state_dict() == state
    rest_a = [a.decide(g, i) for i, g in enumerate(seq[100:], 100)]
    rest_b = [b.decide(g, i) for i, g in enumerate(seq[100:], 100)]
    assert rest_a == rest_b and len(set(first + rest_a)) > 1
    with pytest.raises(ValueError, match="missing"):
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
        ({"max_variance": 0.0}, "max_variance"),
        ({"max_variance": 1e-3, "mean_bits": 4.0}, "not both"),
        ({"max_variance": 1e-3, "variant": "strongly_convex"}, "nonconvex"),
        ({"trend_window": 0.0}, "trend_window"),
        ({"trend_window": 1.5}, "trend_window"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DQPolicy(**kwargs)
