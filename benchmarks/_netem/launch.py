"""Worker processes: their configuration, their environment, and starting them (one per namespace).

A worker is ``python -m benchmarks._worker CONFIG.json``; it writes its report to the JSON path in
the configuration (``{rank}`` replaced by its ``NODE_RANK``). On a cluster it runs inside its
namespace with the torchrun-style environment (``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK``,
``LOCAL_RANK=0``, ``WORLD_SIZE``, ``GLOO_SOCKET_IFNAME``); the floor runs alone, without them.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

from benchmarks._cluster import LoopbackCluster, NamespaceCluster, wait_all
from benchmarks._netem import ROOT
from benchmarks._netem.grid import TASK_DEFAULTS
from benchmarks._netem.results import WorkerReport

Cluster = NamespaceCluster | LoopbackCluster
WORKER = [sys.executable, "-m", "benchmarks._worker"]


@dataclass
class WorkerConfig:
    """What ``benchmarks/_worker.py`` reads (its JSON keys are these fields)."""

    task: str
    task_kwargs: dict[str, float | int]
    steps: int
    eval_every: int
    seed: int
    bucket_cap_mb: float
    method: str = "floor"  # "floor": one process, no communication
    budget_s: float = 0.0  # 0: train every step
    decide_at: int = -1  # the step at which rank 0 decides when to stop (with a budget)
    period: int = 1  # the method's synchronization period
    warmup: int = 0
    isolated: bool = False  # in a namespace: read its interface counters
    out: str = ""  # the report's path; "{rank}" stands for the worker's rank
    straggler: tuple[int, float] | None = None  # (rank, ms): that rank sleeps ms before every step
    world: int = 1


def task_config(args: argparse.Namespace, task: str) -> WorkerConfig:
    """The configuration every run of ``task`` shares (method and schedule are set per run)."""
    kwargs: dict[str, float | int] = {}
    if args.batch_size:
        kwargs["batch_size"] = args.batch_size
    if args.lr:
        kwargs["lr"] = args.lr
    return WorkerConfig(
        task=task,
        task_kwargs=kwargs,
        steps=args.steps or TASK_DEFAULTS[task]["steps"],
        eval_every=args.eval_every or TASK_DEFAULTS[task]["eval_every"],
        seed=args.seed,
        bucket_cap_mb=args.bucket_cap_mb,
        straggler=args.straggler,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _single_threaded(env: dict[str, str]) -> dict[str, str]:
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    return env


def worker_env(cluster: Cluster, rank: int, world: int, port: int) -> dict[str, str]:
    # inherited launcher variables would make Lightning pick another cluster environment
    drop = ("RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_JOB_NAME")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(
        MASTER_ADDR=cluster.master_addr,
        MASTER_PORT=str(port),
        NODE_RANK=str(rank),
        LOCAL_RANK="0",
        WORLD_SIZE=str(world),
        GLOO_SOCKET_IFNAME=cluster.ifname,
    )
    return _single_threaded(env)


def floor_env() -> dict[str, str]:
    drop = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK")
    return _single_threaded({k: v for k, v in os.environ.items() if k not in drop})


@dataclass
class _Process:
    argv: list[str]
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen | None = field(default=None, repr=False)


def _run_all(processes: list[_Process], timeout: float) -> list[int | None]:
    """Start every process (output to its log), wait up to ``timeout`` s, kill what is left."""
    logs = []
    try:
        for p in processes:
            logs.append(open(p.log, "w"))
            p.popen = subprocess.Popen(p.argv, env=p.env, cwd=ROOT, stdout=logs[-1], stderr=subprocess.STDOUT)
        return wait_all([p.popen for p in processes if p.popen is not None], timeout)
    finally:
        for p in processes:  # only the processes started here, by their own handles
            if p.popen is not None and p.popen.poll() is None:
                p.popen.kill()
                p.popen.wait(10)
        for log in logs:
            log.close()


def _read_report(path: Path, error: Callable[[], str]) -> WorkerReport:
    """The report the worker wrote, else a failure saying ``error()``."""
    if path.exists():
        return WorkerReport.from_json(json.loads(path.read_text()))
    return WorkerReport.failed(error())


def launch(
    cluster: Cluster, cfg: WorkerConfig, world: int, port: int, timeout: float, workdir: Path
) -> list[WorkerReport]:
    """Start ``world`` workers (one per namespace), wait, and return their reports by rank."""
    cfg_path = workdir / f"run{port}.json"
    cfg = replace(cfg, out=str(workdir / f"run{port}.rank{{rank}}.json"), world=world)
    cfg_path.write_text(json.dumps(asdict(cfg)))
    argv = [*WORKER, str(cfg_path)]
    logs = [workdir / f"run{port}.rank{r}.log" for r in range(world)]
    processes = [
        _Process(cluster.command(r, argv), worker_env(cluster, r, world, port), logs[r])
        if world > 1
        else _Process(argv, floor_env(), logs[r])
        for r in range(world)
    ]
    codes = _run_all(processes, timeout)

    def missing(r: int) -> str:
        status = "timeout" if codes[r] is None else f"exit {codes[r]}"
        return f"rank {r}: {status}, no report; log tail:\n{logs[r].read_text()[-3000:]}"

    return [_read_report(Path(cfg.out.format(rank=r)), partial(missing, r)) for r in range(world)]


def launch_alone(cfg: WorkerConfig, copies: int, workdir: Path, timeout: float) -> list[WorkerReport]:
    """``copies`` independent single-process workers at once (the floor), their reports."""
    processes, paths = [], []
    for i in range(copies):
        path = workdir / f"floor{cfg.task}{copies}_{i}.json"
        cfg_path = workdir / f"floor{cfg.task}{copies}_{i}.cfg.json"
        cfg_path.write_text(json.dumps(asdict(replace(cfg, out=str(path), world=1))))
        paths.append(path)
        processes.append(_Process([*WORKER, str(cfg_path)], floor_env(), Path(str(path) + ".log")))
    _run_all(processes, timeout)
    return [
        _read_report(path, lambda log=p.log: log.read_text()[-2000:])
        for path, p in zip(paths, processes, strict=True)
    ]
