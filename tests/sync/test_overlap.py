"""Overlap-Local-SGD's averaging really runs in the background: launching it does not block."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from launch import init_process_group, run_distributed

from lightning_compress.comm import BitLedger
from lightning_compress.comm.ledger import allreduce_wire_bytes
from lightning_compress.sync.overlap import launch_allreduce

N = 1 << 24  # 64 MiB of float32: long enough on loopback that blocking would show


def _timings(rank, world_size):
    init_process_group(rank, world_size)
    x = torch.full((N,), float(rank + 1))
    dist.all_reduce(x.clone())  # connect and allocate first: time steady-state collectives
    # blocking reference
    dist.barrier()
    t = time.perf_counter()
    dist.all_reduce(x.clone())
    blocking = time.perf_counter() - t
    # the schedule's non-blocking launch, then the wait
    ledger = BitLedger()
    buf = x.clone()
    dist.barrier()
    t = time.perf_counter()
    work = launch_allreduce(buf, None, ledger)
    launch = time.perf_counter() - t
    work.wait()
    total = time.perf_counter() - t
    # overlap: compute while the allreduce runs
    buf2 = x.clone()
    a = torch.randn(256, 256)
    dist.barrier()
    t = time.perf_counter()
    work = launch_allreduce(buf2, None, None)
    for _ in range(50):
        a = torch.tanh(a @ a)
    computed = time.perf_counter() - t
    work.wait()
    overlapped = time.perf_counter() - t
    ledger.end_step()
    return {"blocking": blocking, "launch": launch, "total": total, "computed": computed,
            "overlapped": overlapped, "ok": bool(torch.all(buf == 3.0)) and bool(torch.all(buf2 == 3.0)),
            "last": ledger.last}


def test_launch_does_not_block():
    res = run_distributed(_timings, 2)
    for r in res:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "last"})
        assert r["ok"]
        # the launch returns long before the collective completes
        assert r["launch"] < 0.2 * r["total"], r
        assert r["launch"] < 0.2 * r["blocking"], r
        # bytes are recorded at launch
        assert r["last"].payload_bytes == 4 * N
        assert r["last"].wire_bytes == allreduce_wire_bytes(4 * N, 2)
