"""Run the grid: every part's floors and methods, each cluster set up once, saved after every run."""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from benchmarks._cluster import LoopbackCluster, NamespaceCluster, netem_available, netns_available
from benchmarks._machine import machine_description
from benchmarks._methods import get_method
from benchmarks._netem import ROOT
from benchmarks._netem.analysis import mean
from benchmarks._netem.grid import LOOPBACK, Part, full_rate, parse_part, rate_label, rate_value, warm_steps
from benchmarks._netem.launch import Cluster, WorkerConfig, free_port, launch, launch_alone, task_config
from benchmarks._netem.report import one_line
from benchmarks._netem.results import BenchmarkResult, Floor, Network, Run

Log = Callable[[str], None]


def command() -> str:
    """This invocation as a command line, from the repository root."""
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def loadavg() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _args_json(args: argparse.Namespace) -> dict:
    """The parsed options as the JSON records them (``parts`` as dicts)."""
    return {k: [asdict(p) for p in v] if k == "parts" and v else v for k, v in vars(args).items()}


def measure_floor(
    args: argparse.Namespace,
    base: WorkerConfig,
    parallel: int,
    workdir: Path,
    log: Log,
    when: str = "start",
) -> Floor:
    """The floor: no communication; ``parallel`` > 1 runs that many independent copies at once (what
    N workers' compute costs on this machine's cores, with no network)."""
    cfg = replace(
        base, method="floor", steps=args.floor_steps, decide_at=-1, budget_s=0.0, warmup=args.warmup
    )
    reports = launch_alone(cfg, parallel, workdir, args.run_timeout)
    times = [f"{mean(r.step_times[args.warmup :]) * 1e3:.1f} ms/step" if r.ok else r.status for r in reports]
    log(f"[{base.task}] floor x{parallel} ({when}): " + ", ".join(times))
    return Floor(task=base.task, parallel=parallel, when=when, reports=reports, load=loadavg())


def _resume(args: argparse.Namespace, result: BenchmarkResult, log: Log) -> set[tuple[str, int, str, str]]:
    """Keep the completed runs (but those ``--redo`` names) and start floors of ``args.json``."""
    previous = BenchmarkResult.load(args.json)
    redo = set(args.redo or [])

    def keep(r: Run) -> bool:
        keys = {r.rate, f"{r.task}:{r.world}:{r.rate}", f"{r.task}:{r.world}:{r.rate}:{r.method}"}
        return r.ok and not keys & redo

    result.runs = [r for r in previous.runs if keep(r)]
    result.floors = [f for f in previous.floors if f.when == "start" and "floor" not in redo]
    result.date, result.command = previous.date, previous.command
    result.elapsed_s = previous.elapsed_s
    result.resumed_with = [*(previous.resumed_with or []), command()]
    done = {(r.task, r.world, r.rate, r.method) for r in result.runs}
    log(f"resuming: {len(done)} completed runs kept from {args.json}")
    return done


def run_grid(args: argparse.Namespace, log: Log) -> BenchmarkResult:
    """Run every part of the grid; the results are saved to ``args.json`` after every run."""
    ok, why = (False, "--loopback given") if args.loopback else netns_available()
    if args.delay_ms and ok and not netem_available():
        raise SystemExit(
            "--delay-ms needs the netem qdisc, which this kernel lacks (CONFIG_NET_SCH_NETEM); "
            "run without --delay-ms"
        )
    if not ok:
        log(
            f"!! network namespaces unavailable ({why}): falling back to UNTHROTTLED LOOPBACK; "
            "rates are not emulated and interface bytes are not measured"
        )
    parts: list[Part] = args.parts or [parse_part([], args)]
    result = BenchmarkResult(
        args=_args_json(args),
        command=command(),
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        machine=machine_description(),
        network=Network(
            namespaces=ok,
            why=why,
            delay_ms=args.delay_ms,
            segment=not args.no_segment,
            queue_ms=args.queue_ms,
        ),
    )
    done: set[tuple[str, int, str, str]] = set()
    if args.resume and Path(args.json).exists():
        done = _resume(args, result, log)
    started = time.time() - result.elapsed_s

    def save() -> None:
        result.elapsed_s = time.time() - started
        result.save(args.json)

    with tempfile.TemporaryDirectory(prefix="lcbench-") as tmp:
        workdir = Path(tmp)
        port = 29600
        for part in parts:
            rates = list(dict.fromkeys(part.rates)) if ok else [LOOPBACK]
            full_at = full_rate(rates, args.full_at)
            result.network.full_at.append(full_at)
            for task in part.tasks:
                base = task_config(args, task)
                for parallel in sorted({1, *part.workers}):
                    if parallel > 1 and args.quick:
                        continue
                    if not any(f.task == task and f.parallel == parallel for f in result.floors):
                        result.floors.append(measure_floor(args, base, parallel, workdir, log))
                        save()
                for world in part.workers:
                    for rate in rates:
                        todo = [k for k in part.methods if (task, world, rate, k) not in done]
                        if not todo:
                            continue
                        cluster: Cluster = (
                            LoopbackCluster(world)
                            if rate == LOOPBACK or not ok
                            else NamespaceCluster(
                                world,
                                rate_value(rate),
                                delay_ms=args.delay_ms,
                                segment=not args.no_segment,
                                queue_ms=args.queue_ms,
                            )
                        )
                        with cluster:
                            log(f"[{task}] {world} workers, {rate_label(rate)}: {cluster.describe()}")
                            for key in todo:
                                port += 1
                                run = run_method(
                                    args, cluster, base, world, rate, key, full_at, port, workdir
                                )
                                if run is not None:
                                    result.runs.append(run)
                                    done.add((task, world, rate, key))
                                    save()
                                    log("   " + one_line(run))
        if not args.quick:
            # the floor again at the end: a drift between the two says the machine's load changed
            for task in dict.fromkeys(t for part in parts for t in part.tasks):
                result.floors.append(measure_floor(args, task_config(args, task), 1, workdir, log, "end"))
    result.complete = True
    save()
    return result


def run_method(
    args: argparse.Namespace,
    cluster: Cluster,
    base: WorkerConfig,
    world: int,
    rate: str,
    key: str,
    full_at: str,
    port: int,
    workdir: Path,
) -> Run | None:
    """One method on ``cluster``; None when ``--steps`` is shorter than its period."""
    method = get_method(key)
    steps = (base.steps // method.period) * method.period
    if steps < method.period:
        print(f"   {key}: skipped, --steps {base.steps} < period {method.period}", flush=True)
        return None
    warm = warm_steps(args.warmup, method.period)
    cfg = replace(
        base,
        steps=steps,
        method=key,
        budget_s=0.0 if rate == full_at else args.budget,
        decide_at=warm + max(2 * method.period, 4),
        period=method.period,
        warmup=warm,
        isolated=cluster.isolated,
    )
    t0 = time.time()
    load = loadavg()
    run_port = port if cluster.isolated else free_port()
    reports = launch(cluster, cfg, world, run_port, args.run_timeout, workdir)
    return Run(
        task=base.task,
        world=world,
        rate=rate,
        method=key,
        label=method.label,
        family=method.family,
        period=method.period,
        full=rate == full_at,
        isolated=cluster.isolated,
        warmup=warm,
        started=datetime.datetime.fromtimestamp(t0).astimezone().isoformat(timespec="seconds"),
        wall_s=time.time() - t0,
        load=[load, loadavg()],
        reports=reports,
    )
