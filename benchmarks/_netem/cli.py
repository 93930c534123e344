"""The command line: ``python benchmarks/netem.py [options]`` (``--help``), and ``main``."""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from benchmarks._cluster import stale_namespaces
from benchmarks._methods import DEFAULT_METHODS, get_method, methods
from benchmarks._netem import ROOT
from benchmarks._netem.grid import (
    LOOPBACK,
    TASK_DEFAULTS,
    UNLIMITED,
    is_positive_float,
    parse_part,
    rate_label,
)
from benchmarks._netem.plots import make_plots
from benchmarks._netem.report import render
from benchmarks._netem.results import BenchmarkResult
from benchmarks._netem.runner import run_grid
from benchmarks._netem.targets import check_targets


def _straggler(text: str) -> tuple[int, float]:
    """``RANK:MS`` -> ``(rank, ms)``."""
    try:
        rank, ms = text.split(":")
        out = (int(rank), float(ms))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--straggler takes RANK:MS (e.g. 3:300), got {text!r}") from None
    if out[0] < 1 or out[1] < 0:
        message = f"--straggler: RANK >= 1 (rank 0 measures) and MS >= 0, got {text!r}"
        raise argparse.ArgumentTypeError(message)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options; ``--quick`` fixes the grid, ``--part`` becomes a list of :class:`Part`."""
    p = argparse.ArgumentParser(
        prog="python benchmarks/netem.py",
        description="Benchmark lightning_compress against stock DDP and torch's comm hooks on an emulated "
        "slow network (network namespaces + tc tbf; needs root, else unthrottled loopback).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("grid")
    g.add_argument(
        "--tasks",
        nargs="+",
        default=["mlp"],
        choices=["mlp", "digits", "tiny"],
        help="mlp: 4.35M-parameter MLP 64-2048-2048-10 on a linear-teacher task (communication-heavy); "
        "digits: scikit-learn digits CNN (the examples' real task); tiny: 85k-parameter MLP (quick mode)",
    )
    g.add_argument(
        "--workers", nargs="+", type=int, default=[2], help="numbers of workers (one namespace each)"
    )
    g.add_argument(
        "--rates",
        nargs="+",
        default=["10", "100", "1000"],
        help="link rates in Mbit/s; 'inf' = namespaces without tbf; 'loopback' = 127.0.0.1, no namespaces",
    )
    g.add_argument(
        "--methods",
        nargs="+",
        default=DEFAULT_METHODS,
        metavar="METHOD",
        help=f"methods to compare, from: {', '.join(methods())}",
    )
    g.add_argument(
        "--part",
        dest="parts",
        nargs="+",
        action="append",
        metavar="KEY=VALUES",
        help="a sub-grid, repeatable, e.g. --part task=mlp workers=4 rates=100 methods=ddp,qsgd4 "
        "(unset keys take --tasks/--workers/--rates/--methods); replaces the single grid",
    )
    g.add_argument(
        "--delay-ms",
        type=float,
        default=0.0,
        help="one-way delay per link (netem; refused if the kernel lacks netem)",
    )
    r = p.add_argument_group("each run")
    r.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps of a full run (default per task: "
        + ", ".join(f"{k} {v['steps']}" for k, v in TASK_DEFAULTS.items())
        + ")",
    )
    r.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="steps between accuracy snapshots (a multiple of every method's period; default 24, tiny 8)",
    )
    r.add_argument(
        "--batch-size", type=int, default=None, help="per-worker batch (default: mlp 64, digits 32)"
    )
    r.add_argument(
        "--lr", type=float, default=None, help="SGD learning rate (default: mlp 0.02, digits 0.05)"
    )
    r.add_argument(
        "--warmup",
        type=int,
        default=4,
        help="steps left out of the mean step time (rounded up to a whole period)",
    )
    r.add_argument(
        "--budget",
        type=float,
        default=60.0,
        help="training seconds per run; a run that would take "
        "longer stops early and its time to target is projected (0: no limit)",
    )
    r.add_argument(
        "--full-at",
        default="auto",
        help="rate whose runs ignore --budget and give every method its whole accuracy curve ('auto': "
        "loopback if among the rates, else the fastest)",
    )
    r.add_argument(
        "--straggler",
        type=_straggler,
        default=None,
        metavar="RANK:MS",
        help="inject a straggler with slow compute: that rank sleeps MS milliseconds in every "
        "training step it computes, between forward and backward (a rank that skips a late step "
        "does not sleep); for backup workers: methods backup<b>[_<codec>], e.g. backup0_q4,backup1_q4",
    )
    r.add_argument("--run-timeout", type=float, default=1500.0, help="kill a run after this many seconds")
    r.add_argument("--floor-steps", type=int, default=64, help="steps of the single-process floor run")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument(
        "--bucket-cap-mb",
        type=float,
        default=256.0,
        help="DDP's bucket size for every method (256: one bucket; 25 is DDP's default, where "
        "communication overlaps backward; torch's PowerSGD hook needs one bucket on gloo)",
    )
    o = p.add_argument_group("output")
    o.add_argument(
        "--target",
        default="auto",
        help="target accuracy for time-to-target: a fraction, or 'auto' = "
        "stock DDP's final accuracy minus 2 points",
    )
    o.add_argument(
        "--out", default=None, help="report path (default docs/benchmarks.md; --quick: a temp dir)"
    )
    o.add_argument(
        "--json",
        default=None,
        help="raw results path (default: next to the report, <report stem>_results.json)",
    )
    o.add_argument(
        "--report-only", action="store_true", help="re-render the report from --json without running"
    )
    o.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    o.add_argument(
        "--redo",
        nargs="+",
        metavar="SPEC",
        help="with --resume: run these again: a rate ('loopback', '100'), 'TASK:WORKERS:RATE', "
        "'TASK:WORKERS:RATE:METHOD', or 'floor'",
    )
    o.add_argument(
        "--resume",
        action="store_true",
        help="keep the completed runs of an interrupted run from --json and run only the missing ones",
    )
    m = p.add_argument_group("modes")
    m.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: tiny model, 2 workers, 100 Mbit/s (or loopback), "
        "ddp vs QSGD 4-bit, 16 steps; < 60 s; writes to a temp dir unless --out is given",
    )
    m.add_argument("--loopback", action="store_true", help="force the unthrottled-loopback fallback")
    m.add_argument(
        "--no-segment",
        action="store_true",
        help="let veth carry 64 KiB GSO super-packets (cheaper on CPU; "
        "interface counters then count headers once per super-packet)",
    )
    m.add_argument(
        "--queue-ms",
        type=float,
        default=20.0,
        help="tbf queue depth in milliseconds of traffic at the link rate",
    )
    m.add_argument(
        "--cleanup",
        action="store_true",
        help="delete namespaces left by killed runs (lcbench-<dead pid>-*) and exit",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.tasks, args.workers, args.rates = ["tiny"], [2], ["100"]
        if args.methods == DEFAULT_METHODS:
            args.methods = ["ddp", "qsgd4"]
        args.steps, args.eval_every, args.warmup, args.floor_steps, args.budget = 16, 8, 4, 16, 0.0
        args.no_plots = args.no_plots or args.out is None
    try:
        args.parts = [parse_part(tokens, args) for tokens in args.parts] if args.parts else None
    except ValueError as err:
        p.error(str(err))
    grids = args.parts or [parse_part([], args)]
    unknown = [k for g in grids for k in g.methods if not _known(k)]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {list(methods())}")
    for rate in [r for g in grids for r in g.rates]:
        if rate not in (LOOPBACK, UNLIMITED) and not is_positive_float(rate):
            p.error(f"--rates: {rate!r} is not a positive number of Mbit/s, 'inf' or 'loopback'")
    if args.budget < 0:
        p.error("--budget must be >= 0")
    if args.out is None:
        args.out = (
            str(Path(tempfile.mkdtemp(prefix="lcbench-quick-")) / "benchmarks.md")
            if args.quick
            else str(ROOT / "docs" / "benchmarks.md")
        )
    if args.json is None:
        out = Path(args.out)
        args.json = str(out.with_name(out.stem + "_results.json"))
    return args


def _known(key: str) -> bool:
    try:
        get_method(key)
    except KeyError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cleanup:
        stale = stale_namespaces()
        for name in stale:
            subprocess.run(["ip", "netns", "del", name], check=False)
        print(f"removed {len(stale)} stale namespaces: {stale}")
        return 0

    def log(msg: str) -> None:
        print(msg, flush=True)

    out = Path(args.out)
    if args.report_only:
        result = BenchmarkResult.load(args.json)
    else:
        result = run_grid(args, log)
    out.parent.mkdir(parents=True, exist_ok=True)
    plots = [] if args.no_plots else make_plots(result, out.parent, out.stem)
    out.write_text(render(result, plots))
    for a, b, c in check_targets(result):
        log(f"  {c:>10}  {a}: {b}")
    log(f"report: {out}" + (f", plots: {', '.join(plots)}" if plots else "") + f", raw: {args.json}")
    failed = [r for r in result.runs if not r.ok and r.status != "unavailable"]
    if failed:
        log(f"{len(failed)} runs failed: " + ", ".join(f"{r.method}@{rate_label(r.rate)}" for r in failed))
    return 1 if failed else 0
