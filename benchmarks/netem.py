#!/usr/bin/env python
"""Time-to-accuracy and bytes on the wire over an emulated slow network (issue #8).

One command runs every method side by side on the same emulated cluster and writes the report
(``docs/benchmarks.md``), its plots (``docs/benchmarks_*.png``) and the raw measurements
(``docs/benchmarks_results.json``)::

    sudo python benchmarks/netem.py                       # the default grid (long)
    sudo python benchmarks/netem.py --rates 10 100 --methods ddp powersgd4 qsgd4 localsgd8_q4
    python benchmarks/netem.py --quick                    # < 60 s smoke test (CI)
    python benchmarks/netem.py --report-only              # re-render from the JSON

The emulated cluster: ``N`` worker processes, each in its own network namespace
(``lcbench-<pid>-w<r>``) with one veth (``eth0``, ``10.213.0.<r+1>/24``) on a bridge that lives
in another namespace of the benchmark's own (``lcbench-<pid>-hub``); every link is limited in
both directions by ``tc`` tbf (and delayed by netem with ``--delay-ms`` where the kernel has it).
Workers start as ``ip netns exec NS python -m benchmarks._worker`` with the torchrun-style
environment (``MASTER_ADDR`` = rank 0's address, ``MASTER_PORT``, ``NODE_RANK``,
``LOCAL_RANK=0``, ``WORLD_SIZE``, ``GLOO_SOCKET_IFNAME=eth0``), so Lightning sees
``num_nodes=N, devices=1``. The namespaces are deleted at the end, on error and on Ctrl-C;
``--cleanup`` removes any left by a run killed with SIGKILL. Without root (or without
``ip netns``) everything runs on unthrottled loopback instead, and the report says so.

How each quantity is measured:

- *step time*: rank 0's wall time per optimizer step, mean over the steps after a warm-up
  (a whole number of synchronization periods); *x floor*: divided by the same model's step time
  in one process with no communication (``floor``);
- *accuracy*: rank 0 snapshots its parameters every ``--eval-every`` steps (the clock is paused
  for the copy); the snapshots are evaluated on held-out data after training, so evaluation
  never pauses the ranks (a pause would hand asynchronous methods free communication time);
- *time to target*: the training clock at the first snapshot whose accuracy reaches the target.
  Runs that cannot reach it within ``--budget`` seconds (stock DDP at 10 Mbit/s needs hours)
  stop early by a decision rank 0 broadcasts once; their time to target is *projected* (marked
  ``≈``): the method's own accuracy-per-step curve from its longest run (accuracy does not depend
  on the link) times this link's measured time per step;
- *bytes*: each worker's interface ``tx_bytes`` (read inside its namespace) over the training
  window, against what the method reports: CompressedDDP's ``BitLedger.wire_bytes``, the bytes
  torch's hooks hand to ``dist.all_reduce`` (ring model ``2(W-1)/W``), or stock DDP's float32
  gradient (same model).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

from benchmarks._cluster import (  # noqa: E402
    LoopbackCluster,
    NamespaceCluster,
    netem_available,
    netns_available,
    stale_namespaces,
    wait_all,
)
from benchmarks._machine import machine_description  # noqa: E402
from benchmarks._methods import DEFAULT_METHODS, get_method, methods  # noqa: E402

LOOPBACK = "loopback"
TASK_DEFAULTS = {  # steps, eval_every, batch
    "mlp": {"steps": 480, "eval_every": 24},
    "digits": {"steps": 240, "eval_every": 24},
    "tiny": {"steps": 16, "eval_every": 8},
}


# -- command line ---------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    unknown = [k for g in grids for k in g["methods"] if not _known(k)]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {list(methods())}")
    for rate in [r for g in grids for r in g["rates"]]:
        if rate not in (LOOPBACK, "inf") and not _is_positive_float(rate):
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


def _is_positive_float(s: str) -> bool:
    try:
        return float(s) > 0
    except ValueError:
        return False


def _rate_value(rate: str) -> float | None:
    return None if rate in (LOOPBACK, "inf") else float(rate)


def rate_label(rate: str) -> str:
    if rate == LOOPBACK:
        return "loopback"
    if rate == "inf":
        return "unlimited veth"
    v = float(rate)
    return f"{v / 1000:g} Gbit/s" if v >= 1000 else f"{v:g} Mbit/s"


# -- running ----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker_env(cluster: Any, rank: int, world: int, port: int) -> dict[str, str]:
    env = dict(os.environ)
    for key in (
        "RANK",
        "LOCAL_WORLD_SIZE",
        "GROUP_RANK",
        "TORCHELASTIC_RUN_ID",
        "SLURM_NTASKS",
        "SLURM_JOB_NAME",
    ):
        env.pop(
            key, None
        )  # inherited launcher variables would make Lightning pick another cluster environment
    env.update(
        MASTER_ADDR=cluster.master_addr,
        MASTER_PORT=str(port),
        NODE_RANK=str(rank),
        LOCAL_RANK="0",
        WORLD_SIZE=str(world),
        GLOO_SOCKET_IFNAME=cluster.ifname,
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        PYTHONWARNINGS="ignore",
    )
    return env


def launch(
    cluster: Any, cfg: dict[str, Any], world: int, port: int, timeout: float, workdir: Path
) -> list[dict]:
    """Start ``world`` workers (one per namespace), wait, and return their JSON reports by rank."""
    cfg_path = workdir / f"run{port}.json"
    cfg = dict(cfg, out=str(workdir / f"run{port}.rank{{rank}}.json"), world=world)
    cfg_path.write_text(json.dumps(cfg))
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        for r in range(world):
            log = open(workdir / f"run{port}.rank{r}.log", "w")
            logs.append(log)
            argv = [sys.executable, "-m", "benchmarks._worker", str(cfg_path)]
            env = _worker_env(cluster, r, world, port) if world > 1 else _floor_env()
            procs.append(
                subprocess.Popen(
                    cluster.command(r, argv) if world > 1 else argv,
                    env=env,
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        codes = wait_all(procs, timeout)
    finally:
        for p in procs:  # only the processes started here, by their own handles
            if p.poll() is None:
                p.kill()
                p.wait(10)
        for log in logs:
            log.close()
    reports = []
    for r in range(world):
        path = Path(cfg["out"].format(rank=r))
        if path.exists():
            reports.append(json.loads(path.read_text()))
        else:
            tail = (workdir / f"run{port}.rank{r}.log").read_text()[-3000:]
            status = "timeout" if codes[r] is None else f"exit {codes[r]}"
            reports.append({"status": "error", "error": f"rank {r}: {status}, no report; log tail:\n{tail}"})
    return reports


def _floor_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK")
    }
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    return env


def _task_cfg(args: argparse.Namespace, task: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if args.batch_size:
        kwargs["batch_size"] = args.batch_size
    if args.lr:
        kwargs["lr"] = args.lr
    steps = args.steps or TASK_DEFAULTS[task]["steps"]
    every = args.eval_every or TASK_DEFAULTS[task]["eval_every"]
    return {
        "task": task,
        "task_kwargs": kwargs,
        "steps": steps,
        "eval_every": every,
        "seed": args.seed,
        "bucket_cap_mb": args.bucket_cap_mb,
    }


def _warm(args: argparse.Namespace, period: int) -> int:
    return -(-args.warmup // period) * period


def parse_part(tokens: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """``task=mlp workers=2,4 rates=10,100 methods=ddp,qsgd4`` -> one sub-grid (unset keys: the flags)."""
    part: dict[str, Any] = {
        "tasks": list(args.tasks),
        "workers": list(args.workers),
        "rates": list(args.rates),
        "methods": list(args.methods),
    }
    names = {"task": "tasks", "tasks": "tasks", "workers": "workers", "rates": "rates", "methods": "methods"}
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep or key not in names or not value:
            raise ValueError(f"--part: {token!r} is not one of task=..., workers=..., rates=..., methods=...")
        values = [v for v in value.split(",") if v]
        part[names[key]] = [int(v) for v in values] if key == "workers" else values
    return part


def _full_rate(rates: list[str], choice: str) -> str:
    if choice in rates:
        return choice
    if LOOPBACK in rates:
        return LOOPBACK
    if "inf" in rates:
        return "inf"
    numeric = [r for r in rates if _rate_value(r) is not None]
    return max(numeric, key=lambda r: float(r)) if numeric else rates[0]


def _loadavg() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _floor(
    args: argparse.Namespace,
    base: dict[str, Any],
    task: str,
    parallel: int,
    workdir: Path,
    log: Any,
    when: str = "start",
) -> dict[str, Any]:
    # the floor: no communication; parallel > 1 runs that many independent copies at once (what N
    # workers' compute costs on this machine's cores, with no network)
    cfg = dict(
        base,
        method="floor",
        steps=args.floor_steps,
        decide_at=-1,
        budget_s=0,
        isolated=False,
        warmup=args.warmup,
    )
    reports = _run_floor(cfg, parallel, workdir, args.run_timeout)
    times = [
        f"{_mean(r['step_times'][args.warmup :]) * 1e3:.1f} ms/step"
        if r.get("status") == "ok"
        else r.get("status", "?")
        for r in reports
    ]
    log(f"[{task}] floor x{parallel} ({when}): " + ", ".join(times))
    return {"task": task, "parallel": parallel, "when": when, "reports": reports, "load": _loadavg()}


def run_grid(args: argparse.Namespace, log: Any) -> dict[str, Any]:
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
    parts = args.parts or [parse_part([], args)]
    result: dict[str, Any] = {
        "args": {k: v for k, v in vars(args).items()},
        "command": _command(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_description(),
        "network": {
            "namespaces": ok,
            "why": why,
            "delay_ms": args.delay_ms,
            "segment": not args.no_segment,
            "queue_ms": args.queue_ms,
            "full_at": [],
        },
        "elapsed_s": 0.0,
        "complete": False,
        "floors": [],
        "runs": [],
    }
    done: set[tuple[str, int, str, str]] = set()
    if args.resume and Path(args.json).exists():
        previous = json.loads(Path(args.json).read_text())
        redo = set(args.redo or [])

        def keep(r: dict[str, Any]) -> bool:
            keys = {
                r["rate"],
                f"{r['task']}:{r['world']}:{r['rate']}",
                f"{r['task']}:{r['world']}:{r['rate']}:{r['method']}",
            }
            return _ok(r) and not keys & redo

        result["runs"] = [r for r in previous["runs"] if keep(r)]
        result["floors"] = [
            f for f in previous["floors"] if f.get("when", "start") == "start" and "floor" not in redo
        ]
        result["date"], result["command"] = previous["date"], previous["command"]
        result["elapsed_s"] = previous.get("elapsed_s", 0.0)
        result["resumed_with"] = [*previous.get("resumed_with", []), _command()]
        done = {(r["task"], r["world"], r["rate"], r["method"]) for r in result["runs"]}
        log(f"resuming: {len(done)} completed runs kept from {args.json}")
    started = time.time() - float(result.get("elapsed_s", 0.0))

    def save() -> None:
        result["elapsed_s"] = time.time() - started
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result))

    with tempfile.TemporaryDirectory(prefix="lcbench-") as tmp:
        workdir = Path(tmp)
        port = 29600
        for part in parts:
            rates = list(dict.fromkeys(part["rates"])) if ok else [LOOPBACK]
            full_at = _full_rate(rates, args.full_at)
            result["network"]["full_at"].append(full_at)
            for task in part["tasks"]:
                base = _task_cfg(args, task)
                for parallel in sorted({1, *part["workers"]}):
                    if parallel > 1 and args.quick:
                        continue
                    if not any(f["task"] == task and f["parallel"] == parallel for f in result["floors"]):
                        result["floors"].append(_floor(args, base, task, parallel, workdir, log))
                        save()
                for world in part["workers"]:
                    for rate in rates:
                        todo = [k for k in part["methods"] if (task, world, rate, k) not in done]
                        if not todo:
                            continue
                        cluster = (
                            LoopbackCluster(world)
                            if rate == LOOPBACK or not ok
                            else NamespaceCluster(
                                world,
                                _rate_value(rate),
                                delay_ms=args.delay_ms,
                                segment=not args.no_segment,
                                queue_ms=args.queue_ms,
                            )
                        )
                        with cluster:
                            log(f"[{task}] {world} workers, {rate_label(rate)}: {cluster.describe()}")
                            for key in todo:
                                port += 1
                                run = _run_method(
                                    args, cluster, base, task, world, rate, key, full_at, port, workdir, ok
                                )
                                if run is not None:
                                    result["runs"].append(run)
                                    done.add((task, world, rate, key))
                                    save()
                                    log("   " + _one_line(run))
        if not args.quick:
            # the floor again at the end: a drift between the two says the machine's load changed
            for task in dict.fromkeys(t for part in parts for t in part["tasks"]):
                result["floors"].append(_floor(args, _task_cfg(args, task), task, 1, workdir, log, "end"))
    result["complete"] = True
    save()
    return result


def _run_method(
    args: argparse.Namespace,
    cluster: Any,
    base: dict[str, Any],
    task: str,
    world: int,
    rate: str,
    key: str,
    full_at: str,
    port: int,
    workdir: Path,
    ok: bool,
) -> dict[str, Any] | None:
    method = get_method(key)
    steps = (base["steps"] // method.period) * method.period
    if steps < method.period:
        print(f"   {key}: skipped, --steps {base['steps']} < period {method.period}", flush=True)
        return None
    budget = 0.0 if rate == full_at else args.budget
    warm = _warm(args, method.period)
    cfg = dict(
        base,
        steps=steps,
        method=key,
        budget_s=budget,
        decide_at=warm + max(2 * method.period, 4),
        period=method.period,
        warmup=warm,
        isolated=cluster.isolated,
    )
    t0 = time.time()
    load = _loadavg()
    run_port = port if cluster.isolated else _free_port()
    reports = launch(cluster, cfg, world, run_port, args.run_timeout, workdir)
    return {
        "task": task,
        "world": world,
        "rate": rate,
        "method": key,
        "label": method.label,
        "family": method.family,
        "period": method.period,
        "full": rate == full_at,
        "isolated": cluster.isolated,
        "warmup": warm,
        "started": datetime.datetime.fromtimestamp(t0).astimezone().isoformat(timespec="seconds"),
        "wall_s": time.time() - t0,
        "load": [load, _loadavg()],
        "reports": reports,
    }


def _run_floor(cfg: dict[str, Any], parallel: int, workdir: Path, timeout: float) -> list[dict]:
    procs, paths, logs = [], [], []
    try:
        for i in range(parallel):
            path = workdir / f"floor{cfg['task']}{parallel}_{i}.json"
            paths.append(path)
            c = dict(cfg, out=str(path), world=1)
            cfg_path = workdir / f"floor{cfg['task']}{parallel}_{i}.cfg.json"
            cfg_path.write_text(json.dumps(c))
            logs.append(open(str(path) + ".log", "w"))
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "benchmarks._worker", str(cfg_path)],
                    env=_floor_env(),
                    cwd=ROOT,
                    stdout=logs[-1],
                    stderr=subprocess.STDOUT,
                )
            )
        wait_all(procs, timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        for f in logs:
            f.close()
    out = []
    for path in paths:
        if path.exists():
            out.append(json.loads(path.read_text()))
        else:
            out.append({"status": "error", "error": Path(str(path) + ".log").read_text()[-2000:]})
    return out


def _command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


# -- analysis ---------------------------------------------------------------------------------
def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def _ok(run: dict[str, Any]) -> bool:
    return bool(run["reports"]) and all(r.get("status") == "ok" for r in run["reports"])


def _status(run: dict[str, Any]) -> str:
    bad = [r for r in run["reports"] if r.get("status") != "ok"]
    if not bad:
        return "ok"
    return bad[0].get("status", "error")


def mean_step(run: dict[str, Any]) -> float:
    """Rank 0's mean step time over whole periods after the warm-up."""
    times = run["reports"][0]["step_times"]
    warm, period = run["warmup"], run["period"]
    usable = ((len(times) - warm) // period) * period
    if usable <= 0:
        warm = min(len(times) - 1, max(0, len(times) // 4))
        usable = len(times) - warm
    return _mean(times[warm : warm + usable])


def floor_step(result: dict[str, Any], task: str, parallel: int = 1, when: str = "start") -> float:
    for f in result["floors"]:
        if f["task"] == task and f["parallel"] == parallel and f.get("when", "start") == when:
            warm = result["args"]["warmup"]
            vals = [_mean(r["step_times"][warm:]) for r in f["reports"] if r.get("status") == "ok"]
            return _mean(vals)
    return math.nan


def per_worker_bytes(run: dict[str, Any]) -> tuple[float | None, float | None, str]:
    """(interface tx bytes per step, reported wire bytes per step), mean over workers, and the source."""
    reps = run["reports"]
    steps = reps[0]["steps"] or 1
    tx = [r["tx_bytes"] for r in reps if r.get("tx_bytes") is not None]
    wire = [r["reported"].get("wire_bytes") for r in reps if r.get("reported")]
    source = reps[0].get("reported", {}).get("source", "")
    return (
        _mean(tx) / steps if tx else None,
        _mean([w for w in wire if w is not None]) / steps if wire else None,
        source,
    )


def reference_curve(result: dict[str, Any], run: dict[str, Any]) -> list[list[float]]:
    """The method's accuracy-per-step curve from its longest run (same task and workers)."""
    best: dict[str, Any] | None = None
    for other in result["runs"]:
        if (other["task"], other["world"], other["method"]) != (run["task"], run["world"], run["method"]):
            continue
        if not _ok(other) or "curve" not in other["reports"][0]:
            continue
        if best is None or other["reports"][0]["steps"] > best["reports"][0]["steps"]:
            best = other
    return best["reports"][0]["curve"] if best else []


def steps_to(curve: list[list[float]], target: float) -> int | None:
    for step, _clock, _tx, acc in curve:
        if acc >= target:
            return int(step)
    return None


def time_to_target(result: dict[str, Any], run: dict[str, Any], target: float) -> tuple[float | None, bool]:
    """(seconds, measured?) — measured on this run's own curve, else projected from the reference curve."""
    rep = run["reports"][0]
    for _step, clock, _tx, acc in rep.get("curve", []):
        if acc >= target:
            return float(clock), True
    need = steps_to(reference_curve(result, run), target)
    if need is None:
        return None, False
    warm = min(run["warmup"], len(rep["clock"]))
    base = rep["clock"][warm - 1] if warm else 0.0
    return base + mean_step(run) * (need - warm), False


def auto_target(result: dict[str, Any], task: str, world: int) -> float | None:
    spec = result["args"]["target"]
    if spec != "auto":
        return float(spec)
    finals = {}
    for run in result["runs"]:
        if run["task"] == task and run["world"] == world and _ok(run) and run["full"]:
            finals[run["method"]] = run["reports"][0]["curve"][-1][3]
    if not finals:
        return None
    base = finals.get("ddp", max(finals.values()))
    return round(base - 0.02, 4)


def final_accuracy(result: dict[str, Any], task: str, world: int, method: str) -> tuple[float | None, int]:
    best = None
    for run in result["runs"]:
        if (run["task"], run["world"], run["method"]) == (task, world, method) and _ok(run):
            rep = run["reports"][0]
            if rep.get("curve") and (best is None or rep["steps"] > best[1]):
                best = (rep.get("final_acc", rep["curve"][-1][3]), rep["steps"])
    return best if best else (None, 0)


def _one_line(run: dict[str, Any]) -> str:
    if not _ok(run):
        err = next((r.get("error", "") for r in run["reports"] if r.get("status") != "ok"), "")
        return f"{run['method']:>13}: {_status(run)}: {err.strip().splitlines()[-1] if err.strip() else ''}"
    rep = run["reports"][0]
    tx, wire, _ = per_worker_bytes(run)
    acc = rep["curve"][-1][3] if rep.get("curve") else math.nan
    txs = f"{tx / 1e6:.3f}" if tx is not None else "n/a"
    wires = f"{wire / 1e6:.3f}" if wire is not None else "n/a"
    return (
        f"{run['method']:>13}: {mean_step(run) * 1e3:8.1f} ms/step, {rep['steps']} steps, acc {acc:.4f}, "
        f"tx {txs} MB/step/worker, reported {wires} MB ({run['wall_s']:.0f} s)"
    )


# -- report -----------------------------------------------------------------------------------
def _fmt_s(x: float | None, measured: bool = True) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    s = f"{x:.3f}" if x < 10 else f"{x:.1f}" if x < 1000 else f"{x:.0f}"
    return s if measured else f"≈{s}"


def _fmt_mb(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x / 1e6:.3f}" if x < 1e8 else f"{x / 1e6:.0f}"


def _label(result: dict[str, Any], key: str) -> str:
    return next((r["label"] for r in result["runs"] if r["method"] == key), key)


def _family(result: dict[str, Any], key: str) -> str:
    return next((r["family"] for r in result["runs"] if r["method"] == key), "")


def _seen(result: dict[str, Any], task: str, world: int, field: str) -> list[str]:
    seen: list[str] = []
    for run in result["runs"]:
        if run["task"] == task and run["world"] == world and run[field] not in seen:
            seen.append(run[field])
    return seen


def _methods_in(result: dict[str, Any], task: str, world: int) -> list[str]:
    """The methods run, baselines first in the default order, then the extra combinations as run
    (a resumed or redone run appends to the results, so the order in the file is not a guide)."""
    seen = _seen(result, task, world, "method")
    order = {key: i for i, key in enumerate(DEFAULT_METHODS)}
    return sorted(seen, key=lambda k: (order.get(k, len(order)), seen.index(k)))


def _rates_in(result: dict[str, Any], task: str, world: int) -> list[str]:
    """The rates run: loopback, then unthrottled namespaces, then slowest to fastest."""
    rank = {LOOPBACK: -2.0, "inf": -1.0}
    return sorted(_seen(result, task, world, "rate"), key=lambda r: rank.get(r, _rate_value(r) or 0.0))


def _run(result: dict[str, Any], task: str, world: int, rate: str, method: str) -> dict[str, Any] | None:
    for run in result["runs"]:
        if (run["task"], run["world"], run["rate"], run["method"]) == (task, world, rate, method):
            return run
    return None


def check_targets(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The issue's targets, on the mlp task with 2 workers: (target, measured, verdict)."""
    task, world = "mlp", 2
    rows: list[tuple[str, str, str]] = []
    if not any(r["task"] == task and r["world"] == world for r in result["runs"]):
        return rows
    target = auto_target(result, task, world)
    floor = floor_step(result, task)
    ddp_acc, _ = final_accuracy(result, task, world, "ddp")

    def step(rate: str, m: str) -> float | None:
        run = _run(result, task, world, rate, m)
        return mean_step(run) if run and _ok(run) else None

    def tta(rate: str, m: str) -> float | None:
        run = _run(result, task, world, rate, m)
        return time_to_target(result, run, target)[0] if run and _ok(run) and target is not None else None

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("met" if ok else "**missed**")

    lc = [m for m in _methods_in(result, task, world) if _family(result, m) == "lightning_compress"]
    eligible = []
    for m in lc:
        acc, _ = final_accuracy(result, task, world, m)
        if acc is not None and ddp_acc is not None and acc >= ddp_acc - 0.005:
            eligible.append(m)
    for rate, bound in (("100", 1.3), ("10", 1.5)):
        cands = [(step(rate, m), m) for m in eligible if step(rate, m) is not None]
        if not cands or math.isnan(floor):
            rows.append(
                (
                    f"best config ≤ {bound}x floor at {rate} Mbit/s, accuracy within 0.5 pt of DDP",
                    "not run",
                    "n/a",
                )
            )
            continue
        best_t, best_m = min(cands)
        rows.append(
            (
                f"best config ≤ {bound}x floor at {rate} Mbit/s, accuracy within 0.5 pt of DDP",
                f"{_label(result, best_m)}: {best_t:.3f} s = {best_t / floor:.2f}x floor",
                verdict(best_t <= bound * floor),
            )
        )
    for rate, ratio, vs in (
        ("10", 1.5, "powersgd"),
        ("100", 1.0, "powersgd"),
        ("10", 10.0, "ddp"),
        ("100", 10.0, "ddp"),
    ):
        cands = [(tta(rate, m), m) for m in eligible if tta(rate, m) is not None]
        if vs == "powersgd":
            base = [t for t in (tta(rate, "powersgd1"), tta(rate, "powersgd4")) if t is not None]
            ref, name = (min(base), "best PowerSGD") if base else (None, "PowerSGD")
        else:
            ref, name = tta(rate, "ddp"), "stock DDP"
        label = f"time to target ≥ {ratio:g}x sooner than {name} at {rate} Mbit/s"
        if not cands or ref is None:
            rows.append((label, "not run / target not reached", "n/a"))
            continue
        best_t, best_m = min(cands)
        rows.append(
            (
                label,
                f"{_label(result, best_m)} {best_t:.1f} s vs {ref:.1f} s = {ref / best_t:.2f}x",
                verdict(ref / best_t >= ratio),
            )
        )
    ddp100 = step("100", "ddp")
    overlaps = [k for k in _methods_in(result, task, world) if k.startswith("overlap")]
    fastest_overlap = min(overlaps, key=lambda k: step("100", k) or math.inf) if overlaps else "overlap2"
    for m, ratio in (("qsgd4", 5.0), ("localsgd8_q4", 15.0), (fastest_overlap, 8.0)):
        t = step("100", m)
        label = f"{_label(result, m)} step ≥ {ratio:g}x faster than stock DDP at 100 Mbit/s"
        if t is None or ddp100 is None:
            rows.append((label, "not run", "n/a"))
        else:
            rows.append(
                (label, f"{ddp100:.3f} / {t:.3f} s = {ddp100 / t:.1f}x", verdict(ddp100 / t >= ratio))
            )
    t8, td = step(LOOPBACK, "qsgd8"), step(LOOPBACK, "ddp")
    label = "loopback: QSGD 8-bit adds ≤ 25% per step over stock DDP"
    rows.append(
        (
            label,
            "not run"
            if t8 is None or td is None
            else f"{t8:.4f} vs {td:.4f} s = +{(t8 / td - 1) * 100:.0f}%",
            "n/a" if t8 is None or td is None else verdict(t8 <= 1.25 * td),
        )
    )
    return rows


def render(result: dict[str, Any], out: Path, plots: list[str]) -> str:
    m = result["machine"]
    net = result["network"]
    lines = [
        "# Benchmark: time to accuracy and bytes on the wire over an emulated slow network",
        "",
        "Generated by `benchmarks/netem.py` (issue #8); every number below was measured in the run "
        "described here.",
        "",
        "```",
        result["command"],
        *(f"{c}   # resumed after an interruption" for c in result.get("resumed_with", [])),
        "```",
        "",
        f"- **Date:** {result['date']} (run took {result['elapsed_s'] / 60:.1f} min)",
        f"- **Machine:** {m['cpu']}, {m['cores']} cores, {m['mem_gib']:.0f} GiB RAM, "
        f"Linux {m['kernel']}, no GPU; "
        f"Python {m['python']}, torch {m['torch']}, pytorch-lightning {m['pytorch_lightning']}; "
        f"load average at start {', '.join(f'{x:.2f}' for x in m['loadavg'] or [])}; {_load_summary(result)}",
        "- **Network:** " + _describe_network(net),
        "- **Workers:** one process per worker, one thread each (`torch.set_num_threads(1)`), gloo, "
        "launched as "
        "`ip netns exec NS python -m benchmarks._worker` with `MASTER_ADDR`/`MASTER_PORT`/`NODE_RANK`/"
        "`LOCAL_RANK=0`/`WORLD_SIZE`/`GLOO_SOCKET_IFNAME=eth0` (Lightning: `num_nodes=N, devices=1`).",
        f"- **Runs:** {_describe_runs(result)}",
        "",
    ]
    targets = check_targets(result)
    if targets:
        lines += [
            "## The issue's targets (MLP, 2 workers, measured side by side in this run)",
            "",
            "| target | measured | verdict |",
            "|---|---|---|",
        ]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in targets]
        lines += [""]
    for task in dict.fromkeys(r["task"] for r in result["runs"]):
        for world in dict.fromkeys(r["world"] for r in result["runs"] if r["task"] == task):
            lines += _section(result, task, world, plots)
    lines += _notes(result)
    return "\n".join(lines) + "\n"


def _load_summary(result: dict[str, Any]) -> str:
    """The 1-minute load average seen at the start and end of every run (other jobs shared the machine)."""
    loads = sorted(x[0] for r in result["runs"] for x in r.get("load", []) if x)
    if not loads:
        return "load during runs not recorded"
    return (
        f"1-minute load average during the runs: median {loads[len(loads) // 2]:.1f}, "
        f"range {loads[0]:.1f}-{loads[-1]:.1f} (2 cores: above 2 means other jobs competed for the CPU)"
    )


def _describe_network(net: dict[str, Any]) -> str:
    if not net["namespaces"]:
        return (
            f"**unthrottled loopback fallback** ({net['why']}): rates not emulated, "
            "interface bytes not measured"
        )
    delay = f", +{net['delay_ms']:g} ms one-way netem delay" if net["delay_ms"] else ", no added delay"
    seg = ", one TCP segment per packet (`gso_max_segs 1`)" if net["segment"] else ", GSO super-packets"
    return (
        f"one network namespace per worker, veth `eth0` (MTU 1500{seg}) on a bridge in the benchmark's own "
        f"hub namespace; both directions of every link limited by `tc` tbf (burst max(32 KiB, 2 ms), "
        f"queue {net.get('queue_ms', 20):g} ms){delay}"
    )


def _describe_runs(result: dict[str, Any]) -> str:
    a = result["args"]
    parts = []
    for task in dict.fromkeys(r["task"] for r in result["runs"]):
        for world in dict.fromkeys(r["world"] for r in result["runs"] if r["task"] == task):
            rates = ", ".join(rate_label(r) for r in _rates_in(result, task, world))
            parts.append(f"{task}, {world} workers: {rates}; {len(_methods_in(result, task, world))} methods")
    text = "; ".join(parts) + "."
    full_at = result["network"]["full_at"]
    full = ", ".join(rate_label(r) for r in dict.fromkeys([full_at] if isinstance(full_at, str) else full_at))
    if a["budget"]:
        text += (
            f" Runs at {full} train every method for the full number of steps (its accuracy curve); "
            f"elsewhere a run stops after about {a['budget']:g} s of training (projected times ≈)."
        )
    else:
        text += " No time budget: every run trains the full number of steps."
    return text


def _section(result: dict[str, Any], task: str, world: int, plots: list[str]) -> list[str]:
    target = auto_target(result, task, world)
    floor = floor_step(result, task)
    floor_n = floor_step(result, task, world)
    floor_end = floor_step(result, task, 1, "end")
    rates = _rates_in(result, task, world)
    names = {
        "mlp": "MLP 64→2048→2048→10 (4.35 M parameters), linear-teacher task",
        "digits": "scikit-learn digits CNN",
        "tiny": "tiny MLP 64→256→256→10 (quick mode)",
    }
    lines = [f"## {names.get(task, task)}, {world} workers", ""]
    lines.append(
        f"Floor (one process, no communication): **{floor * 1e3:.1f} ms/step**"
        + (f"; {world} independent processes at once: {floor_n * 1e3:.1f} ms/step" if world > 1 else "")
        + (
            f"; one process again at the end of the run: {floor_end * 1e3:.1f} ms/step"
            if not math.isnan(floor_end)
            else ""
        )
        + (
            f". Target accuracy: **{target:.4f}** (stock DDP's final accuracy − 2 points)"
            if result["args"]["target"] == "auto" and target is not None
            else f". Target accuracy: **{target}**"
            if target is not None
            else ""
        )
        + "."
    )
    lines += [
        "",
        "Step time in seconds (× floor) and time to target accuracy in seconds (≈: projected from "
        "the method's accuracy-per-step curve and this link's measured step time). Final accuracy after "
        "the full run.",
        "",
    ]
    head = "| method | final acc (steps) | steps to target |" + "".join(
        f" {rate_label(r)}: s/step (× floor) | {rate_label(r)}: time to target |" for r in rates
    )
    lines += [head, "|" + "---|" * (3 + 2 * len(rates))]
    for key in _methods_in(result, task, world):
        label = _label(result, key)
        acc, steps = final_accuracy(result, task, world, key)
        any_run = next(
            (r for r in result["runs"] if (r["task"], r["world"], r["method"]) == (task, world, key)), None
        )
        need = steps_to(reference_curve(result, any_run), target) if any_run and target is not None else None
        cells = [label, f"{acc:.4f} ({steps})" if acc is not None else "—", str(need) if need else "—"]
        for rate in rates:
            run = _run(result, task, world, rate, key)
            if run is None:
                cells += ["not run", ""]
            elif not _ok(run):
                cells += [_status(run), ""]
            else:
                t = mean_step(run)
                tt, measured = time_to_target(result, run, target) if target is not None else (None, True)
                cells += [f"{t:.3f} ({t / floor:.1f}×)", _fmt_s(tt, measured)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Bytes per step per worker, in MB: the interface's `tx_bytes` (inside the worker's namespace) | "
        "what the method reports (ledger / counted allreduce / dense model) | their ratio.",
        "",
    ]
    head = "| method | reported by |" + "".join(
        f" {rate_label(r)}: interface / reported (ratio) |" for r in rates
    )
    lines += [head, "|" + "---|" * (2 + len(rates))]
    for key in _methods_in(result, task, world):
        label = _label(result, key)
        cells = [label, ""]
        for rate in rates:
            run = _run(result, task, world, rate, key)
            if run is None or not _ok(run):
                cells.append("—")
                continue
            tx, wire, source = per_worker_bytes(run)
            cells[1] = cells[1] or source
            ratio = f" ({tx / wire:.3f})" if tx is not None and wire else ""
            cells.append(f"{_fmt_mb(tx)} / {_fmt_mb(wire)}{ratio}")
        lines.append("| " + " | ".join(cells) + " |")
    mine = [p for p in plots if f"_{task}_w{world}_" in p]
    if mine:
        lines += [""]
        lines += [f"![accuracy vs time and bytes, {task}, {world} workers]({Path(p).name})" for p in mine]
    failed = [r for r in result["runs"] if r["task"] == task and r["world"] == world and not _ok(r)]
    if failed:
        lines += ["", "Runs that did not complete:", ""]
        for r in failed:
            err = next((x.get("error", "") for x in r["reports"] if x.get("status") != "ok"), "").strip()
            last = err.splitlines()[-1] if err else ""
            lines.append(f"- {r['method']} at {rate_label(r['rate'])}: {_status(r)} — `{last[:300]}`")
    lines.append("")
    return lines


def curve_agreement(result: dict[str, Any]) -> dict[str, float]:
    """Per method: the largest accuracy difference between its runs at different rates, at common steps.

    Projected times to target assume that a method's accuracy per step does not depend on the link;
    synchronous methods are deterministic (the same seed gives the same model at every rate).
    """
    out: dict[str, float] = {}
    groups: dict[tuple[str, int, str], list[dict[int, float]]] = {}
    for run in result["runs"]:
        if _ok(run) and run["reports"][0].get("curve"):
            curve = {int(c[0]): c[3] for c in run["reports"][0]["curve"]}
            groups.setdefault((run["task"], run["world"], run["method"]), []).append(curve)
    for (task, world, method), curves in groups.items():
        worst = 0.0
        for i in range(len(curves)):
            for j in range(i + 1, len(curves)):
                common = set(curves[i]) & set(curves[j])
                worst = max([worst, *(abs(curves[i][k] - curves[j][k]) for k in common)])
        if len(curves) > 1:
            out[f"{task}/{world}/{method}"] = worst
    return out


def _link_use(result: dict[str, Any]) -> str:
    """What the emulated links delivered: interface bytes per step over step time, by method."""
    parts = []
    for task, world in dict.fromkeys((r["task"], r["world"]) for r in result["runs"]):
        for rate in _rates_in(result, task, world):
            nominal = _rate_value(rate)
            if nominal is None:
                continue
            shown = []
            for key in ("ddp", "qsgd4"):
                run = _run(result, task, world, rate, key)
                tx = per_worker_bytes(run)[0] if run and _ok(run) else None
                if tx:
                    mb_s = tx / mean_step(run) / 1e6
                    shown.append(f"{_label(result, key)} {mb_s:.1f} MB/s ({mb_s * 8 / nominal:.0%})")
            if shown:
                parts.append(f"{task}, {world} workers, {rate_label(rate)}: " + ", ".join(shown))
    return "; ".join(parts)


def _notes(result: dict[str, Any]) -> list[str]:
    agreement = curve_agreement(result)
    lines = []
    if agreement:
        sync = {k: v for k, v in agreement.items() if "overlap" not in k}
        asyn = {k: v for k, v in agreement.items() if "overlap" in k}
        lines += [
            "## Check: accuracy per step does not depend on the link",
            "",
            "Projected times to target (≈) use a method's accuracy-per-step curve from its longest run. "
            "Largest accuracy difference between runs of the same method at different rates, at common "
            f"steps: synchronous methods {max(sync.values(), default=0) * 100:.2f} points"
            + (f"; Overlap-Local-SGD (asynchronous) {max(asyn.values()) * 100:.2f} points" if asyn else "")
            + ".",
            "",
        ]
    return lines + [
        "## How to read this",
        "",
        "- **Interface bytes vs reported bytes.** The interface counts whole Ethernet frames: "
        "14 B Ethernet + 20 B IP + 32 B TCP (with timestamps) on every ≤1448-byte segment (+4.6 %), "
        "the ACKs this worker sends "
        "for what it receives (a ring allreduce receives as much as it sends: about +2 %), gloo's message "
        "headers, Lightning's per-step 8-byte SIGTERM broadcast and the benchmark's one stop-decision "
        "broadcast. "
        "Retransmissions after tbf drops come on top. A ratio of 1.05-1.08 is protocol overhead; the ledger "
        "counts payload bytes under the ring/pairwise model gloo uses.",
        "- **Stock DDP** registers no comm hook (Lightning registers hooks only on CUDA); torch's fp16 and "
        "PowerSGD hooks are registered by the benchmark's `TorchHookDDP` on CPU. PowerSGD runs with "
        "`start_powerSGD_iter=2` (its two first steps are plain float32 allreduce, counted in its time to "
        "target), error feedback and warm start, one DDP bucket (`bucket_cap_mb=256`: it fails on gloo with "
        "several). Every method uses the same single bucket.",
        *(
            [
                "- **What the links delivered** (interface bytes per step / step time, as a share of the "
                "nominal rate; the step also computes, so this is a lower bound on the link's speed): "
                + link_use
                + ". Stock DDP sends one large allreduce per step; QSGD's exchange is two smaller "
                "collectives (all-to-all of shards, then all-gather) with decoding and re-encoding "
                "between them, which tends to leave the link idle part of the time (not profiled further)."
                + (
                    " Where even DDP falls far short of the nominal rate (1 Gbit/s here), the emulation "
                    "itself is the limit: veth, bridge and tbf handle every 1448-byte segment in softirq on "
                    "the same cores that train, so those runs are most likely CPU-bound (not profiled) and "
                    "understate what a real link of that rate gives every method."
                    if any(r["rate"] == "1000" for r in result["runs"])
                    else ""
                ),
            ]
            if (link_use := _link_use(result))
            else []
        ),
        "- **Local SGD** recommendations: near-IID data (as here) favours local steps; with "
        "heterogeneous data "
        "minibatch SGD has the better guarantees (Woodworth et al., arXiv 2006.04735).",
        "- **Noise.** The machine's two cores were shared with other jobs; the load average at start is "
        "in the "
        "header. Ratios between methods were measured side by side (interleaved in one run), which cancels "
        "slow drifts but not bursts.",
        "",
    ]


def make_plots(result: dict[str, Any], out_dir: Path, stem: str) -> list[str]:
    """Accuracy vs training wall time and vs bytes per worker, one figure per task, workers and rate."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    colors = [*plt.cm.tab10.colors, *plt.cm.Dark2.colors, *plt.cm.Set1.colors]
    paths = []
    for task in dict.fromkeys(r["task"] for r in result["runs"]):
        for world in dict.fromkeys(r["world"] for r in result["runs"] if r["task"] == task):
            target = auto_target(result, task, world)
            for rate in _rates_in(result, task, world):
                fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(14, 5.2))
                counted = False
                for i, key in enumerate(_methods_in(result, task, world)):
                    run = _run(result, task, world, rate, key)
                    if run is None or not _ok(run) or "curve" not in run["reports"][0]:
                        continue
                    color = colors[i % len(colors)]
                    style = "-." if run["family"] == "baseline" else "-"
                    marker = "s" if run["family"] == "baseline" else "o"
                    label = _label(result, key)
                    curve = [c for c in run["reports"][0]["curve"] if c[0] > 0]  # log axes: no step 0
                    tx, wire, _ = per_worker_bytes(run)
                    per_step = tx if tx is not None else wire
                    counted = counted or tx is not None
                    ys = [c[3] for c in curve]
                    xs_b = [(c[2] if c[2] is not None else (per_step or 0) * c[0]) / 1e6 for c in curve]
                    kw = dict(color=color, ls=style, marker=marker, ms=2.5, lw=1.3)
                    ax_t.plot([c[1] for c in curve], ys, label=label, **kw)
                    ax_b.plot(xs_b, ys, label=label, **kw)
                    ref = [c for c in reference_curve(result, run) if c[0] > 0]
                    if curve and ref and ref[-1][0] > curve[-1][0]:  # projected continuation
                        rep = run["reports"][0]
                        warm = min(run["warmup"], len(rep["clock"]))
                        base = rep["clock"][warm - 1] if warm else 0.0
                        rest = [c for c in ref if c[0] >= curve[-1][0]]
                        xs = [base + mean_step(run) * (c[0] - warm) for c in rest]
                        ax_t.plot(xs, [c[3] for c in rest], ":", color=color, lw=1.3)
                        if per_step:
                            ax_b.plot(
                                [per_step * c[0] / 1e6 for c in rest],
                                [c[3] for c in rest],
                                ":",
                                color=color,
                                lw=1.3,
                            )
                for ax in (ax_t, ax_b):
                    ax.set_xscale("log")
                    ax.set_ylabel("held-out accuracy (rank 0)")
                    ax.grid(True, which="both", alpha=0.3)
                    if target is not None:
                        ax.axhline(target, color="k", lw=0.8, ls="--")
                ax_t.set_xlabel("training wall time (s)")
                what = "interface tx counter" if counted else "reported by the method"
                ax_b.set_xlabel(f"MB sent per worker ({what})")
                ax_t.set_title(f"{task}, {world} workers, {rate_label(rate)}: accuracy vs time")
                ax_b.set_title("accuracy vs bytes (dotted: projected; dashed line: target)")
                ax_b.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
                fig.tight_layout()
                path = out_dir / f"{stem}_{task}_w{world}_{rate.replace('.', 'p')}.png"
                fig.savefig(path, dpi=100)
                plt.close(fig)
                paths.append(str(path))
    return paths


# -- main -------------------------------------------------------------------------------------
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
        result = json.loads(Path(args.json).read_text())
    else:
        result = run_grid(args, log)
    out.parent.mkdir(parents=True, exist_ok=True)
    plots = [] if args.no_plots else make_plots(result, out.parent, out.stem)
    out.write_text(render(result, out, plots))
    for a, b, c in check_targets(result):
        log(f"  {c:>10}  {a}: {b}")
    log(f"report: {out}" + (f", plots: {', '.join(plots)}" if plots else "") + f", raw: {args.json}")
    failed = [r for r in result["runs"] if not _ok(r) and _status(r) != "unavailable"]
    if failed:
        log(
            f"{len(failed)} runs failed: "
            + ", ".join(f"{r['method']}@{rate_label(r['rate'])}" for r in failed)
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
