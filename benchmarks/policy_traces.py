"""Traces of the budget policies on synthetic gradient-norm sequences (one process, a few seconds).

    python benchmarks/policy_traces.py            # both tables of docs/adaptive_topk.md §6, DQ by quarter

Prints, for each norm shape, the compression term of adaptive Top-K's bound (online rule and the
hindsight optimum, relative to a constant K), K/d first quarter over last, the mean K/d, and
DQPolicy's bit width by quarter next to the one constant ``t`` that meets the budget in hindsight.
"""

from __future__ import annotations

import argparse
import math
import random

from lightning_compress.policies import AdaptiveTopKPolicy, DQPolicy
from lightning_compress.policies.topk import clamped_ratio, solve_multiplier

SHAPES = {
    "`5·100^(−i/(N−1))` (exp, 100x)": lambda i, n: 5.0 * 100 ** (-i / (n - 1)),
    "`5·(0.05 + 0.95·exp(−20i/N))` (fast drop, plateau)": lambda i, n: 5.0
    * (0.05 + 0.95 * math.exp(-20 * i / n)),
    "`5/√(1 + i/10)`": lambda i, n: 5.0 / math.sqrt(1 + i / 10),
    "`5·min(1, 20(i+1)/N)·100^(−i/(N−1))` (5% warm-up, then 100x)": lambda i, n: 5.0
    * min(1.0, 20 * (i + 1) / n)
    * 100 ** (-i / (n - 1)),
    "`1` (constant)": lambda i, n: 1.0,
    "`0.05·100^(i/(N−1))` (rise, 100x)": lambda i, n: 0.05 * 100 ** (i / (n - 1)),
}


def quarters(xs: list[float]) -> list[float]:
    q = len(xs) // 4
    return [sum(xs[i * q : (i + 1) * q]) / q for i in range(4)]


def norms(shape, n: int, seed: int, noise: float) -> list[float]:
    rnd = random.Random(seed)
    return [shape(i, n) * math.exp(rnd.gauss(0.0, noise)) for i in range(n)]


def topk_row(seq: list[float], rho: float = 0.01, d: int = 100_000) -> tuple[float, float, float, float]:
    n = len(seq)
    policy = AdaptiveTopKPolicy(mean_ratio=rho)
    policy.setup(d, n)
    online = [policy.decide(g, i) / d for i, g in enumerate(seq)]
    lam = solve_multiplier([2 * math.log(g) for g in seq], [1.0] * n, rho * n, rho / 4, 4 * rho)
    best = [clamped_ratio(2 * math.log(g) - lam, rho / 4, 4 * rho) for g in seq]

    def term(r: list[float]) -> float:  # Σ ||g||²(1 − δ)/δ², constant learning rate
        return sum(g * g * (1 - x) / x**2 for g, x in zip(seq, r, strict=True))

    q = quarters(online)
    const = term([rho] * n)
    return term(online) / const, term(best) / const, q[0] / q[3], sum(online) / n


def dq_row(seq: list[float], mean_bits: float = 4.0) -> tuple[list[float], list[float]]:
    policy = DQPolicy(mean_bits=mean_bits)
    policy.setup(0, len(seq))
    online = [policy.decide(g, i) for i, g in enumerate(seq)]
    lo, hi = -60.0, 60.0  # the one t that meets the budget in hindsight (bisection on log2 t)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        mean = sum(policy.bits_for(g, 2.0**mid) for g in seq) / len(seq)
        lo, hi = (mid, hi) if mean < mean_bits else (lo, mid)
    return quarters(online), quarters([policy.bits_for(g, 2.0**hi) for g in seq])


def span(values: list[float], fmt: str) -> str:
    lo, hi = min(values), max(values)
    return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else f"{lo:{fmt}}–{hi:{fmt}}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    print(f"N = {args.steps}, log-normal noise σ = {args.noise}, {args.seeds} seeds (ranges over seeds)\n")
    print("| norms `g_i`, `i < N` | bound term, online / constant K | hindsight optimum / constant K | "
          "K/d q1/q4 | mean K/d |")
    print("|---|---|---|---|---|")
    for name, shape in SHAPES.items():
        rows = [topk_row(norms(shape, args.steps, s, args.noise)) for s in range(args.seeds)]
        cols = list(zip(*rows, strict=True))
        print(f"| {name} | {span(cols[0], '.2f')} | {span(cols[1], '.2f')} | {span(cols[2], '.1f')} | "
              f"{span(cols[3], '.5f')} |")
    print("\n| norms (seed 0) | DQ bits by quarter (online) | one constant t in hindsight |")
    print("|---|---|---|")
    for name, shape in SHAPES.items():
        online, best = dq_row(norms(shape, args.steps, 0, args.noise))
        online_q, best_q = (" / ".join(f"{b:.2f}" for b in q) for q in (online, best))
        print(f"| {name} | {online_q} | {best_q} |")


if __name__ == "__main__":
    main()
