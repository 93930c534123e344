"""Launching and summarising ``benchmarks/papers.py`` experiments (no row-specific logic here).

:func:`launch` starts one :mod:`benchmarks._papers_worker` process per rank (inside the rank's
network namespace when the cluster has them, else on loopback), waits at most ``timeout``
seconds, kills only the processes it started, and returns each run's per-rank results.
"""

from __future__ import annotations

import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks._cluster import LoopbackCluster, wait_all

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- which lightning_compress the workers import ---------------------------------------------
_PACKAGE_PATH: str | None = None  # a directory holding a lightning_compress/ snapshot, or None


def _git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout
    return out.rstrip("\n")


def use_snapshot(ref: str | None, keep_in: Path) -> None:
    """Make the workers import ``lightning_compress`` as of git ``ref`` (None: the working tree).

    ``git archive`` only reads the repository: the working tree, the index and HEAD are untouched.
    Useful while the package is being edited: the results then belong to one commit.
    """
    global _PACKAGE_PATH
    if ref is None:
        _PACKAGE_PATH = None
        return
    keep_in.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "archive", "--format=tar", ref, "lightning_compress"],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(keep_in)], input=archive, check=True, timeout=60)
    _PACKAGE_PATH = str(keep_in)


def package_info(ref: str | None) -> dict[str, Any]:
    """What the workers ran: the commit, and the package files that differed from it."""
    head = _git("rev-parse", "--short", "HEAD").strip()
    if ref is not None:
        return {"source": f"git {ref} ({_git('rev-parse', '--short', ref).strip()})", "modified": []}
    dirty = [line[3:] for line in _git("status", "--porcelain", "--", "lightning_compress").splitlines()]
    return {"source": f"working tree on {head}", "modified": dirty}


def _env(cluster: Any, rank: int, world: int, port: int) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "RANK",
            "LOCAL_WORLD_SIZE",
            "GROUP_RANK",
            "TORCHELASTIC_RUN_ID",
            "SLURM_NTASKS",
            "SLURM_JOB_NAME",
        )
    }
    env.update(
        MASTER_ADDR=cluster.master_addr,
        MASTER_PORT=str(port),
        NODE_RANK=str(rank),
        LOCAL_RANK="0",
        WORLD_SIZE=str(world),
        GLOO_SOCKET_IFNAME=cluster.ifname,
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([p for p in (_PACKAGE_PATH, str(ROOT), env.get("PYTHONPATH")) if p]),
        PYTHONWARNINGS="ignore",
    )
    return env


def launch(
    runs: list[dict[str, Any]],
    world: int = 2,
    cluster: Any | None = None,
    timeout: float = 300.0,
    log: Any = print,
) -> dict[str, list[dict[str, Any]]]:
    """Run ``runs`` (in order, in the same ``world`` processes); ``{run name: [rank 0 result, ...]}``.

    A run that did not finish (error, timeout) has ``{"status": "error", "error": ...}`` entries.
    """
    cluster = cluster or LoopbackCluster(world)
    port = free_port() if not getattr(cluster, "isolated", False) else 29400 + os.getpid() % 500
    with tempfile.TemporaryDirectory(prefix="lcpapers-") as tmp:
        work = Path(tmp)
        cfg_path = work / "cfg.json"
        cfg_path.write_text(json.dumps({"runs": runs, "out": str(work / "rank{rank}.json")}))
        procs: list[subprocess.Popen] = []
        logs = []
        t0 = time.time()
        try:
            for r in range(world):
                f = open(work / f"rank{r}.log", "w")
                logs.append(f)
                argv = [sys.executable, "-m", "benchmarks._papers_worker", str(cfg_path)]
                procs.append(
                    subprocess.Popen(
                        # cwd outside the repository: `python -m` puts the cwd first on sys.path,
                        # which would shadow a snapshot of the package
                        cluster.command(r, argv),
                        env=_env(cluster, r, world, port),
                        cwd=tmp,
                        stdout=f,
                        stderr=subprocess.STDOUT,
                    )
                )
            codes = wait_all(procs, timeout)
        finally:
            for p in procs:  # only the processes started here, by their own handles
                if p.poll() is None:
                    p.kill()
                    p.wait(10)
            for f in logs:
                f.close()
        log(f"   {len(runs)} run(s) x {world} ranks: {time.time() - t0:.1f} s, exit codes {codes}")
        per_rank: list[dict[str, dict[str, Any]]] = []
        for r in range(world):
            path = work / f"rank{r}.json"
            got = json.loads(path.read_text())["runs"] if path.exists() else []
            per_rank.append({x["name"]: x for x in got})
            if codes[r] != 0:
                tail = (work / f"rank{r}.log").read_text()[-2500:]
                log(
                    f"   rank {r}: {'timeout' if codes[r] is None else f'exit {codes[r]}'}; log tail:\n{tail}"
                )
        out: dict[str, list[dict[str, Any]]] = {}
        for run in runs:
            name = run["name"]
            out[name] = [
                per_rank[r].get(name, {"name": name, "status": "error", "error": f"rank {r}: no result"})
                for r in range(world)
            ]
        return out


# -- summaries --------------------------------------------------------------------------------
def ok(results: list[dict[str, Any]]) -> bool:
    return bool(results) and all(r.get("status") == "ok" for r in results)


def step_time(results: list[dict[str, Any]], skip: int) -> float:
    """Mean seconds per step after the first ``skip`` steps: the slowest rank's clock.

    Each rank's clock runs from the end of step ``skip`` to the end of its last step; a rank still
    catching up at the end (a straggler) is counted.
    """
    spans = []
    for r in results:
        ends = r["ends"]
        if len(ends) <= skip + 1:
            return math.nan
        spans.append((ends[-1] - ends[skip]) / (len(ends) - 1 - skip))
    return max(spans)


def mean_sd(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt_ms(s: float | None, sd: float | None = None) -> str:
    if s is None or math.isnan(s):
        return "n/a"
    return f"{1000 * s:.1f} ms" + (f" ± {1000 * sd:.1f}" if sd else "")


def fmt_pct(x: float | None, sd: float | None = None, digits: int = 1) -> str:
    """``98.3%`` or ``98.3% ± 0.4`` (``sd`` in the same unit as ``x``, printed in points)."""
    if x is None or math.isnan(x):
        return "n/a"
    return f"{100 * x:.{digits}f}%" + (f" ± {100 * sd:.{digits}f}" if sd else "")


def per_position(ends: list[float], period: int, skip: int) -> list[float]:
    """Median step time (s) by position in the period: index 0 = the steps that end on a sync point."""
    pos: list[list[float]] = [[] for _ in range(period)]
    for i in range(max(1, skip), len(ends)):
        pos[(i + 1) % period].append(ends[i] - ends[i - 1])
    return [statistics.median(p) if p else math.nan for p in pos]


# -- the registry of rows ---------------------------------------------------------------------
@dataclass
class Summary:
    """What a row's table cells say, derived from its raw data (so ``--report-only`` can redo it)."""

    setting: str
    measured: str
    verdict: str  # "reproduced" | "partly" | "not reproduced"
    why: str
    details: list[str] = field(default_factory=list)  # markdown lines for the row's own section


@dataclass
class Context:
    """What a row's experiment gets: a trace logger and the run's options."""

    trace: list[str] = field(default_factory=list)
    timeout: float = 600.0

    def log(self, msg: str) -> None:
        print(msg, flush=True)
        self.trace.append(msg)


@dataclass
class Row:
    key: str
    paper: str
    arxiv: str
    claim: str
    run: Callable[[Context], dict[str, Any]]
    summarize: Callable[[dict[str, Any]], Summary] | None = None
    pending: bool = False


ROWS: dict[str, Row] = {}


def row(
    key: str, paper: str, arxiv: str, claim: str, summarize: Callable[[dict[str, Any]], Summary] | None = None
) -> Callable[[Callable[[Context], dict[str, Any]]], Callable[[Context], dict[str, Any]]]:
    """Register ``fn(ctx) -> raw data`` as the experiment of row ``key``; ``summarize(data)`` renders it."""

    def deco(fn: Callable[[Context], dict[str, Any]]) -> Callable[[Context], dict[str, Any]]:
        if key in ROWS:
            raise ValueError(f"row {key!r} registered twice")
        ROWS[key] = Row(key, paper, arxiv, claim, fn, summarize)
        return fn

    return deco


def pending_row(key: str, paper: str, arxiv: str, claim: str, plan: str) -> None:
    """A placeholder: listed in the report as "not run" until someone registers its experiment."""

    def not_yet(ctx: Context) -> dict[str, Any]:
        raise NotImplementedError(f"row {key!r} is a placeholder: {plan}")

    ROWS[key] = Row(key, paper, arxiv, claim, not_yet, None, pending=True)
