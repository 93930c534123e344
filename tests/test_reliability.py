"""Faults and edge cases fail loudly and consistently, never silently or by hanging."""

from __future__ import annotations

import datetime
import os
import signal
import time

import pytest
import torch
from launch import run_distributed
from lightning_ns import CompressedDDP, pl
from models import BadLossAt, ToyClassifier, flat_params, trainer_kwargs
from torch import nn

from lightning_compress.compressors import QSGD, TopK
from lightning_compress.strategy import CHECKPOINT_KEY


def _nan_run(rank, world_size, mode):
    pl.seed_everything(0, verbose=False)
    model = BadLossAt(momentum=0.9)  # NaN at step 3 on rank 1
    strategy = CompressedDDP(
        compressor=TopK(ratio=0.05), error_feedback=True, min_compression_size=256, nonfinite=mode
    )
    trainer = pl.Trainer(**trainer_kwargs(world_size, strategy=strategy, max_steps=8))
    try:
        trainer.fit(model)
    except FloatingPointError as err:
        return {"raised": str(err)}
    residual = strategy.comm_state.memory.residuals["compressed"]
    return {
        "params": flat_params(model),
        "skipped": strategy.comm_state.skipped_steps,
        "residual_finite": bool(torch.isfinite(residual).all()),
    }


def test_nonfinite_gradient_on_one_rank_is_skipped_by_all():
    out = run_distributed(_nan_run, 2, "skip")
    for r in out:
        assert r["skipped"] == 1
        assert torch.isfinite(r["params"]).all()
        assert r["residual_finite"], "error-feedback memory was poisoned"
    assert torch.equal(out[0]["params"], out[1]["params"])


def test_nonfinite_gradient_raises_on_every_rank():
    out = run_distributed(_nan_run, 2, "raise")
    for r in out:
        assert "non-finite gradients" in r["raised"] and "1 of 2 ranks" in r["raised"]


def _killed(rank, world_size, timeout_s):
    pl.seed_everything(0, verbose=False)

    class DiesAt(ToyClassifier):
        def training_step(self, batch, batch_idx):
            if self.global_step == 3 and self.global_rank == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return super().training_step(batch, batch_idx)

    strategy = CompressedDDP(
        compressor=QSGD(bits=4), min_compression_size=256, timeout=datetime.timedelta(seconds=timeout_s)
    )
    trainer = pl.Trainer(**trainer_kwargs(world_size, strategy=strategy, max_steps=50))
    start = time.monotonic()
    try:
        trainer.fit(DiesAt())
    except Exception as err:  # the survivors must fail, not hang
        return {"error": type(err).__name__, "message": str(err)[:300], "elapsed": time.monotonic() - start}
    return {"error": None}


def test_killed_rank_makes_survivors_fail_within_timeout():
    timeout_s = 20
    start = time.monotonic()
    out = run_distributed(_killed, 3, timeout_s, timeout=timeout_s + 120, allow_failures=True)
    assert out[2] is None  # the killed rank left no report
    for r in out[:2]:
        assert r is not None and r["error"] is not None, r
        assert r["elapsed"] < timeout_s + 30, r
    assert time.monotonic() - start < timeout_s + 120


def _unused_and_frozen(rank, world_size):
    pl.seed_everything(0, verbose=False)

    class Partly(ToyClassifier):
        def __init__(self):
            super().__init__()
            self.unused = nn.Linear(64, 64)  # never in the graph
            self.net[0].weight.requires_grad_(False)  # frozen

    model = Partly()
    frozen = model.net[0].weight.detach().clone()
    strategy = CompressedDDP(compressor=QSGD(bits=4), min_compression_size=256, find_unused_parameters=True)
    pl.Trainer(**trainer_kwargs(world_size, strategy=strategy, max_steps=5)).fit(model)
    return {"params": flat_params(model), "frozen_kept": torch.equal(frozen, model.net[0].weight)}


def test_unused_parameters_and_frozen_layers():
    out = run_distributed(_unused_and_frozen, 2)
    assert torch.equal(out[0]["params"], out[1]["params"])
    assert out[0]["frozen_kept"]


def _manual(rank, world_size):
    pl.seed_everything(0, verbose=False)

    class Manual(ToyClassifier):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
            self.manual_backward(loss)
            opt.step()

    model = Manual()
    strategy = CompressedDDP(compressor=TopK(ratio=0.05), min_compression_size=256)
    pl.Trainer(**trainer_kwargs(world_size, strategy=strategy, max_steps=5)).fit(model)
    return {"params": flat_params(model), "steps": strategy.comm_state.ledger.steps}


def test_manual_optimization_compresses_and_ranks_agree():
    out = run_distributed(_manual, 2)
    assert out[0]["steps"] == 5
    assert torch.equal(out[0]["params"], out[1]["params"])


def _manual_nan(rank, world_size):
    pl.seed_everything(0, verbose=False)

    class ManualNaN(BadLossAt):
        def __init__(self):
            super().__init__(bad_step=2, momentum=0.9)
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(super().training_step(batch, batch_idx))
            before = flat_params(self)
            opt.step()
            if self.global_step == 3:  # the step after the bad one (the counter is already advanced)
                self.unchanged = torch.equal(before, flat_params(self))

    model = ManualNaN()
    strategy = CompressedDDP(compressor=TopK(ratio=0.05), min_compression_size=256)
    pl.Trainer(**trainer_kwargs(world_size, strategy=strategy, max_steps=5)).fit(model)
    return {"params": flat_params(model), "skipped": strategy.comm_state.skipped_steps,
            "unchanged": getattr(model, "unchanged", None)}


def test_manual_optimization_skips_a_nonfinite_step():
    """The hook decides during manual_backward, before optimizer_step: the step is still skipped."""
    out = run_distributed(_manual_nan, 2)
    for r in out:
        assert r["skipped"] == 1
        assert r["unchanged"] is True, "optimizer.step moved the parameters on the skipped step"
        assert torch.isfinite(r["params"]).all()
    assert torch.equal(out[0]["params"], out[1]["params"])


def test_checkpoint_from_stock_ddp_starts_fresh_with_warning():
    strategy = CompressedDDP()
    with pytest.warns(UserWarning, match="no compression state"):
        strategy.restore_compression_state({"state_dict": {}})
    assert strategy._restored is None


def test_corrupted_compression_state_is_a_clear_error():
    strategy = CompressedDDP()
    with pytest.raises(ValueError, match="corrupted"):
        strategy.restore_compression_state({CHECKPOINT_KEY: {"ranks": "garbage"}})
    with pytest.raises(ValueError, match="missing"):
        strategy.comm_state.load_state_dict({"ledger": {}})


def test_checkpoint_from_another_world_size_warns():
    strategy = CompressedDDP()
    rank = {"optimizer_steps": 7, "comm": CompressedDDP().comm_state.state_dict(), "sync": {}}
    entry = {"version": 1, "world_size": 4, "ranks": [rank] * 4}
    with pytest.warns(UserWarning, match="4 ranks"):
        strategy.restore_compression_state({CHECKPOINT_KEY: entry})
    assert strategy._restored == {"optimizer_steps": 7}


@pytest.mark.parametrize(
    "kwargs, match",
    [({"nonfinite": "maybe"}, "nonfinite"), ({"compressor": "qsgd8"}, "compressor")],
)
def test_misconfiguration_names_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CompressedDDP(**kwargs)


def test_compressed_checkpoint_into_stock_ddp_warns_through_the_monitor():
    from lightning_ns import CommunicationMonitor

    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy="ddp", logger=False)
    with pytest.warns(UserWarning, match="ignores"):
        CommunicationMonitor().on_load_checkpoint(trainer, None, {CHECKPOINT_KEY: {"ranks": []}})
