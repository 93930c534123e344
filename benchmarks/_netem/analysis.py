"""What the results say: step times, bytes per step, accuracy curves, times to target."""

from __future__ import annotations

import math
from typing import NamedTuple

from benchmarks._netem.results import BenchmarkResult, CurvePoint, Run


class WorkerBytes(NamedTuple):
    """Bytes per step per worker (mean over workers): the interface's and what the method reports."""

    tx: float | None  # interface tx_bytes (None: not measured, e.g. on loopback)
    wire: float | None  # what the method reports (ledger, counted allreduce or dense model)
    source: str  # where ``wire`` comes from


class TimeToTarget(NamedTuple):
    seconds: float | None  # None: the target is not reached, not even by the reference curve
    measured: bool  # False: projected from the method's reference curve


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def mean_step(run: Run) -> float:
    """Rank 0's mean step time over whole periods after the warm-up."""
    times = run.rank0.step_times
    warm, period = run.warmup, run.period
    usable = ((len(times) - warm) // period) * period
    if usable <= 0:
        warm = min(len(times) - 1, max(0, len(times) // 4))
        usable = len(times) - warm
    return mean(times[warm : warm + usable])


def floor_step(result: BenchmarkResult, task: str, parallel: int = 1, when: str = "start") -> float:
    """Mean step time of the floor (no communication) with ``parallel`` processes at once."""
    for f in result.floors:
        if f.task == task and f.parallel == parallel and f.when == when:
            warm = result.warmup
            return mean([mean(r.step_times[warm:]) for r in f.reports if r.ok])
    return math.nan


def per_worker_bytes(run: Run) -> WorkerBytes:
    reps = run.reports
    steps = reps[0].steps or 1
    tx = [r.tx_bytes for r in reps if r.tx_bytes is not None]
    wire = [r.reported.get("wire_bytes") for r in reps if r.reported]
    return WorkerBytes(
        mean(tx) / steps if tx else None,
        mean([w for w in wire if w is not None]) / steps if wire else None,
        reps[0].reported.get("source", ""),
    )


def reference_curve(result: BenchmarkResult, run: Run) -> list[CurvePoint]:
    """The method's accuracy-per-step curve from its longest run (same task and workers)."""
    best: Run | None = None
    for other in result.runs_of(run.task, run.world, run.method):
        if not other.ok or other.rank0.curve is None:
            continue
        if best is None or other.rank0.steps > best.rank0.steps:
            best = other
    return best.rank0.curve or [] if best else []


def steps_to(curve: list[CurvePoint], target: float) -> int | None:
    return next((int(p.step) for p in curve if p.acc >= target), None)


def time_to_target(result: BenchmarkResult, run: Run, target: float) -> TimeToTarget:
    """Measured on this run's own curve, else projected from the reference curve."""
    rep = run.rank0
    for p in rep.curve or []:
        if p.acc >= target:
            return TimeToTarget(float(p.clock), True)
    need = steps_to(reference_curve(result, run), target)
    if need is None:
        return TimeToTarget(None, False)
    return TimeToTarget(projected_clock(run, need), False)


def projected_clock(run: Run, step: int) -> float:
    """The training clock at ``step`` at this run's mean step time (from the end of its warm-up)."""
    rep = run.rank0
    warm = min(run.warmup, len(rep.clock))
    base = rep.clock[warm - 1] if warm else 0.0
    return base + mean_step(run) * (step - warm)


def auto_target(result: BenchmarkResult, task: str, world: int) -> float | None:
    """``--target``, or 'auto': stock DDP's final accuracy (else the best method's) minus 2 points."""
    spec = result.args["target"]
    if spec != "auto":
        return float(spec)
    finals = {}
    for run in result.runs:
        if run.task == task and run.world == world and run.ok and run.full and run.rank0.curve:
            finals[run.method] = run.rank0.curve[-1].acc
    if not finals:
        return None
    base = finals.get("ddp", max(finals.values()))
    return round(base - 0.02, 4)


def final_accuracy(result: BenchmarkResult, task: str, world: int, method: str) -> tuple[float | None, int]:
    """(final accuracy, steps) of the method's longest completed run; (None, 0) if none."""
    best = None
    for run in result.runs_of(task, world, method):
        if not run.ok:
            continue
        rep = run.rank0
        if rep.curve and (best is None or rep.steps > best[1]):
            best = (rep.final_acc if rep.final_acc is not None else rep.curve[-1].acc, rep.steps)
    return best if best else (None, 0)


def curve_agreement(result: BenchmarkResult) -> dict[str, float]:
    """Per method: the largest accuracy difference between its runs at different rates, at common steps.

    Projected times to target assume that a method's accuracy per step does not depend on the link;
    synchronous methods are deterministic (the same seed gives the same model at every rate).
    """
    out: dict[str, float] = {}
    groups: dict[tuple[str, int, str], list[dict[int, float]]] = {}
    for run in result.runs:
        if run.ok and run.rank0.curve:
            curve = {int(p.step): p.acc for p in run.rank0.curve}
            groups.setdefault((run.task, run.world, run.method), []).append(curve)
    for (task, world, method), curves in groups.items():
        worst = 0.0
        for i in range(len(curves)):
            for j in range(i + 1, len(curves)):
                common = set(curves[i]) & set(curves[j])
                worst = max([worst, *(abs(curves[i][k] - curves[j][k]) for k in common)])
        if len(curves) > 1:
            out[f"{task}/{world}/{method}"] = worst
    return out
