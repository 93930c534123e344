"""CompressedDDP in ``Trainer(accelerator="gpu")`` runs: training, resume, float16, host syncs.

Every run is a fresh process (``run_distributed``; Lightning sees an externally launched job),
so no CUDA context or process group outlives its test. On one GPU a Trainer runs one process,
where CompressedDDP has nothing to exchange (it warns and leaves DDP alone): there the tests
check that a fit completes with gradients on the device, and count the host syncs of the bare
hook on a 1-rank NCCL DDP (the hook still runs the whole exchange at world size 1). Everything
about the exchange between ranks (training per codec, resume, the float16 overflow path, the
sync count against stock DDP) needs two GPUs, one per process, and is skipped with fewer.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from launch import init_process_group, run_distributed
from lightning_ns import CompressedDDP, pl
from models import BadLossAt, ToyClassifier, flat_params, teacher_dataset, trainer_kwargs
from syncs import count_host_syncs, hook_model, hook_states, train_step
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_compress.compressors import QSGD, CountSketch, NoCompression, TopK
from lightning_compress.hooks import register_compression_hook

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.cuda,
]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")

INIT_SCALE = 2.0**16  # GradScaler's default
CODECS = ["qsgd4", "topk_ef", "sketch_momentum", "none"]


def _strategy(kind: str) -> CompressedDDP | str:
    if kind == "ddp":
        return "ddp"
    settings = {
        "qsgd4": dict(compressor=QSGD(bits=4)),
        "topk_ef": dict(compressor=TopK(ratio=0.01), error_feedback=True),
        "sketch_momentum": dict(compressor=CountSketch(rows=5, ratio=0.05), momentum=0.9),
        "none": dict(compressor=NoCompression()),
    }[kind]
    return CompressedDDP(min_compression_size=256, **settings)


def _momentum(kind: str) -> float:
    return 0.0 if kind == "sketch_momentum" else 0.9  # momentum in the exchange: none in the optimizer


def _loss(model: ToyClassifier) -> float:
    x, y = teacher_dataset(1024, seed=1).tensors
    with torch.no_grad():
        model.cpu()
        return nn.functional.cross_entropy(model(x), y).item()


class _GradDevices(pl.Callback):
    """Records the device type of every gradient after each backward."""

    def __init__(self) -> None:
        self.devices: set[str] = set()

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.devices.update(p.grad.device.type for p in pl_module.parameters() if p.grad is not None)


def _fit(rank: int, world_size: int, kinds: list[str], steps: int) -> dict[str, dict]:
    out = {}
    for kind in kinds:
        pl.seed_everything(0, verbose=False)
        model = ToyClassifier(momentum=_momentum(kind))
        before = _loss(model)
        grads = _GradDevices()
        strategy = _strategy(kind)
        trainer = pl.Trainer(
            **trainer_kwargs(
                world_size, accelerator="gpu", strategy=strategy, max_steps=steps, callbacks=[grads]
            )
        )
        trainer.fit(model)
        params = flat_params(model).cpu()
        out[kind] = {
            "before": before,
            "after": _loss(model),
            "params": params,
            "grad_devices": grads.devices,
            "exchanges": strategy.comm_state.ledger.steps if world_size > 1 else None,
        }
    return out


def test_fit_on_one_gpu_keeps_gradients_on_the_device():
    (out,) = run_distributed(_fit, 1, ["topk_ef"], 30)
    r = out["topk_ef"]
    assert r["grad_devices"] == {"cuda"}
    assert r["after"] < r["before"], r
    assert torch.isfinite(r["params"]).all()


@two_gpus
def test_each_codec_trains_on_two_gpus():
    steps = 120
    out = run_distributed(_fit, 2, CODECS, steps)
    for kind in CODECS:
        r0, r1 = out[0][kind], out[1][kind]
        assert r0["grad_devices"] == {"cuda"}
        assert r0["after"] < 0.8 * r0["before"], (kind, r0["before"], r0["after"])
        assert torch.equal(r0["params"], r1["params"]), f"{kind}: ranks diverged"
        assert r0["exchanges"] == steps


def _resume(rank: int, world_size: int, ckpt_dir: str, kind: str) -> dict:
    """Uninterrupted 2 epochs vs 1 epoch + checkpoint + resumed 2nd epoch (tests/test_strategy.py's)."""
    kw = dict(n=1024, momentum=_momentum(kind))
    overrides = dict(accelerator="gpu", max_epochs=2, max_steps=-1)
    pl.seed_everything(0, verbose=False)
    full = ToyClassifier(**kw)
    pl.Trainer(**trainer_kwargs(world_size, strategy=_strategy(kind), **overrides)).fit(full)

    pl.seed_everything(0, verbose=False)
    first = ToyClassifier(**kw)
    halfway = {**overrides, "max_epochs": 1}
    trainer = pl.Trainer(**trainer_kwargs(world_size, strategy=_strategy(kind), **halfway))
    trainer.fit(first)
    path = os.path.join(ckpt_dir, f"{kind}.ckpt")
    trainer.save_checkpoint(path)

    pl.seed_everything(0, verbose=False)  # DistributedSampler reads PL_GLOBAL_SEED
    resumed = ToyClassifier(**kw)
    trainer = pl.Trainer(**trainer_kwargs(world_size, strategy=_strategy(kind), **overrides))
    trainer.fit(resumed, ckpt_path=path)
    return {"full": flat_params(full).cpu(), "resumed": flat_params(resumed).cpu()}


@two_gpus
@pytest.mark.parametrize("kind", ["qsgd4", "topk_ef", "none"])
def test_resume_on_gpu_equals_uninterrupted(tmp_path, kind):
    # not the count sketch: its index_add_ into colliding buckets uses CUDA atomics, whose order varies
    for r in run_distributed(_resume, 2, str(tmp_path), kind):
        assert torch.equal(r["full"], r["resumed"]), (kind, (r["full"] - r["resumed"]).abs().max())


def _fit_fp16_with_inf(rank: int, world_size: int, kind: str) -> dict:
    pl.seed_everything(0, verbose=False)
    model = BadLossAt(factor=math.inf, momentum=_momentum(kind))  # Inf at step 3 on rank 1
    strategy = _strategy(kind)
    trainer = pl.Trainer(
        **trainer_kwargs(world_size, accelerator="gpu", strategy=strategy, max_steps=8, precision="16-mixed")
    )
    trainer.fit(model)  # used to raise "No inf checks were recorded for this optimizer"
    comm = strategy.comm_state
    memories = [*comm.memory.residuals.values(), *comm.velocity.residuals.values()]
    return {
        "scale": trainer.precision_plugin.scaler.get_scale(),
        "skipped": comm.skipped_steps,
        "memories_finite": all(bool(torch.isfinite(m).all()) for m in memories),
        "memories_on_gpu": all(m.is_cuda for m in memories),
        "n_memories": len(memories),
        "params": flat_params(model).cpu(),
    }


@two_gpus
@pytest.mark.parametrize("kind", ["topk_ef", "qsgd4", "sketch_momentum"])
def test_fp16_overflow_skips_the_step_and_backs_off_the_scale(kind):
    out = run_distributed(_fit_fp16_with_inf, 2, kind)
    for r in out:
        assert r["skipped"] == 1 and r["scale"] == INIT_SCALE / 2, r
        assert torch.isfinite(r["params"]).all()
        assert r["memories_finite"], "error-feedback or momentum memory took in the overflow"
        assert r["memories_on_gpu"]
    assert torch.equal(out[0]["params"], out[1]["params"])
    if kind != "qsgd4":
        assert out[0]["n_memories"] > 0, "the test must look at real memories"


class _CountSyncsAt(pl.Callback):
    """Counts CUDA host syncs over one whole training step (batch start to batch end)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.count: int | None = None
        self.report = ""
        self._counter = None
        self._syncs = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self._counter = count_host_syncs("cuda")
            self._syncs = self._counter.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.count, self.report = self._syncs.count, self._syncs.report()
            self._counter = None


def _count_trainer_syncs(rank: int, world_size: int, kinds: list[str]) -> dict[str, tuple[int, str]]:
    out = {}
    for kind in kinds:
        pl.seed_everything(0, verbose=False)
        counter = _CountSyncsAt(step=5)  # after DDP's bucket rebuild and the memories' first layout
        trainer = pl.Trainer(
            **trainer_kwargs(
                world_size, accelerator="gpu", strategy=_strategy(kind), max_steps=8, callbacks=[counter]
            )
        )
        trainer.fit(ToyClassifier(momentum=_momentum(kind)))
        out[kind] = (counter.count, counter.report)
    return out


@two_gpus
def test_host_syncs_per_step_at_most_one_more_than_stock_ddp():
    out = run_distributed(_count_trainer_syncs, 2, ["ddp", *CODECS])
    for rank_counts in out:
        stock, _ = rank_counts["ddp"]
        for kind in CODECS:
            count, report = rank_counts[kind]
            assert count is not None
            assert count <= stock + 1, f"{kind}: {count} syncs, stock DDP {stock}\n{report}"


def _count_hook_syncs(rank: int, world_size: int, kinds: list[str]) -> dict[str, tuple[int, str]]:
    init_process_group(rank, world_size, backend="nccl")
    device = torch.device("cuda", torch.cuda.current_device())
    states = hook_states()
    out = {}
    for kind in kinds:
        net = hook_model().to(device)
        model = DistributedDataParallel(net, device_ids=[device.index], bucket_cap_mb=0.01)
        if states[kind] is not None:
            register_compression_hook(model, states[kind])
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        x = torch.randn(16, 32, device=device)
        for _ in range(3):
            train_step(model, opt, x)
        torch.cuda.synchronize()
        with count_host_syncs("cuda") as syncs:
            train_step(model, opt, x)
        out[kind] = (syncs.count, syncs.report())
    return out


def test_bare_hook_on_one_gpu_adds_at_most_one_host_sync_per_step():
    kinds = list(hook_states())  # stock_ddp first
    (out,) = run_distributed(_count_hook_syncs, 1, kinds)
    stock, _ = out["stock_ddp"]
    for kind in kinds[1:]:
        count, report = out[kind]
        assert count <= stock + 1, f"{kind}: {count} syncs, stock DDP {stock}\n{report}"
