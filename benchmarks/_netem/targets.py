"""The issue's targets (#8), checked on the MLP task with 2 workers."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

from benchmarks._netem.analysis import auto_target, final_accuracy, floor_step, mean_step, time_to_target
from benchmarks._netem.grid import LOOPBACK
from benchmarks._netem.results import BenchmarkResult


class TargetCheck(NamedTuple):
    target: str
    measured: str
    verdict: str  # "met", "**missed**" or "n/a"


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**missed**")


def _best(
    label: str,
    candidates: list[tuple[float, str]],
    judge: Callable[[float, str], tuple[str, bool]] | None,
    missing: str,
) -> TargetCheck:
    """The row of the best (smallest) of (seconds, method): what ``judge`` says of it, and whether it
    meets the target; ``missing`` (n/a) without candidates or without a ``judge``."""
    if not candidates or judge is None:
        return TargetCheck(label, missing, "n/a")
    measured, met = judge(*min(candidates))
    return TargetCheck(label, measured, _verdict(met))


def _vs_floor(result: BenchmarkResult, floor: float, bound: float, t: float, m: str) -> tuple[str, bool]:
    return f"{result.label(m)}: {t:.3f} s = {t / floor:.2f}x floor", t <= bound * floor


def _vs_ref(result: BenchmarkResult, ref: float, ratio: float, t: float, m: str) -> tuple[str, bool]:
    return f"{result.label(m)} {t:.1f} s vs {ref:.1f} s = {ref / t:.2f}x", ref / t >= ratio


def check_targets(result: BenchmarkResult) -> list[TargetCheck]:
    task, world = "mlp", 2
    rows: list[TargetCheck] = []
    if not any(r.task == task and r.world == world for r in result.runs):
        return rows
    target = auto_target(result, task, world)
    floor = floor_step(result, task)
    ddp_acc, _ = final_accuracy(result, task, world, "ddp")

    def step(rate: str, m: str) -> float | None:
        run = result.find(task, world, rate, m)
        return mean_step(run) if run and run.ok else None

    def tta(rate: str, m: str) -> float | None:
        run = result.find(task, world, rate, m)
        return time_to_target(result, run, target).seconds if run and run.ok and target is not None else None

    methods = result.methods_in(task, world)
    lc = [m for m in methods if result.family(m) == "lightning_compress"]
    eligible = []
    for m in lc:
        acc, _ = final_accuracy(result, task, world, m)
        if acc is not None and ddp_acc is not None and acc >= ddp_acc - 0.005:
            eligible.append(m)
    for rate, bound in (("100", 1.3), ("10", 1.5)):
        rows.append(
            _best(
                f"best config ≤ {bound}x floor at {rate} Mbit/s, accuracy within 0.5 pt of DDP",
                [(t, m) for m in eligible if (t := step(rate, m)) is not None],
                None if math.isnan(floor) else partial(_vs_floor, result, floor, bound),
                "not run",
            )
        )
    for rate, ratio, vs in (
        ("10", 1.5, "powersgd"),
        ("100", 1.0, "powersgd"),
        ("10", 10.0, "ddp"),
        ("100", 10.0, "ddp"),
    ):
        if vs == "powersgd":
            base = [t for t in (tta(rate, "powersgd1"), tta(rate, "powersgd4")) if t is not None]
            ref, name = (min(base), "best PowerSGD") if base else (None, "PowerSGD")
        else:
            ref, name = tta(rate, "ddp"), "stock DDP"
        rows.append(
            _best(
                f"time to target ≥ {ratio:g}x sooner than {name} at {rate} Mbit/s",
                [(t, m) for m in eligible if (t := tta(rate, m)) is not None],
                None if ref is None else partial(_vs_ref, result, ref, ratio),
                "not run / target not reached",
            )
        )
    ddp100 = step("100", "ddp")
    overlaps = [k for k in methods if k.startswith("overlap")]
    fastest_overlap = min(overlaps, key=lambda k: step("100", k) or math.inf) if overlaps else "overlap2"
    for m, ratio in (("qsgd4", 5.0), ("localsgd8_q4", 15.0), (fastest_overlap, 8.0)):
        t = step("100", m)
        label = f"{result.label(m)} step ≥ {ratio:g}x faster than stock DDP at 100 Mbit/s"
        if t is None or ddp100 is None:
            rows.append(TargetCheck(label, "not run", "n/a"))
        else:
            rows.append(
                TargetCheck(
                    label, f"{ddp100:.3f} / {t:.3f} s = {ddp100 / t:.1f}x", _verdict(ddp100 / t >= ratio)
                )
            )
    t8, td = step(LOOPBACK, "qsgd8"), step(LOOPBACK, "ddp")
    label = "loopback: QSGD 8-bit adds ≤ 25% per step over stock DDP"
    if t8 is None or td is None:
        rows.append(TargetCheck(label, "not run", "n/a"))
    else:
        rows.append(
            TargetCheck(
                label, f"{t8:.4f} vs {td:.4f} s = +{(t8 / td - 1) * 100:.0f}%", _verdict(t8 <= 1.25 * td)
            )
        )
    return rows
