"""Backup workers vs. plain synchronous SGD with one intermittently slow rank.

``W`` ranks train a small MLP whose ``training_step`` *sleeps* ``--base-ms`` to simulate compute;
rank ``--slow-rank`` sleeps ``--slowdown`` times longer on a seeded random ``--prob`` fraction of
the measured steps (the same steps in both runs). Run once with ``BackupWorkers(backups=0)`` (every step
waits for every rank) and once with ``backups=1`` (every step averages the first ``W - 1``).

The compute is a sleep on purpose: with 4 processes on a 2-core machine, real compute would
contend for the cores and the measurement would be about the scheduler, not the protocol. What
this measures is the schedule (store round trips, the all-gather); a real model adds its own compute.

Mean step time = (the moment the *last* rank finished its last step - the moment the first rank
started the first measured step) / measured steps, so a straggler still catching up at the end
counts. Usage::

    python benchmarks/backup_workers.py                      # 4 ranks, 3x slower on 25 % of steps
    python benchmarks/backup_workers.py --slowdown 4 --steps 300
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import socket
import sys
import tempfile
import time

import torch

STEP_KEY = "step_times"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slow_steps(first: int, steps: int, prob: float, seed: int) -> set[int]:
    """Exactly ``round(prob * n)`` of the ``n`` measured steps, drawn at random (seeded)."""
    measured = range(first, steps)
    return set(random.Random(seed).sample(measured, round(prob * len(measured))))


def _worker(rank: int, world: int, port: int, out: str, cfg: dict) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0",
        WORLD_SIZE=str(world), OMP_NUM_THREADS="1", PL_DISABLE_FORK="1",
    )
    torch.set_num_threads(1)
    import pytorch_lightning as pl
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_compress import CompressedDDP
    from lightning_compress.sync import BackupWorkers

    slow = cfg["slow"]

    class SimulatedCompute(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))

        def training_step(self, batch, batch_idx):
            step = self.trainer.global_step
            factor = cfg["slowdown"] if (self.global_rank == cfg["slow_rank"] and step in slow) else 1.0
            time.sleep(cfg["base_ms"] * factor / 1000.0)
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(4096, 16, generator=g)
            y = (x @ torch.randn(16, 4, generator=g)).argmax(1)
            return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)

    class Clock(pl.Callback):
        def __init__(self) -> None:
            self.start: dict[int, float] = {}
            self.end: dict[int, float] = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.start[trainer.global_step] = time.time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.end[trainer.global_step - 1] = time.time()

    pl.seed_everything(0, verbose=False)
    clock = Clock()
    sync = BackupWorkers(backups=cfg["backups"], max_lag=cfg["max_lag"])
    trainer = pl.Trainer(
        accelerator="cpu", devices=world, max_steps=cfg["steps"], enable_progress_bar=False, logger=False,
        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[clock],
        strategy=CompressedDDP(compressor=cfg["compressor"], sync=sync),
    )
    trainer.fit(SimulatedCompute())
    report = {"start": clock.start, "end": clock.end, "straggled": sync.straggled_total}
    report.update(skipped=sync.skipped_total, dropped=sync.dropped_total)
    torch.save(report, out)


def run(backups: int, cfg: dict) -> dict:
    world = cfg["world"]
    ctx = mp.get_context("spawn")
    port = _free_port()
    cfg = {**cfg, "backups": backups}
    with tempfile.TemporaryDirectory() as tmp:
        outs = [os.path.join(tmp, f"{r}.pt") for r in range(world)]
        procs = [ctx.Process(target=_worker, args=(r, world, port, outs[r], cfg)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(600)
        if any(p.exitcode != 0 for p in procs):
            raise SystemExit(f"a rank failed (exit codes {[p.exitcode for p in procs]})")
        reps = [torch.load(o, weights_only=False) for o in outs]
    first = cfg["skip"]
    last = cfg["steps"] - 1
    t0 = min(r["start"][first] for r in reps)
    t1 = max(r["end"][last] for r in reps)
    return {
        "mean_step_ms": 1000.0 * (t1 - t0) / (last - first + 1),
        "straggled": [r["straggled"] for r in reps],
        "skipped": [r["skipped"] for r in reps],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--skip", type=int, default=10, help="first steps left out of the mean (start-up)")
    ap.add_argument("--base-ms", type=float, default=50.0)
    ap.add_argument("--slowdown", type=float, default=3.0)
    ap.add_argument("--prob", type=float, default=0.25)
    ap.add_argument("--slow-rank", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-lag", type=int, default=32)
    ap.add_argument("--compressor", default="none", help="none | qsgd | topk")
    args = ap.parse_args(argv)

    slow = slow_steps(args.skip, args.steps, args.prob, args.seed)
    cfg = {
        "world": args.world, "steps": args.steps, "skip": args.skip, "base_ms": args.base_ms,
        "slowdown": args.slowdown, "slow_rank": args.slow_rank, "max_lag": args.max_lag,
        "compressor": args.compressor, "slow": slow,
    }
    measured = [s for s in range(args.skip, args.steps)]
    frac = sum(s in slow for s in measured) / len(measured)
    ideal_b0 = args.base_ms * (1 + (args.slowdown - 1) * frac)
    print(f"{args.world} ranks, rank {args.slow_rank} {args.slowdown:g}x slower on {frac:.1%} of the "
          f"{len(measured)} measured steps (seed {args.seed}); simulated compute {args.base_ms:g} ms/step "
          "(sleep)")
    results = {}
    for b in (0, 1):
        results[b] = run(b, cfg)
        r = results[b]
        print(f"backups={b}: mean step {r['mean_step_ms']:.1f} ms   (times each rank was dropped: "
              f"{r['straggled']}, steps each rank skipped: {r['skipped']})")
    ratio = results[1]["mean_step_ms"] / results[0]["mean_step_ms"]
    # what the sleeps alone would give, without any framework or protocol overhead
    print(f"ratio backups=1 / backups=0: {ratio:.3f}   (sleeps alone: {args.base_ms:g} / {ideal_b0:.1f} ms = "
          f"{args.base_ms / ideal_b0:.3f})")


if __name__ == "__main__":
    sys.exit(main())
