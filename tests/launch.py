"""One launcher for every multi-process test: real gloo (or NCCL) process groups on localhost.

``run_distributed(fn, world_size, *args)`` starts ``world_size`` fresh processes (spawn), each
running ``fn(rank, world_size, *args)`` with the environment Lightning reads for externally
launched processes (``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``, ``NODE_RANK``,
``WORLD_SIZE``), and returns the per-rank return values. A rank that raises, dies or hangs
fails the test with its traceback; no test waits forever.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(
    rank: int, world_size: int, timeout_s: float = 60.0, backend: str | None = None
) -> None:
    """Plain process group for tests that do not go through a Trainer.

    Args:
        rank: this process's rank.
        world_size: number of processes.
        timeout_s: collective timeout; a hung rank fails the test after it.
        backend: ``None`` or ``"gloo"`` (CPU tensors), or ``"nccl"`` (CUDA tensors): each rank
            then first makes ``cuda:{rank % device_count}`` its current device, which NCCL needs.

    """
    import torch.distributed as dist

    backend = "gloo" if backend is None else backend
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be None, 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(
        backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s)
    )


def _child(fn: Callable[..., Any], rank: int, world_size: int, port: int, out: str, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
        PL_DISABLE_FORK="1",
    )
    torch.set_num_threads(1)
    try:
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, out)
    except BaseException:  # report any failure to the parent with its traceback
        torch.save({"ok": False, "error": traceback.format_exc()}, out)
        raise
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 240.0, allow_failures: bool = False
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; returns their results.

    With ``allow_failures``, a rank that died or raised gives ``None`` instead of failing the call
    (for tests that kill ranks on purpose); a hang still fails.
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        outs = [os.path.join(tmp, f"rank{r}.pt") for r in range(world_size)]
        procs = [
            ctx.Process(target=_child, args=(fn, r, world_size, port, outs[r], args), daemon=False)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        try:
            for p in procs:
                p.join(max(0.0, deadline - time.monotonic()))
            hung = [r for r, p in enumerate(procs) if p.is_alive()]
            if hung:
                raise TimeoutError(f"ranks {hung} still running after {timeout:.0f}s (hang?)")
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        results, errors = [], []
        for r, out in enumerate(outs):
            if not os.path.exists(out):
                errors.append(f"rank {r} died with exit code {procs[r].exitcode} and no report")
                results.append(None)
                continue
            rep = torch.load(out, weights_only=False)
            if rep["ok"]:
                results.append(rep["result"])
            else:
                errors.append(f"rank {r} failed:\n{rep['error']}")
                results.append(None)
        if errors and not allow_failures:
            raise AssertionError("\n".join(errors))
        return results
