"""Float16 mixed precision: the exchange under a GradScaler, on CPU (a CPU GradScaler).

Lightning refuses ``precision="16-mixed"`` on CPU, so the Trainer tests pass its
``MixedPrecision`` plugin with a CPU ``torch.amp.GradScaler`` explicitly: the same plugin, scaler
logic and code path as on a GPU, autocast on CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from launch import init_process_group, run_distributed
from lightning_ns import CommunicationMonitor, CompressedDDP, pl
from models import BadLossAt, flat_params, trainer_kwargs
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_compress.compressors import QSGD, CountSketch, TopK
from lightning_compress.hooks import CompressionState, register_compression_hook
from lightning_compress.sync import LocalSGD

INIT_SCALE = 2.0**16  # GradScaler's default


def _plugin():
    precision = pl.plugins.precision.MixedPrecision
    return precision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=INIT_SCALE))


def _fit_with_inf(rank, world_size, kind):
    pl.seed_everything(0, verbose=False)
    settings = {
        "topk_ef": dict(compressor=TopK(ratio=0.05), error_feedback=True),
        "qsgd": dict(compressor=QSGD(bits=4)),
        "sketch_momentum": dict(compressor=CountSketch(ratio=0.05, rows=3), momentum=0.9),
        "none": dict(compressor="none"),
        "local_sgd": dict(compressor=TopK(ratio=0.05), sync=LocalSGD(period=2)),
    }[kind]
    # Local SGD: rank 1's Inf falls on a local step (2 steps per period), which only rank 1 skips
    momentum = 0.0 if "momentum" in settings else 0.9
    model = BadLossAt(bad_step=3 if kind != "local_sgd" else 2, factor=math.inf, momentum=momentum)
    strategy = CompressedDDP(min_compression_size=256, **settings)
    plugin = _plugin()
    trainer = pl.Trainer(**trainer_kwargs(world_size, strategy=strategy, max_steps=8), plugins=[plugin])
    trainer.fit(model)  # used to raise "No inf checks were recorded for this optimizer"
    comm = strategy.comm_state
    memories = [*comm.memory.residuals.values(), *comm.velocity.residuals.values()]
    return {
        "scale": plugin.scaler.get_scale(),
        "skipped": strategy.comm_state.skipped_steps,
        "memories_finite": all(bool(torch.isfinite(m).all()) for m in memories),
        "n_memories": len(memories),
        "params": flat_params(model),
        "optimizer_steps": strategy.optimizer_steps,
    }


@pytest.mark.parametrize("kind", ["topk_ef", "qsgd", "sketch_momentum", "none", "local_sgd"])
def test_overflow_step_goes_through_the_scaler(kind):
    """The skipped step backs the scale off once, leaves every memory finite and the model finite."""
    out = run_distributed(_fit_with_inf, 2, kind)
    if kind == "local_sgd":  # a local step: rank 1's scaler alone skips it and backs off
        assert [r["scale"] for r in out] == [INIT_SCALE, INIT_SCALE / 2]
        assert [r["skipped"] for r in out] == [0, 0]  # the scaler's doing, not the exchange's
    else:  # a synchronous step: every rank skips, every scaler backs off, identically
        for r in out:
            assert r["skipped"] == 1 and r["scale"] == INIT_SCALE / 2, r
        assert torch.equal(out[0]["params"], out[1]["params"])
    for r in out:
        assert r["optimizer_steps"] == 8
        assert torch.isfinite(r["params"]).all()
        assert r["memories_finite"], "error-feedback or momentum memory took in the overflow"
    if kind in ("topk_ef", "sketch_momentum"):
        assert out[0]["n_memories"] > 0, "the test must look at real memories"


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))


def _scaled_exchange(rank, world_size, codec, scales):
    """Run the bare hook on the same gradients times each step's loss scale (None: no scaler)."""
    init_process_group(rank, world_size)
    model = DistributedDataParallel(_model())
    state = CompressionState(codec, min_compression_size=128, seed=7)
    scaler = None
    if scales[0] is not None:
        scaler = torch.amp.GradScaler("cpu", init_scale=scales[0])
        state.scaler = scaler
        scaler.scale(torch.ones(()))  # creates its scale tensor (a Trainer's first backward does)
    register_compression_hook(model, state)
    gen = torch.Generator().manual_seed(rank)
    out = []
    for scale in scales:
        if scaler is not None:
            scaler.update(scale)  # the scale a GradScaler would have after backing off or growing
        model.zero_grad()
        x = torch.randn(16, 32, generator=gen)
        loss = model(x).pow(2).mean()
        (scaler.scale(loss) if scaler is not None else loss).backward()
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        out.append(
            {
                "grads": grads / (scale or 1.0),
                "memory": {k: v.clone() for k, v in state.memory.residuals.items()},
            }
        )
    return out


@pytest.mark.parametrize(
    "codec",
    [TopK(ratio=0.05), TopK(ratio=0.05, value_dtype=torch.float16), QSGD(bits=4)],
    ids=["topk", "topk_fp16_values", "qsgd4"],
)
def test_exchange_runs_in_unscaled_units_whatever_the_loss_scale(codec):
    """Scaled gradients give the unscaled run's averages times the scale, and the same memory.

    The scale changes from step to step (2^16, then backed off to 2^15, grown to 2^17): a memory
    kept in scaled units would be off by the ratio of the scales. Powers of two scale exactly, so
    the comparison is exact, QSGD's random draws included (same seed, same unscaled inputs).
    """
    scales = [2.0**16, 2.0**15, 2.0**17, 2.0**17]
    plain = run_distributed(_scaled_exchange, 2, codec, [None] * len(scales))
    scaled = run_distributed(_scaled_exchange, 2, codec, scales)
    for rank in range(2):
        for step, (a, b) in enumerate(zip(plain[rank], scaled[rank], strict=True)):
            assert torch.equal(a["grads"], b["grads"]), f"rank {rank} step {step}"
            assert a["memory"].keys() == b["memory"].keys()
            for key in a["memory"]:
                assert torch.equal(a["memory"][key], b["memory"][key]), f"memory {key} step {step}"
    if isinstance(codec, TopK):
        assert plain[0][-1]["memory"], "Top-K keeps error feedback by default: the test must compare memories"


def _fp16_values(rank, world_size):
    init_process_group(rank, world_size)
    codec = TopK(k=4, value_dtype=torch.float16)
    model = DistributedDataParallel(nn.Linear(64, 32, bias=False))
    state = CompressionState(codec, min_compression_size=128)
    state.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**17)
    register_compression_hook(model, state)
    with torch.no_grad():
        model.module.weight.zero_()
    x = torch.zeros(1, 64)
    x[0, 0] = 1.0
    # d(loss)/dW[0, 0] = 1, scaled 2^17 = 131072: past float16's 65504 unless unscaled first
    loss = model(x)[0, 0]
    state.scaler.scale(loss).backward()
    return model.module.weight.grad[0, 0].item()


def test_float16_payload_values_do_not_clamp_scaled_gradients():
    out = run_distributed(_fp16_values, 2)
    assert out == [2.0**17, 2.0**17]  # the true gradient 1.0 times the scale, not 65504


def test_nonfinite_ignore_with_a_scaler_and_memory_is_refused():
    strategy = CompressedDDP(compressor=TopK(ratio=0.01), nonfinite="ignore")
    strategy.precision_plugin = _plugin()
    with pytest.raises(ValueError, match=r"nonfinite='ignore'.*GradScaler"):
        strategy._attach_scaler()
    plain = CompressedDDP(compressor=QSGD(bits=4), nonfinite="ignore")  # no memory: like stock DDP
    plain.precision_plugin = _plugin()
    plain._attach_scaler()
    assert plain.comm_state.scaler is plain.precision_plugin.scaler


def test_loss_scale_is_read_on_the_device_or_through_the_public_api():
    state = CompressionState(QSGD(bits=4))
    assert state.loss_scale(None) is None  # no scaler
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0)
    state.scaler = scaler
    assert state.loss_scale(None) is None  # nothing scaled yet
    scaler.scale(torch.ones(()))
    assert float(state.loss_scale(torch.device("cpu"))) == 512.0

    class PublicOnly:  # a scaler without GradScaler's private _scale
        def is_enabled(self) -> bool:
            return True

        def get_scale(self) -> float:
            return 1024.0

    state.scaler = PublicOnly()
    assert float(state.loss_scale(torch.device("cpu"))) == 1024.0
    state.scaler = torch.amp.GradScaler("cpu", enabled=False)
    assert state.loss_scale(None) is None


def _monitor_fit_with_inf(rank, world_size):
    pl.seed_everything(0, verbose=False)
    monitor = CommunicationMonitor(compressor=TopK(ratio=0.05), min_compression_size=256, summary=False)
    plugin = _plugin()
    trainer = pl.Trainer(
        **trainer_kwargs(world_size, strategy="ddp", max_steps=8), plugins=[plugin], callbacks=[monitor]
    )
    trainer.fit(BadLossAt(factor=math.inf, momentum=0.9))
    state = monitor._own_state
    return {
        "scale": plugin.scaler.get_scale(),
        "skipped": state.skipped_steps,
        "memory_finite": all(bool(torch.isfinite(m).all()) for m in state.memory.residuals.values()),
        "n_memories": len(state.memory.residuals),
    }


def test_monitor_on_stock_ddp_sends_overflow_steps_through_the_scaler():
    """The monitor's own compressing hook on strategy="ddp" takes the scaler as CompressedDDP does."""
    out = run_distributed(_monitor_fit_with_inf, 2)
    for r in out:
        assert r["skipped"] == 1 and r["scale"] == INIT_SCALE / 2, r  # zeroed gradients kept the scale
        assert r["n_memories"] == 1 and r["memory_finite"], r
