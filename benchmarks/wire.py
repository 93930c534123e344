"""How well one exchange pattern uses an emulated link: the same bytes as one or many collectives.

    sudo python benchmarks/wire.py                   # 2 workers, 100 Mbit/s, 2.2 MB per rank
    sudo python benchmarks/wire.py --rate 10 --bytes 0.35e6

Two worker processes, each in its own network namespace behind a tbf-limited link
(``benchmarks/_cluster.py``), time (median of ``--repeats``, after one untimed call):

- one all-gather of ``--bytes`` per rank;
- the two-phase pattern of QSGD's exchange before the engine: an all-to-all of ``--bytes``, then
  an all-gather of half of it, one after the other;
- the same bytes as 2, 4 and 8 all-gathers issued asynchronously, all in flight at once (the
  engine's chunks, ``lightning_compress/comm/engine.py``);
- a float32 allreduce of 8x the bytes (stock DDP for the same gradient as 4-bit codes).

Each line prints the achieved rate: bytes per rank over the time. Needs root (namespaces);
every namespace is deleted on exit.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _worker(total: int, repeats: int) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.randint(0, 255, (total,), dtype=torch.uint8)

    def timed(name: str, fn: Callable[[], None], repeats: int = repeats) -> None:
        fn()
        times = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        times.sort()
        median = times[len(times) // 2]
        if rank == 0:
            print(
                f"{name:42s} median {median * 1e3:8.1f} ms  min {times[0] * 1e3:8.1f} ms  "
                f"{total / median / 1e6:6.2f} MB/s per rank",
                flush=True,
            )

    def gather() -> None:
        dist.all_gather_into_tensor(torch.empty(world * total, dtype=torch.uint8), x)

    def two_phase() -> None:
        dist.all_to_all_single(torch.empty(total, dtype=torch.uint8), x)
        half = total // world
        dist.all_gather_into_tensor(torch.empty(world * half, dtype=torch.uint8), x[:half])

    def in_flight(pieces: int) -> Callable[[], None]:
        def run() -> None:
            size = total // pieces
            works = [
                dist.all_gather_into_tensor(
                    torch.empty(world * size, dtype=torch.uint8), x[i * size : (i + 1) * size], async_op=True
                )
                for i in range(pieces)
            ]
            for work in works:
                work.wait()

        return run

    def dense() -> None:
        dist.all_reduce(torch.zeros(2 * total))  # float32: 8x the bytes

    timed("one all-gather", gather)
    timed("two-phase (all-to-all, then all-gather)", two_phase)
    for pieces in (2, 4, 8):
        timed(f"{pieces} all-gathers in flight", in_flight(pieces))
    timed("float32 allreduce of 8x the bytes", dense, repeats=max(1, repeats // 2))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=100.0, help="link rate, Mbit/s")
    parser.add_argument("--bytes", type=float, default=2.2e6, help="bytes each rank contributes")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before the workers are killed")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(int(args.bytes), args.repeats)
        return

    from benchmarks._cluster import NamespaceCluster, netns_available
    from benchmarks._netem.launch import free_port, worker_env

    ok, why = netns_available()
    if not ok:
        sys.exit(f"needs network namespaces and tbf: {why}")
    port = free_port()
    argv = [sys.executable, __file__, "--worker", "--bytes", str(args.bytes), "--repeats", str(args.repeats)]
    with NamespaceCluster(2, args.rate) as cluster:
        print(f"{cluster.describe()}; {args.bytes / 1e6:.2f} MB per rank", flush=True)
        procs = [
            subprocess.Popen(
                cluster.command(r, argv), env={**worker_env(cluster, r, 2, port), "RANK": str(r)}
            )
            for r in range(2)
        ]
        try:
            for p in procs:
                p.wait(timeout=args.timeout)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
    sys.exit(max(p.returncode or 0 for p in procs))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
