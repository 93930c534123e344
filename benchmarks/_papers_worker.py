"""One rank of a ``benchmarks/papers.py`` experiment: several short Lightning fits in one process.

Started by :func:`benchmarks._papers_common.launch` as ``[ip netns exec NS] python -m
benchmarks._papers_worker CONFIG.json`` with the torchrun-style environment Lightning reads for
externally launched processes (``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK``, ``LOCAL_RANK=0``,
``WORLD_SIZE``), so every Trainer sees ``num_nodes=W, devices=1`` and one gloo process group.

The config holds a list of *runs*. They execute one after the other in the same processes and
the same process group (starting Python, torch and Lightning costs more than a whole digits run
on this machine), each with a fresh model, optimizer, strategy and Trainer, separated by a
barrier so that their clocks start together. A run is::

    {"name": ..., "seed": 0, "steps": 240, "eval_every": 24,
     "model": {"hidden": 128, "lr": 0.05, "momentum": 0.9, "batch_size": 32},
     "data": {"split": "iid"} | {"split": "skew", "major": 0.9},
     "method": {"kind": "ddp" | "sync" | "localsgd" | "slowmo" | "overlap" | "backup" | "nocomm", ...kwargs}
              | {"kind": "compressed", "compressor": {"class": "QSGD", "bits": 4},
                 "policy": {"class": "DQPolicy", "mean_bits": 3.0}, **CompressedDDP kwargs},
     "straggler": {"rank": 2, "base_ms": 20, "slowdown": 3.0, "steps": [...]}   # optional
    }

The model is the package's digits example (:class:`lightning_compress.examples.DigitsCNN`'s
network, :func:`lightning_compress.examples.digits.load_digits_split`'s split), trained with SGD
at a constant learning rate. Each rank draws batches from its own shard of the training split
(``use_distributed_sampler=False``): a random half (IID) or a label-skewed half where rank ``r``
holds ``major`` of the images of its own half of the classes and ``1 - major`` of the others'.

Rank 0 snapshots its parameters every ``eval_every`` steps (at sync points of periodic methods)
and evaluates them on the validation split after training (so evaluation never pauses the
ranks). Every rank records the wall-clock time at the end of each step.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

NUM_CLASSES = 10


# -- data -------------------------------------------------------------------------------------
def rank_shard(
    train: TensorDataset, rank: int, world: int, split: dict[str, Any], seed: int = 0
) -> TensorDataset:
    """This rank's shard of ``train``: equal sizes on every rank, IID or label-skewed.

    ``{"split": "iid"}``: a random partition into ``world`` equal parts.
    ``{"split": "skew", "major": p}``: the classes are cut into ``world`` contiguous groups; rank
    ``r`` gets a share ``p`` of the images of group ``r`` and ``(1 - p) / (world - 1)`` of every
    other group's, then every shard is cut to the smallest shard's size.
    """
    x, y = train.tensors
    g = torch.Generator().manual_seed(1000 + seed)
    if split["split"] == "iid" or world == 1:
        perm = torch.randperm(len(y), generator=g)
        size = len(y) // world
        idx = perm[rank * size : (rank + 1) * size]
        return TensorDataset(x[idx], y[idx])
    if split["split"] != "skew":
        raise ValueError(f"unknown split {split!r}")
    major = float(split["major"])
    group_of_class = [c * world // NUM_CLASSES for c in range(NUM_CLASSES)]
    shards: list[list[Tensor]] = [[] for _ in range(world)]
    for c in range(NUM_CLASSES):
        cls = torch.nonzero(y == c).flatten()
        cls = cls[torch.randperm(len(cls), generator=g)]
        owner = group_of_class[c]
        shares = [major if r == owner else (1.0 - major) / (world - 1) for r in range(world)]
        start = 0
        for r in range(world):
            n = round(shares[r] * len(cls)) if r < world - 1 else len(cls) - start
            shards[r].append(cls[start : start + n])
            start += n
    size = min(sum(len(t) for t in s) for s in shards)
    idx = torch.cat(shards[rank])
    idx = idx[torch.randperm(len(idx), generator=g)][:size]
    return TensorDataset(x[idx], y[idx])


def class_histogram(ds: TensorDataset) -> list[int]:
    return torch.bincount(ds.tensors[1], minlength=NUM_CLASSES).tolist()


# -- model ------------------------------------------------------------------------------------
class PaperDigits(pl.LightningModule):
    """The digits example's CNN, SGD at a constant rate, no logging (no collectives of its own)."""

    def __init__(
        self,
        shard: TensorDataset,
        hidden: int = 128,
        lr: float = 0.05,
        momentum: float = 0.9,
        batch_size: int = 32,
        seed: int = 0,
        straggler: dict[str, Any] | None = None,
        cosine_steps: int = 0,
    ) -> None:
        super().__init__()
        from lightning_compress.examples import DigitsCNN

        self.net = DigitsCNN(hidden=hidden).net
        self.shard = shard
        self.lr = lr
        self.momentum = momentum
        self.batch_size = batch_size
        self.seed = seed
        self.cosine_steps = cosine_steps
        self.straggler = straggler or {}
        self._slow = set(self.straggler.get("steps", []))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        s = self.straggler
        if s:
            # simulated extra compute (a sleep, so it does not contend for the 2 cores)
            slow = self.global_rank == s["rank"] and self.trainer.global_step in self._slow
            time.sleep(s["base_ms"] * (s["slowdown"] if slow else 1.0) / 1000.0)
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
        if not self.cosine_steps:
            return opt
        # cosine decay per optimizer step, to 5 % of the base rate at cosine_steps
        n = self.cosine_steps

        def factor(step: int) -> float:
            return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(step, n) / n))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(10_000 * self.seed + self.global_rank)
        return DataLoader(self.shard, batch_size=self.batch_size, shuffle=True, drop_last=True, generator=g)


@torch.no_grad()
def evaluate(net: nn.Module, state: dict[str, Tensor], data: TensorDataset) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of the parameters ``state`` on ``data``."""
    current = {k: v.detach().clone() for k, v in net.state_dict().items()}
    was = net.training
    net.load_state_dict(state)
    net.eval()
    x, y = data.tensors
    logits = net(x)
    acc = float((logits.argmax(1) == y).float().mean())
    loss = float(nn.functional.cross_entropy(logits, y))
    net.load_state_dict(current)
    net.train(was)
    return acc, loss


# -- methods ----------------------------------------------------------------------------------
def build_strategy(method: dict[str, Any]) -> tuple[Any, int]:
    """(strategy, period) for a method spec; period is the spacing of sync points (1: every step)."""
    from pytorch_lightning.strategies import DDPStrategy

    from lightning_compress import CompressedDDP
    from lightning_compress.sync import BackupWorkers, LocalSGD, OverlapLocalSGD, SlowMo

    kind = method["kind"]
    kw = {k: v for k, v in method.items() if k not in ("kind", "label", "policy")}
    common = {"process_group_backend": "gloo", "bucket_cap_mb": 256}
    if kind == "compressed":  # a codec (and CompressedDDP's other arguments), every-step exchange
        from lightning_compress import compressors

        spec = dict(kw.pop("compressor"))
        codec = getattr(compressors, spec.pop("class"))(**spec)
        return CompressedDDP(compressor=codec, **kw, **common), 1
    if kind == "ddp":
        return DDPStrategy(**common), 1
    if kind == "sync":
        return CompressedDDP(compressor="none", **common), 1
    if kind == "nocomm":  # the floor: local steps only, no averaging during the run
        return CompressedDDP(compressor="none", sync=LocalSGD(period=10**9), **common), 1
    schedules = {"localsgd": LocalSGD, "slowmo": SlowMo, "overlap": OverlapLocalSGD, "backup": BackupWorkers}
    sync = schedules[kind](**kw)
    return CompressedDDP(compressor="none", sync=sync, **common), int(kw.get("period", 1))


class Recorder(Callback):
    """End-of-step wall times on every rank; parameter snapshots on rank 0 (at sync points)."""

    def __init__(self, eval_every: int, period: int, steps: int) -> None:
        self.eval_every = max(1, eval_every)
        self.period = period
        self.steps = steps
        self.ends: list[float] = []
        self.snapshots: list[tuple[int, dict[str, Tensor]]] = []
        self.paused = 0.0

    def _snap(self, module: pl.LightningModule, step: int) -> None:
        if module.global_rank == 0 and (not self.snapshots or self.snapshots[-1][0] != step):
            t = time.perf_counter()
            self.snapshots.append((step, {k: v.detach().clone() for k, v in module.net.state_dict().items()}))
            self.paused += time.perf_counter() - t

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.t0 = time.perf_counter()
        self._snap(pl_module, 0)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int
    ) -> None:
        self.ends.append(time.perf_counter() - self.t0 - self.paused)
        step = trainer.global_step
        if step % self.eval_every == 0 and step % self.period == 0:
            self._snap(pl_module, step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        # after the strategy's on_train_end (Overlap-Local-SGD applies its last exchange there)
        self._snap(pl_module, trainer.global_step)


class SettingTrace(Callback):
    """The codec's setting (QSGD's bits, Top-K's k) of every compressed exchange, and its norm."""

    def __init__(self) -> None:
        self.settings: list[float] = []
        self.norms: list[float | None] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int
    ) -> None:
        state = getattr(trainer.strategy, "comm_state", None)
        if state is None or not state.last_compressed:
            return
        codec = state.compressor
        setting = getattr(codec, "bits", None)
        if setting is None:
            setting = getattr(codec, "k", None)  # set by a policy; None for a fixed ratio
        self.settings.append(float(setting or 0))
        self.norms.append(state.last_grad_norm)


def one_run(run: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    from lightning_compress.examples.digits import load_digits_split

    seed = int(run.get("seed", 0))
    train, val = load_digits_split("train"), load_digits_split("val")
    shard = rank_shard(train, rank, world, run.get("data", {"split": "iid"}), seed=seed)
    pl.seed_everything(seed, verbose=False)
    model = dict(run.get("model", {}))
    if model.pop("cosine", False):
        model["cosine_steps"] = int(run["steps"])
    module = PaperDigits(shard, seed=seed, straggler=run.get("straggler"), **model)
    strategy, period = build_strategy(run["method"])
    steps = int(run["steps"])
    recorder = Recorder(int(run.get("eval_every", steps)), period, steps)
    callbacks: list[Callback] = [recorder]
    trace = SettingTrace()
    if run["method"]["kind"] == "compressed":
        from lightning_compress import CommunicationMonitor, policies

        callbacks.append(trace)
        spec = dict(run["method"].get("policy") or {})
        policy = getattr(policies, spec.pop("class"))(**spec) if spec else None
        callbacks.append(CommunicationMonitor(policy=policy, summary=False))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        num_nodes=world,
        strategy=strategy,
        max_steps=steps,
        max_epochs=-1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,
    )
    loop = trainer.fit_loop.epoch_loop
    if run.get("no_sigterm_broadcast"):
        # diagnostic only: drop Lightning's per-step 8-byte SIGTERM broadcast (a collective on the
        # same process group, which queues behind an in-flight non-blocking allreduce)
        loop._broadcast_sigterm_tensor = lambda: None
    blocked: dict[str, list[float]] = {}
    if run.get("instrument"):
        # seconds the training thread spends inside each communicating call, per optimizer step:
        # "sig" Lightning's per-step SIGTERM broadcast (start of the step), "sync" the schedule's
        # sync point (end of the step), "wait" the part of it spent waiting for a pending average
        blocked = {k: [0.0] * steps for k in ("sig", "sync", "wait")}

        def timed(kind: str, fn: Any) -> Any:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                t = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    step = min(trainer.global_step, steps - 1)
                    blocked[kind][step] += time.perf_counter() - t

            return wrapper

        loop._broadcast_sigterm_tensor = timed("sig", loop._broadcast_sigterm_tensor)
        schedule = getattr(strategy, "sync", None)
        if schedule is not None and hasattr(schedule, "_synchronize"):
            schedule._synchronize = timed("sync", schedule._synchronize)
        if schedule is not None and hasattr(schedule, "complete"):
            schedule.complete = timed("wait", schedule.complete)
    t0 = time.time()
    trainer.fit(module)
    out: dict[str, Any] = {
        "name": run["name"],
        "status": "ok",
        "steps": len(recorder.ends),
        "ends": recorder.ends,
        "fit_wall_s": time.time() - t0,
        "shard_classes": class_histogram(shard),
        "package": os.path.dirname(sys.modules["lightning_compress"].__file__ or ""),
    }
    if blocked:
        out["blocked"] = blocked
    if trace.settings:
        out["settings"], out["norms"] = trace.settings, trace.norms
    sync = getattr(strategy, "comm_state", None)
    if sync is not None:
        total = sync.ledger.total
        out["wire_bytes"] = float(total.wire_bytes)
    schedule = getattr(strategy, "sync", None) or getattr(strategy, "_sync", None)
    for attr in ("dropped_total", "straggled_total", "skipped_total"):
        if schedule is not None and hasattr(schedule, attr):
            out[attr] = int(getattr(schedule, attr))
    if rank == 0:
        curve = []
        for step, state in recorder.snapshots:
            acc, loss = evaluate(module.net, state, val)
            curve.append([step, acc, loss])
        out["curve"] = curve
        out["final_acc"], out["final_loss"] = curve[-1][1], curve[-1][2]
        tr_acc, tr_loss = evaluate(module.net, recorder.snapshots[-1][1], train)
        out["train_acc"], out["train_loss"] = tr_acc, tr_loss
    return out


def main() -> None:
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    torch.set_num_threads(1)
    rank = int(os.environ.get("NODE_RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    path = cfg["out"].format(rank=rank)
    results: list[dict[str, Any]] = []

    def save() -> None:
        with open(path + ".tmp", "w") as f:
            json.dump({"rank": rank, "runs": results}, f)
        os.replace(path + ".tmp", path)

    for run in cfg["runs"]:
        if dist.is_initialized():
            dist.barrier()  # every run starts its clock together on every rank
        t = time.time()
        try:
            res = one_run(run, rank, world)
        except BaseException:
            results.append({"name": run["name"], "status": "error", "error": traceback.format_exc()[-4000:]})
            save()
            raise
        res["wall_s"] = time.time() - t
        results.append(res)
        save()
        print(
            f"[rank {rank}] {run['name']}: {res['steps']} steps in {res['fit_wall_s']:.1f} s"
            + (f", val acc {res['final_acc']:.4f} loss {res['final_loss']:.4f}" if rank == 0 else ""),
            flush=True,
        )


if __name__ == "__main__":
    main()
