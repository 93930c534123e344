"""Shared Trainer runs for the sync-schedule tests (module-level so spawned ranks can import them)."""

from __future__ import annotations

import os

import torch
from lightning_ns import CompressedDDP, pl
from models import ToyClassifier, flat_params, trainer_kwargs


class Recorder(pl.Callback):
    """Keeps every rank's parameters and the ledger's figures after each of the first steps."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.params: dict[int, torch.Tensor] = {}
        self.bytes: dict[int, int] = {}
        self.ledger_steps: dict[int, int] = {}
        self.anchors: dict[int, torch.Tensor] = {}
        self.broadcast_buffers: bool | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step  # optimizer steps done
        self.broadcast_buffers = trainer.strategy.model.broadcast_buffers
        if step > self.steps:
            return
        self.params[step] = flat_params(pl_module)
        ledger = trainer.strategy.comm_state.ledger
        self.ledger_steps[step] = ledger.steps
        self.bytes[step] = ledger.last.payload_bytes
        anchor = getattr(trainer.strategy.sync, "anchor", None)
        if anchor is not None:
            self.anchors[step] = anchor.clone()


def fit(rank, world_size, factory, steps, record=0, model_kwargs=None, overrides=None, bn=False):
    """Train ToyClassifier for ``steps`` optimizer steps with ``factory()`` as the strategy."""
    pl.seed_everything(0, verbose=False)
    model = (ToyBN if bn else ToyClassifier)(**(model_kwargs or {}))
    strategy = factory()
    callbacks = [Recorder(record)] if record and isinstance(strategy, CompressedDDP) else []
    trainer = pl.Trainer(**trainer_kwargs(world_size, strategy=strategy, max_steps=steps, callbacks=callbacks,
                                          **(overrides or {})))
    trainer.fit(model)
    model.eval()
    out = {"params": flat_params(model), "acc": model.accuracy(),
           "numel": sum(p.numel() for p in model.parameters()),
           "buffers": {k: v.clone() for k, v in model.named_buffers()}}
    if isinstance(strategy, CompressedDDP):
        ledger = strategy.comm_state.ledger
        out.update(total=ledger.total, steps=ledger.steps, optimizer_steps=strategy.optimizer_steps,
                   optimizer_state=[dict(s) for s in trainer.optimizers[0].state.values()])
        anchor = getattr(strategy.sync, "anchor", None)
        if anchor is not None:
            strategy.sync.complete()
            out["anchor"] = strategy.sync.anchor.clone()
    if callbacks:
        rec = callbacks[0]
        out.update(rec_params=rec.params, rec_bytes=rec.bytes, rec_ledger_steps=rec.ledger_steps,
                   rec_anchors=rec.anchors, broadcast_buffers=rec.broadcast_buffers)
    return out


class ToyBN(ToyClassifier):
    """ToyClassifier with a BatchNorm layer: float running statistics plus an integer counter."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        hidden = self.hparams.hidden
        self.net.insert(1, torch.nn.BatchNorm1d(hidden))


def fit_many(rank, world_size, factories, steps, record=0, model_kwargs=None, bn=False):
    """Several fits in one set of processes (process start-up dominates the cost of these tests)."""
    out = {}
    for name, factory in factories.items():
        out[name] = fit(rank, world_size, factory, steps, record, model_kwargs, bn=bn)
    return out


def resume(rank, world_size, ckpt_dir, factory, n, momentum):
    """Uninterrupted 2 epochs vs 1 epoch + checkpoint + resumed 2nd epoch (same seed, per-rank state)."""
    kw = dict(n=n, momentum=momentum)
    pl.seed_everything(0, verbose=False)
    full = ToyClassifier(**kw)
    trainer = pl.Trainer(**trainer_kwargs(world_size, strategy=factory(), max_epochs=2, max_steps=-1))
    trainer.fit(full)

    pl.seed_everything(0, verbose=False)
    first = ToyClassifier(**kw)
    strategy = factory()
    trainer = pl.Trainer(**trainer_kwargs(world_size, strategy=strategy, max_epochs=1, max_steps=-1))
    trainer.fit(first)
    steps_first = strategy.optimizer_steps
    path = os.path.join(ckpt_dir, "half.ckpt")
    trainer.save_checkpoint(path)

    pl.seed_everything(0, verbose=False)  # same script, same seed: DistributedSampler reads PL_GLOBAL_SEED
    resumed = ToyClassifier(**kw)
    strategy = factory()
    trainer = pl.Trainer(**trainer_kwargs(world_size, strategy=strategy, max_epochs=2, max_steps=-1))
    trainer.fit(resumed, ckpt_path=path)
    ckpt = torch.load(path, weights_only=False)
    return {"full": flat_params(full), "resumed": flat_params(resumed), "steps_first": steps_first,
            "first": flat_params(first), "sync_state": ckpt["lightning_compress"]["ranks"][rank]["sync"]}
