"""AdaptiveTopKPolicy: the KKT rule of docs/adaptive_topk.md on synthetic norm sequences (one process).

The expected values are computed here independently of the implementation: the cubic's root and the
multiplier by plain bisection, the norm forecast from its definition.
"""

from __future__ import annotations

import json
import math
import random

import pytest

from lightning_compress.compressors import QSGD, TopK
from lightning_compress.policies import AdaptiveTopKPolicy
from lightning_compress.policies.topk import kkt_ratio

D = 100_000


# -- an independent solution of problem (P) ---------------------------------------------------
def kkt_root(b):
    """Root of a·(2 − δ)/δ³ = λ in (0, 2) for b = a/λ, by bisection."""
    lo, hi = 0.0, 2.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if mid**3 < b * (2.0 - mid):
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def optimum(weights, budget, lo, hi):
    """δ of min Σ a_m(1 − δ_m)/δ_m² s.t. Σ δ_m = budget, lo <= δ_m <= hi (bisection on log λ)."""
    n = len(weights)
    if budget <= n * lo:
        return [lo] * n
    if budget >= n * hi:
        return [hi] * n

    def deltas(log_lam):
        return [min(hi, max(lo, kkt_root(a / math.exp(log_lam)))) for a in weights]

    left, right = -200.0, 200.0
    for _ in range(80):
        mid = 0.5 * (left + right)
        if sum(deltas(mid)) > budget:
            left = mid
        else:
            right = mid
    return deltas(0.5 * (left + right))


def falling(n, seed=0, fall=100.0, noise=0.3, start=5.0):
    """Norms falling ``fall``-fold over ``n`` exchanges, with log-normal noise."""
    rnd = random.Random(seed)
    return [start * fall ** (-i / (n - 1)) * math.exp(rnd.gauss(0.0, noise)) for i in range(n)]


def run(policy, norms):
    return [policy.decide(g, i) for i, g in enumerate(norms)]


def quarter_means(ks, d=D):
    q = len(ks) // 4
    return [sum(ks[i * q : (i + 1) * q]) / q / d for i in range(4)]


# -- the rule ------------------------------------------------------------------------------------
@pytest.mark.parametrize("b", [1e-12, 1e-6, 1e-3, 0.02, 0.5, 1.0, 7.0])
def test_kkt_ratio_is_the_root_of_the_stationarity_condition(b):
    delta = kkt_ratio(b)
    assert delta == pytest.approx(kkt_root(b), rel=1e-9)
    assert delta**3 + b * delta - 2 * b == pytest.approx(0.0, abs=1e-9 * b)
    small = (2 * b) ** (1 / 3)  # the small-δ form, K ∝ η·||g||^(2/3); δ = small·(1 − small/6 + ...)
    if b < 1e-3:
        assert delta == pytest.approx(small, rel=small / 4)


def test_k_equals_the_kkt_solution_with_the_trend_forecast():
    """Every decision is the optimum of (P) over the exchanges left, with the forecast norms.

    N = 40 < 64 forecast nodes, so the future is summed exchange by exchange. The norms fall
    geometrically, so from the third exchange on the fitted line is exact (slope not shrunk): the
    forecast is ``log g_n + log(0.9)·min(h, 2(n + 1))`` h exchanges ahead. Before three points there is
    no slope: the forecast is the weighted mean log norm (the older point weighted 1 − 1/20).
    """
    n_total, ratio, d = 40, 0.01, 1_000_000
    norms = [5.0 * 0.9**i for i in range(n_total)]
    policy = AdaptiveTopKPolicy(mean_ratio=ratio, lr_schedule="cosine")
    policy.setup(d, float(n_total))
    ks = run(policy, norms)

    lo, hi = ratio / 4, 4 * ratio
    k_lo, k_hi = round(lo * d), round(hi * d)

    def lr(step):
        return 0.5 * (1 + math.cos(math.pi * step / n_total))

    spent = 0.0
    for n, k in enumerate(ks):
        y = [math.log(g) for g in norms[: n + 1]]
        if n == 0:
            forecast = [y[0]] * n_total
        elif n == 1:
            forecast = [(0.95 * y[0] + y[1]) / 1.95] * n_total
        else:
            forecast = [y[n] + math.log(0.9) * min(m - n, 2 * (n + 1)) for m in range(n_total)]
        weights = [lr(n) ** 3 * norms[n] ** 2]
        weights += [lr(m) ** 3 * math.exp(2 * forecast[m]) for m in range(n + 1, n_total)]
        delta = optimum(weights, ratio * n_total - spent, lo, hi)[0]
        assert k == min(k_hi, max(k_lo, math.floor(delta * d + 0.5))), n
        spent += k / d
    # the learning-rate weights and the falling norm both ask for more coordinates early
    assert ks[0] > ks[n_total // 2] > ks[-2]
    assert policy.mean == pytest.approx(ratio, abs=0.5 / d)


def test_larger_norm_keeps_more_coordinates():
    policy = AdaptiveTopKPolicy(mean_ratio=0.01)
    policy.setup(D, 1000)
    run(policy, falling(200, seed=3))
    state = policy.state_dict()
    ks = []
    for g in [10 ** (e / 4) for e in range(-16, 17)]:
        policy.load_state_dict(state)
        ks.append(policy.decide(g, 200))
    assert ks == sorted(ks) and ks[0] < ks[-1]


@pytest.mark.parametrize("seed, ratio", [(0, 0.01), (1, 0.001), (2, 0.05)])
def test_k_follows_a_100x_norm_decay_and_meets_the_budget(seed, ratio):
    n_total = 1200
    policy = AdaptiveTopKPolicy(mean_ratio=ratio)
    policy.setup(D, n_total)
    ks = run(policy, falling(n_total, seed=seed))
    q1, _, _, q4 = quarter_means(ks)
    assert q1 > 3 * q4, (q1, q4)  # measured 3.8-4.3x over 8 seeds (the hindsight optimum of (P): 8.2x)
    mean = sum(ks) / n_total / D
    assert abs(mean - ratio) <= 1e-3 * ratio, mean  # paced to the budget: met up to rounding K
    assert policy.mean == pytest.approx(mean)
    assert policy.mean_k == pytest.approx(sum(ks) / n_total)


def test_constant_norms_keep_the_budget_every_step():
    policy = AdaptiveTopKPolicy(mean_ratio=0.01)
    policy.setup(D, 500)
    assert set(run(policy, [2.0] * 500)) == {1000}


def test_callable_lr_schedule_matches_cosine_and_only_its_shape_matters():
    n_total = 300
    norms = falling(n_total, seed=4)
    ks = {}
    for name, schedule in [
        ("cosine", "cosine"),
        ("callable", lambda s: 0.1 * 0.5 * (1 + math.cos(math.pi * min(s, n_total) / n_total))),
    ]:
        policy = AdaptiveTopKPolicy(mean_ratio=0.01, lr_schedule=schedule)
        policy.setup(D, n_total)
        ks[name] = run(policy, norms)
    assert ks["cosine"] == ks["callable"]


def test_unknown_run_length_uses_a_receding_horizon_within_its_bound():
    ratio, lo, hi, horizon, n = 0.01, 0.0025, 0.04, 200, 3000
    policy = AdaptiveTopKPolicy(mean_ratio=ratio, fallback_horizon=horizon)
    policy.setup(D, math.inf)
    ks = run(policy, falling(n, seed=5))
    excess = sum(ks) / D - ratio * n
    below, above = horizon * (hi - ratio) + (ratio - lo), horizon * (ratio - lo) + (hi - ratio)
    assert -below - 1e-6 <= excess <= above + 1e-6
    assert abs(policy.mean - ratio) < 0.05 * ratio, policy.mean  # measured: +0.75% at n = 15 H
    # a run longer than the Trainer's estimate continues on the receding horizon
    policy = AdaptiveTopKPolicy(mean_ratio=ratio, fallback_horizon=horizon)
    policy.setup(D, 100)
    ks = run(policy, [1.0] * 400)
    assert ks[-1] == 1000 and abs(sum(ks) / 400 / D - ratio) < 1e-3 * ratio


# -- clamping and unknown norms -----------------------------------------------------------------
def test_k_is_clamped_to_min_and_max_ratio():
    policy = AdaptiveTopKPolicy(mean_ratio=0.01)
    policy.setup(70_000, 200)
    assert policy.k_bounds() == (175, 2800)
    run(policy, [1.0] * 50)
    assert policy.decide(1e6, 50) == 2800
    assert policy.decide(1e-6, 51) == 175
    assert policy.decide(1e300, 52) == 2800  # no overflow near the float range
    assert policy.decide(1e-300, 53) == 175
    narrow = AdaptiveTopKPolicy(mean_ratio=0.01, min_ratio=0.008, max_ratio=0.012)
    narrow.setup(D, 400)
    ks = run(narrow, falling(400, seed=6))
    assert min(ks) == 800 and max(ks) == 1200


@pytest.mark.parametrize("unknown", [None, math.inf, math.nan, 0.0, -math.inf])
def test_unknown_norm_keeps_the_remaining_per_step_budget(unknown):
    policy = AdaptiveTopKPolicy(mean_ratio=0.01)
    policy.setup(D, 100)
    assert policy.decide(unknown, 0) == 1000
    run(policy, [4.0, 3.0, 2.0])  # steps 0..2 of this list: the policy counts 4 exchanges in all
    trend = policy.state_dict()["trend"]
    spent = policy.state_dict()["spent"]
    k = policy.decide(unknown, 4)
    assert k == math.floor((0.01 * 100 - spent) / (100 - 4) * D + 0.5)
    assert policy.state_dict()["trend"] == trend  # an unknown norm tells nothing about the trend
    assert policy.multiplier is None and policy.value == k


# -- state, wiring, arguments ---------------------------------------------------------------------
def test_state_dict_round_trip_continues_identically():
    norms = falling(300, seed=7)
    a = AdaptiveTopKPolicy(mean_ratio=0.02, lr_schedule="cosine")
    a.setup(D, 300)
    run(a, norms[:150])
    state = a.state_dict()
    json.dumps(state)  # plain python values only
    b = AdaptiveTopKPolicy(mean_ratio=0.02, lr_schedule="cosine")
    b.load_state_dict(json.loads(json.dumps(state)))
    b.setup(D, 300)
    assert [a.decide(g, i) for i, g in enumerate(norms[150:], 150)] == [
        b.decide(g, i) for i, g in enumerate(norms[150:], 150)
    ]
    assert a.state_dict() == b.state_dict()
    with pytest.raises(ValueError, match="missing"):
        b.load_state_dict({"budget": {}})


def test_compressor_checks_and_wiring():
    p = AdaptiveTopKPolicy(mean_ratio=0.05)
    assert p.setting == "k" and p.metric == "comm/topk_k" and p.needs_total_steps
    with pytest.raises(TypeError, match="TopK"):
        p.check_compressor(QSGD(bits=4))
    c = p.default_compressor()
    assert isinstance(c, TopK) and c.ratio == 0.05
    p.check_compressor(c)
    assert p.mean is None and p.value is None
    with pytest.raises(RuntimeError, match="setup"):
        p.decide(1.0, 0)
    assert "mean_ratio=0.05" in repr(p) and "lr_schedule='constant'" in repr(p)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mean_ratio": 0.0}, "mean_ratio"),
        ({"mean_ratio": 1.5}, "mean_ratio"),
        ({"mean_ratio": True}, "mean_ratio"),
        ({"min_ratio": 0.5}, "mean_ratio must lie"),
        ({"max_ratio": 0.001}, "mean_ratio must lie"),
        ({"min_ratio": -0.1}, "min_ratio"),
        ({"lr_schedule": "linear"}, "lr_schedule"),
        ({"lr_schedule": 0.1}, "lr_schedule"),
        ({"fallback_horizon": 0}, "fallback_horizon"),
        ({"fallback_horizon": 10.5}, "fallback_horizon"),
        ({"fallback_horizon": True}, "fallback_horizon"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaptiveTopKPolicy(**kwargs)


def test_bad_setup_and_schedule_values():
    p = AdaptiveTopKPolicy()
    for numel in (-1, 1.5, True):
        with pytest.raises(ValueError, match="numel"):
            p.setup(numel, 10)
    for total in (0, -5, math.nan, "10"):
        with pytest.raises(ValueError, match="total_steps"):
            p.setup(100, total)
    with pytest.raises(ValueError, match="cosine.*run length"):
        AdaptiveTopKPolicy(lr_schedule="cosine").setup(100, math.inf)
    bad = AdaptiveTopKPolicy(lr_schedule=lambda s: -1.0)
    bad.setup(D, 10)
    with pytest.raises(ValueError, match="lr_schedule"):
        bad.decide(1.0, 0)
