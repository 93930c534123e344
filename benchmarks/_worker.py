"""One benchmark worker: trains one method for one rank and writes what it measured as JSON.

Run by ``benchmarks/netem.py`` (``ip netns exec NS python -m benchmarks._worker CONFIG.json``)
with the torchrun-style environment Lightning reads for externally launched processes
(``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK``, ``LOCAL_RANK=0``, ``WORLD_SIZE``), so the
Trainer sees ``num_nodes=N, devices=1``. With ``world == 1`` and no such environment it measures
the floor: the same model and batch in one process, with no communication at all.

What is measured (rank 0 also snapshots its parameters for accuracy):

- the wall time of every training step on this rank (from one ``on_train_batch_end`` to the
  next: data, forward, backward, exchange, optimizer, synchronization schedule);
- the bytes this rank's network interface transmitted during training
  (``/sys/class/net/<GLOO_SOCKET_IFNAME>/statistics/tx_bytes``, read inside the namespace);
- what the method says it sent: CompressedDDP's ledger, or the bytes torch's hooks handed to
  ``dist.all_reduce``, or stock DDP's dense float32 gradient.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import Callback

from benchmarks import _methods
from benchmarks._methods import AllreduceCounter, Method, get_method
from benchmarks._tasks import TASKS
from benchmarks._timeline import from_environment as timeline_from_environment


def _read_counter(ifname: str | None, name: str) -> int | None:
    if not ifname:
        return None
    try:
        with open(f"/sys/class/net/{ifname}/statistics/{name}") as f:
            return int(f.read())
    except OSError:
        return None


def _ledger(strategy: Any) -> dict[str, float] | None:
    state = getattr(strategy, "comm_state", None)
    if state is None:
        return None
    total = state.ledger.total
    return {
        "payload_bytes": float(total.payload_bytes),
        "wire_bytes": float(total.wire_bytes),
        "dense_wire_bytes": float(total.dense_wire_bytes),
        "collectives": float(total.collectives),
        "steps": float(state.ledger.steps),
    }


class Recorder(Callback):
    """Step times, interface counters, ledger deltas, parameter snapshots; the time-budget stop."""

    def __init__(self, cfg: dict[str, Any], counter: AllreduceCounter | None) -> None:
        self.cfg = cfg
        self.counter = counter
        self.ifname = os.environ.get("GLOO_SOCKET_IFNAME") if cfg.get("isolated") else None
        self.step_times: list[float] = []
        self.clock: list[float] = []  # training wall time after each step (snapshot pauses excluded)
        self.snapshots: list[tuple[int, float, int | None, dict[str, torch.Tensor]]] = []
        self.stop_at = int(cfg["steps"])
        self.paused = 0.0
        self._last_due = 0
        self.backup: dict[str, int] | None = None

    def _snapshot(self, module: pl.LightningModule, step: int, clock: float) -> None:
        if module.global_rank == 0 and (not self.snapshots or self.snapshots[-1][0] != step):
            t = time.perf_counter()
            state = {k: v.detach().clone() for k, v in module.net.state_dict().items()}
            tx = _read_counter(self.ifname, "tx_bytes")
            self.snapshots.append(
                (step, clock, None if tx is None or self.tx0 is None else tx - self.tx0, state)
            )
            self.paused += time.perf_counter() - t

    def on_before_backward(self, trainer: pl.Trainer, *args: Any) -> None:
        # an injected straggler (--straggler RANK:MS) computes slowly: it sleeps inside the step's
        # compute, which a rank that skips a late step (backup workers) does not run
        straggler = self.cfg.get("straggler")
        if straggler and trainer.global_rank == int(straggler[0]):
            time.sleep(float(straggler[1]) / 1000.0)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.tx0 = _read_counter(self.ifname, "tx_bytes")
        self.rx0 = _read_counter(self.ifname, "rx_bytes")
        self.ledger0 = _ledger(trainer.strategy)
        if self.counter is not None:
            self.counter.active = True
        self.t0 = self.last = time.perf_counter()
        self._snapshot(pl_module, 0, 0.0)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        self.step_times.append(now - self.last)
        clock = now - self.t0 - self.paused
        self.clock.append(clock)
        step = trainer.global_step
        if step == self.cfg["decide_at"] and self.cfg.get("budget_s") and trainer.world_size > 1:
            self._decide_stop(step, clock, trainer)
        # a snapshot at the first sync point (step % period == 0) of every evaluation interval, so
        # periodic schedules are evaluated on their averaged model
        period = int(self.cfg.get("period", 1))
        due = step // self.cfg["eval_every"] > self._last_due
        if (due and step % period == 0) or step >= self.stop_at:
            self._last_due = step // self.cfg["eval_every"]
            self._snapshot(pl_module, step, clock)
        if step >= self.stop_at:
            trainer.should_stop = True
        self.last = time.perf_counter()

    def _decide_stop(self, step: int, clock: float, trainer: pl.Trainer) -> None:
        """Rank 0 projects the run from its step times; every rank stops at the same step."""
        warm = min(self.cfg["warmup"], len(self.step_times) - 1)
        mean = sum(self.step_times[warm:]) / max(1, len(self.step_times) - warm)
        every = self.cfg["eval_every"]
        fits = int((self.cfg["budget_s"] - clock) / max(mean, 1e-6))
        period = int(self.cfg.get("period", 1))
        # stop at an evaluation step if the budget reaches one, else at the next whole period (so
        # periodic schedules end on a sync point)
        stop = max(-(-step // period) * period, ((step + fits) // every) * every)
        decision = torch.tensor([min(stop, int(self.cfg["steps"]))], dtype=torch.int64)
        dist.broadcast(decision, src=0)  # 8 bytes, once per run
        self.stop_at = int(decision.item())

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # not on_train_end: Lightning calls the callbacks' on_train_end before the strategy's, where
        # Overlap-Local-SGD waits for its last in-flight exchange (recorded by the ledger when it
        # was issued) and applies it; read the counters and the final model after that
        self.tx1 = _read_counter(self.ifname, "tx_bytes")
        self.rx1 = _read_counter(self.ifname, "rx_bytes")
        self.ledger1 = _ledger(trainer.strategy)
        if self.counter is not None:
            self.counter.active = False
        self._snapshot(pl_module, trainer.global_step, self.clock[-1] if self.clock else 0.0)
        sync = getattr(trainer.strategy, "sync", None)
        if hasattr(sync, "skipped_total"):  # backup workers: how often this rank was dropped or skipped
            self.backup = {k: getattr(sync, k) for k in ("dropped_total", "straggled_total", "skipped_total")}

    def result(self, task: Any, method: Method | None, n_params: int, world: int) -> dict[str, Any]:
        steps = len(self.step_times)
        reported: dict[str, Any] = {}
        if self.ledger0 is not None and self.ledger1 is not None:
            reported = {k: self.ledger1[k] - self.ledger0[k] for k in self.ledger1}
            reported["source"] = "ledger"
        elif method is not None and method.counts == "allreduce" and self.counter is not None:
            reported = {
                "payload_bytes": float(self.counter.payload_bytes),
                "wire_bytes": 2.0 * (world - 1) / world * self.counter.payload_bytes,
                "collectives": float(self.counter.calls),
                "source": "counted dist.all_reduce",
            }
        elif method is not None and method.counts == "dense":
            dense = 4.0 * n_params * steps
            reported = {
                "payload_bytes": dense,
                "wire_bytes": 2.0 * (world - 1) / world * dense,
                "source": "4 B/parameter/step, ring allreduce",
            }
        out: dict[str, Any] = {
            "status": "ok",
            "steps": steps,
            "step_times": self.step_times,
            "clock": self.clock,
            "tx_bytes": None if self.tx0 is None or self.tx1 is None else self.tx1 - self.tx0,
            "rx_bytes": None if self.rx0 is None or self.rx1 is None else self.rx1 - self.rx0,
            "reported": reported,
            "n_params": n_params,
        }
        if self.backup is not None:
            out["backup"] = self.backup
        if self.snapshots:
            out["curve"] = [
                (step, clock, tx, task.evaluate(state)) for step, clock, tx, state in self.snapshots
            ]
            out["final_acc"] = task.evaluate(self.snapshots[-1][3], final=True)
        return out


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(1)
    world = int(cfg["world"])
    pl.seed_everything(int(cfg["seed"]), verbose=False)
    method = None if cfg["method"] == "floor" else get_method(cfg["method"])
    _methods.BUCKET_CAP_MB = float(cfg.get("bucket_cap_mb", _methods.BUCKET_CAP_MB))
    task_kwargs = dict(cfg.get("task_kwargs", {}))
    if method is not None and method.momentum is not None:
        task_kwargs["momentum"] = method.momentum
    task = TASKS[cfg["task"]](**task_kwargs)
    n_params = sum(p.numel() for p in task.parameters())
    counter = None
    if method is None:
        strategy: Any = "auto"
        callbacks: list[Any] = []
    else:
        if method.counts == "allreduce":
            counter = AllreduceCounter()
            counter.install()
        try:
            strategy, callbacks = method.build()
        except (ImportError, TypeError, ValueError) as err:
            return {"status": "unavailable", "error": f"{type(err).__name__}: {err}"}
    recorder = Recorder(cfg, counter)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        num_nodes=world,
        strategy=strategy,
        max_steps=int(cfg["steps"]),
        max_epochs=-1,
        callbacks=[*callbacks, recorder, *timeline_from_environment(cfg)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    profile_path = os.environ.get("LCBENCH_PROFILE")  # cProfile of rank 0's fit, for diagnosis
    if profile_path and trainer.global_rank == 0:
        import cProfile

        with cProfile.Profile() as prof:
            trainer.fit(task)
        prof.dump_stats(profile_path)
    else:
        trainer.fit(task)
    if trainer.global_rank != 0:
        recorder.snapshots.clear()
    return recorder.result(task, method, n_params, world)


def main() -> None:
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    rank = int(os.environ.get("NODE_RANK", "0"))
    out = cfg["out"].format(rank=rank)
    try:
        result = run(cfg)
    except BaseException:
        result = {"status": "error", "error": traceback.format_exc()}
        with open(out, "w") as f:
            json.dump(result, f)
        raise
    result["rank"] = rank
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
