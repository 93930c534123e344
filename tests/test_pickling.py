"""Pickling for spawn, tested where there is something to drop: inside real 2-rank gloo groups.

Spawn pickles the strategy (its ``CompressionState`` and sync schedule) into every child. What is
bound to a process (the process group, parked buckets and in-flight collectives, the rounding
generator, the GradScaler, a pending model average) must not cross; the settings and the per-rank
memories (error-feedback residuals, momentum, ledger, step counters, a schedule's reference model)
must. Every check compares a clone with its original *after* real exchanges, so each fails if the
pickling kept or dropped the wrong thing.
"""

from __future__ import annotations

import pickle

import torch
import torch.distributed as dist
from launch import init_process_group, run_distributed
from lightning_ns import CompressedDDP, pl
from models import ToyClassifier, trainer_kwargs
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_compress.compressors import NoCompression, TopK
from lightning_compress.fingerprint import settings_of
from lightning_compress.hooks import CompressionState, compressed_hook, register_compression_hook
from lightning_compress.sync import LocalSGD, OverlapLocalSGD


def _clone(obj):
    return pickle.loads(pickle.dumps(obj))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))


def _backward(model, rank, step, scaler=None):
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(100 * step + rank))
    loss = model(x).pow(2).mean()
    (scaler.scale(loss) if scaler is not None else loss).backward()


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def _assert_same_memories(state_dict, clone_state_dict, kinds=("residuals", "momentum")):
    """Per-parameter v (and u), step counters and ledger: carried over, value for value."""
    for key in ("step", "skipped_steps", "last_grad_norm", "ledger"):
        assert clone_state_dict[key] == state_dict[key], key
    assert clone_state_dict["momentum"].keys() == state_dict["momentum"].keys()
    for kind in kinds:
        mine, cloned = state_dict[kind], clone_state_dict[kind]
        assert mine, f"the test needs {kind} to exist"
        assert cloned.keys() == mine.keys(), kind
        for name in mine:
            assert torch.equal(cloned[name], mine[name]), (kind, name)


def _bare_state(rank, world_size):
    init_process_group(rank, world_size)
    group = dist.group.WORLD
    # -- after whole exchanges: error-feedback v, momentum u, ledger, generator, scaler all exist
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    state = CompressionState(
        TopK(ratio=0.1),
        min_compression_size=128,
        momentum=0.5,
        momentum_masking=False,
        seed=5,
        nonfinite="raise",
        process_group=group,
    )
    state.use_scaler(scaler, "test")
    model = DistributedDataParallel(_model(), bucket_cap_mb=0.001)
    register_compression_hook(model, state)
    for step in range(3):
        model.zero_grad()
        _backward(model, rank, step, scaler)
    original = state.state_dict()
    assert "generator" in original, "the test needs the rounding generator to exist"

    clone = _clone(state)
    assert clone.process_group is None and state.process_group is group
    assert clone.scaler is None and state.scaler is scaler
    assert "generator" not in clone.state_dict()  # the clone draws from seed + rank afresh
    assert not clone._pending and not clone._inflight
    assert isinstance(clone.compressor, TopK)
    assert settings_of(clone) == settings_of(state)
    assert (clone.momentum, clone.momentum_masking, clone.seed, clone.nonfinite) == (0.5, False, 5, "raise")
    _assert_same_memories(original, clone.state_dict())

    # the clone continues exactly where the original is: same next exchange on the same gradients
    twin = DistributedDataParallel(_model(), bucket_cap_mb=0.001)
    clone.use_scaler(scaler, "test")  # set again in each process, as CompressedDDP does
    register_compression_hook(twin, clone)
    model.zero_grad()
    _backward(model, rank, 3, scaler)
    _backward(twin, rank, 3, scaler)
    for a, b in zip(_grads(model), _grads(twin), strict=True):
        assert torch.equal(a, b)
    assert clone.step == state.step == 4

    # -- in the middle of an exchange: parked buckets (a codec) or in-flight allreduces (plain)
    for codec in (TopK(ratio=0.1), NoCompression()):
        state = CompressionState(codec, min_compression_size=128, process_group=group)
        model = DistributedDataParallel(_model(), bucket_cap_mb=0.001)
        state.bind(model.module.named_parameters())
        taken: list = []
        watch = {"on": False}

        def pickling_hook(st, bucket, taken=taken, watch=watch):
            fut = compressed_hook(st, bucket)
            if watch["on"] and not taken and not bucket.is_last():
                taken.append((len(st._pending) + len(st._inflight), _clone(st)))
            return fut

        model.register_comm_hook(state, pickling_hook)
        _backward(model, rank, 0)  # DDP's first iteration has a single bucket; then it rebuilds
        watch["on"] = True
        model.zero_grad()
        _backward(model, rank, 1)
        assert taken, "the test needs several buckets"
        busy, clone = taken[0]
        assert busy > 0, "the test needs work outstanding when it pickles"
        assert not clone._pending and not clone._inflight
        assert clone.process_group is None
        # nothing stale leaks into the clone's next exchange
        twin = DistributedDataParallel(_model(), bucket_cap_mb=0.001)
        register_compression_hook(twin, clone)
        stock = DistributedDataParallel(_model())
        _backward(twin, rank, 2)
        _backward(stock, rank, 2)
        if isinstance(codec, NoCompression):
            for a, b in zip(_grads(twin), _grads(stock), strict=True):
                assert torch.equal(a, b)
        assert clone.step == 2 and clone.ledger.steps == 2
    return True


def test_compression_state_pickles_without_what_binds_it_to_the_process():
    assert run_distributed(_bare_state, 2) == [True, True]


class _AtStep(pl.Callback):
    """Runs ``check(strategy)`` once, after optimizer step ``step`` (inside the fit, group alive)."""

    def __init__(self, step, check):
        self.step, self.check, self.done = step, check, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            self.check(trainer.strategy)
            self.done = True


def _check_local_sgd(strategy):
    # what a checkpoint takes (the schedule also snapshots this rank's live replica for it)
    original = strategy.compression_state_dict()
    clone = _clone(strategy)
    comm, cloned = strategy.comm_state, clone.comm_state
    assert comm.scaler is strategy.precision_plugin.scaler is not None
    assert cloned.scaler is None and cloned.process_group is None
    assert "generator" in original["comm"] and "generator" not in cloned.state_dict()
    _assert_same_memories(original["comm"], cloned.state_dict(), kinds=("residuals",))
    assert settings_of(clone) == settings_of(strategy)
    assert clone.optimizer_steps == strategy.optimizer_steps == original["optimizer_steps"] == 6
    # the schedule: its reference model and residual travel; its generator and snapshot do not
    sync, cloned_sync = original["sync"], clone.sync.state_dict()
    assert repr(clone.sync) == repr(strategy.sync)
    assert "generator" in sync and "generator" not in cloned_sync
    assert "local" in sync and "local" not in cloned_sync
    assert cloned_sync["layout"] == sync["layout"]
    for key in ("x0", "residual"):
        assert torch.equal(cloned_sync[key], sync[key]), key


def _check_overlap(strategy):
    # right after a sync point: the anchor average it launched is outstanding
    anchor = strategy.sync.anchor.clone()
    clone = _clone(strategy)
    clone.sync.complete()  # nothing pending came along: the clone's anchor stays
    assert torch.equal(clone.sync.anchor, anchor)
    assert torch.equal(clone.sync.state_dict()["v"], strategy.sync.state_dict()["v"])
    assert repr(clone.sync) == repr(strategy.sync)
    strategy.sync.complete()  # the original's average was in flight: completing it moves the anchor
    assert not torch.equal(strategy.sync.anchor, anchor)


def _fits(rank, world_size):
    # float16 mixed precision on CPU: a GradScaler, which the strategy hands to its comm_state
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    local_sgd = CompressedDDP(
        compressor=TopK(ratio=0.05), min_compression_size=256, seed=3, sync=LocalSGD(period=2, warmup_steps=3)
    )
    overlap = CompressedDDP(compressor=NoCompression(), sync=OverlapLocalSGD(period=2))
    runs = [
        (
            local_sgd,
            _AtStep(6, _check_local_sgd),
            7,
            [pl.plugins.precision.MixedPrecision("16-mixed", "cpu", scaler)],
        ),
        (overlap, _AtStep(2, _check_overlap), 3, []),
    ]
    for strategy, check, steps, plugins in runs:
        pl.seed_everything(0, verbose=False)
        kw = trainer_kwargs(
            world_size, strategy=strategy, max_steps=steps, callbacks=[check], plugins=plugins
        )
        pl.Trainer(**kw).fit(ToyClassifier())
        assert check.done
    return True


def test_compressed_ddp_and_its_schedule_pickle_mid_fit():
    assert run_distributed(_fits, 2) == [True, True]
