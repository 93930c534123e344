"""CompressedDDP in real Lightning Trainers on real gloo process groups."""

from __future__ import annotations

import os

import pytest
import torch
from launch import run_distributed
from lightning_ns import CompressedDDP, pl
from models import ToyClassifier, flat_params, trainer_kwargs

from lightning_compress.compressors import QSGD, CountSketch, NoCompression, TopK


def _fit(rank, world_size, strategy_factory, steps, overrides=None):
    pl.seed_everything(0, verbose=False)
    model = ToyClassifier()
    strategy = strategy_factory()
    trainer = pl.Trainer(
        **trainer_kwargs(world_size, strategy=strategy, max_steps=steps, **(overrides or {}))
    )
    trainer.fit(model)
    out = {"params": flat_params(model), "acc": model.accuracy()}
    if isinstance(strategy, CompressedDDP):
        ledger = strategy.comm_state.ledger
        out.update(
            total=ledger.total,
            last=ledger.last,
            steps=ledger.steps,
            sizes=[(n, p.numel()) for n, p in model.named_parameters()],
        )
    return out


def stock_ddp():
    return "ddp"


def qsgd4():
    return CompressedDDP(compressor=QSGD(bits=4), min_compression_size=256)


def topk_ef():
    return CompressedDDP(compressor=TopK(ratio=0.01), error_feedback=True, min_compression_size=256)


def sketch():
    return CompressedDDP(compressor=CountSketch(rows=5, ratio=0.05), momentum=0.9, min_compression_size=256)


def none():
    return CompressedDDP(compressor=NoCompression(), min_compression_size=256)


STEPS = 192


@pytest.fixture(scope="module")
def ddp_baseline():
    return run_distributed(_fit, 2, stock_ddp, STEPS)


@pytest.mark.parametrize(
    "factory", [qsgd4, topk_ef, sketch, none], ids=["qsgd4", "topk_ef", "sketch", "none"]
)
def test_trains_like_ddp_with_identical_ranks(factory, ddp_baseline):
    results = run_distributed(_fit, 2, factory, STEPS)
    assert torch.equal(results[0]["params"], results[1]["params"]), "ranks diverged"
    base_acc = ddp_baseline[0]["acc"]
    assert base_acc > 0.7, f"the task should be learnable (stock DDP reached {base_acc})"
    assert results[0]["acc"] >= base_acc - 0.02, (results[0]["acc"], base_acc)
    assert results[0]["steps"] == STEPS


def test_ledger_matches_payload_formula():
    results = run_distributed(_fit, 2, qsgd4, 3)
    sizes = results[0]["sizes"]
    large = sum(n for _, n in sizes if n >= 256)
    small = sum(n for _, n in sizes if n < 256)
    codec = QSGD(bits=4)
    # 2 ranks: one all-gather of the whole payload (chunks add up to it exactly), dense small
    # tensors + the 4-byte non-finite flag in the dense allreduce (no policy: the squared norm a
    # policy decides from is not sent)
    per_step = codec.payload_nbytes(large) + 4 * small + 4
    for r in results:
        assert r["last"].payload_bytes == per_step
        assert r["total"].payload_bytes == 3 * per_step
        assert r["last"].coords == large + small
        # codes, scales and the dense small tensors: about 4 bits per coordinate, not 32
        assert r["last"].bits_per_coord < 6


def _exchange_4(rank, world_size, n):
    import torch.distributed as dist
    from launch import init_process_group

    from lightning_compress.comm import BitLedger, two_phase_allreduce

    init_process_group(rank, world_size)
    torch.manual_seed(100 + rank)
    x = torch.randn(n)
    codec = QSGD(bits=4)
    ledger = BitLedger()
    gen = torch.Generator().manual_seed(rank)
    res = two_phase_allreduce(codec, x, None, ledger, gen)
    ledger.end_step()
    xs = [torch.empty(n) for _ in range(world_size)]
    dist.all_gather(xs, x)
    return {"avg": res.average, "mean": torch.stack(xs).mean(0), "last": ledger.last}


def test_two_phase_bytes_do_not_grow_with_workers():
    n = 40_000
    per = {}
    for w in (2, 4):
        res = run_distributed(_exchange_4, w, n)
        for r in res:
            assert torch.equal(r["avg"], res[0]["avg"]), "decoded averages differ between ranks"
            # the average is within quantization error of the exact mean
            err = (r["avg"] - r["mean"]).norm() / r["mean"].norm()
            assert err < 0.5, err
        per[w] = res[0]["last"]
    # bytes handed to collectives per coordinate: (1 + 1/W) * B/8 + scales; never grows with W
    assert per[4].payload_bytes <= per[2].payload_bytes
    # wire bytes: 2 (W-1)/W * payload, bounded by twice the payload whatever W (a gather would grow as W-1)
    p = QSGD(bits=4).payload_nbytes(n)
    for w, rec in per.items():
        assert rec.wire_bytes <= 2 * p * 1.01
        assert rec.wire_bytes == pytest.approx(2 * (w - 1) / w * p, rel=0.01)


def _buckets(rank, world_size, cap):
    def factory():
        return CompressedDDP(
            compressor=TopK(ratio=0.01), error_feedback=True, min_compression_size=256, bucket_cap_mb=cap
        )

    return _fit(rank, world_size, factory, 12)


def test_many_buckets_on_gloo_match_one_bucket():
    tiny = run_distributed(_buckets, 2, 0.001)
    big = run_distributed(_buckets, 2, 100.0)
    assert torch.equal(tiny[0]["params"], tiny[1]["params"])
    torch.testing.assert_close(tiny[0]["params"], big[0]["params"], rtol=1e-5, atol=1e-6)


def _resume(rank, world_size, ckpt_dir, factory):
    pl.seed_everything(0, verbose=False)
    full = ToyClassifier(n=1024, momentum=0.9)
    trainer = pl.Trainer(**trainer_kwargs(world_size, strategy=factory(), max_epochs=2, max_steps=-1))
    trainer.fit(full)

    pl.seed_everything(0, verbose=False)
    first = ToyClassifier(n=1024, momentum=0.9)
    trainer = pl.Trainer(**trainer_kwargs(world_size, strategy=factory(), max_epochs=1, max_steps=-1))
    trainer.fit(first)
    path = os.path.join(ckpt_dir, "half.ckpt")
    trainer.save_checkpoint(path)

    pl.seed_everything(0, verbose=False)  # same script, same seed: DistributedSampler reads PL_GLOBAL_SEED
    resumed = ToyClassifier(n=1024, momentum=0.9)
    strategy = factory()
    trainer = pl.Trainer(**trainer_kwargs(world_size, strategy=strategy, max_epochs=2, max_steps=-1))
    trainer.fit(resumed, ckpt_path=path)
    ckpt = torch.load(path, weights_only=False)
    return {
        "full": flat_params(full),
        "resumed": flat_params(resumed),
        "ckpt_ranks": len(ckpt["lightning_compress"]["ranks"]),
        "residual_norm": sum(
            v.norm() for v in ckpt["lightning_compress"]["ranks"][rank]["comm"]["residuals"].values()
        ),
    }


@pytest.mark.parametrize("factory", [topk_ef, qsgd4, none], ids=["topk_ef", "qsgd4", "none"])
def test_resume_equals_uninterrupted(tmp_path, factory):
    res = run_distributed(_resume, 2, str(tmp_path), factory)
    for r in res:
        assert r["ckpt_ranks"] == 2
        assert torch.equal(r["full"], r["resumed"]), (r["full"] - r["resumed"]).abs().max()
    if factory is topk_ef:
        assert res[0]["residual_norm"] > 0  # the residuals were really saved, per rank


def _accumulate(rank, world_size):
    return _fit(rank, world_size, qsgd4, 6, {"accumulate_grad_batches": 2, "precision": "bf16-mixed"})


def test_bf16_and_accumulation_communicate_once_per_optimizer_step():
    res = run_distributed(_accumulate, 2)
    assert res[0]["steps"] == 6
    assert torch.equal(res[0]["params"], res[1]["params"])


def test_registered_by_name():
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy="ddp_compressed", logger=False)
    assert isinstance(trainer.strategy, CompressedDDP)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"compressor": "zip"}, ValueError, "compressor"),
        ({"compressor": 3}, TypeError, "compressor"),
        ({"sync": "local"}, TypeError, "sync"),
        ({"min_compression_size": -1}, ValueError, "min_compression_size"),
        ({"warmup_steps": -2}, ValueError, "warmup_steps"),
        ({"momentum": 1.5}, ValueError, "momentum"),
        ({"ddp_comm_hook": lambda s, b: None}, ValueError, "ddp_comm_hook"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        CompressedDDP(**kwargs)


def _bucket_view(rank, world_size, as_view):
    extra = {} if as_view is None else {"gradient_as_bucket_view": as_view}

    def factory():
        return CompressedDDP(compressor=QSGD(bits=4), min_compression_size=256, bucket_cap_mb=0.001, **extra)

    seen = []

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            seen.append(trainer.strategy.model.gradient_as_bucket_view)  # the DDP wrapper's setting

    pl.seed_everything(0, verbose=False)
    model = ToyClassifier()
    trainer = pl.Trainer(**trainer_kwargs(world_size, strategy=factory(), max_steps=6, callbacks=[Probe()]))
    trainer.fit(model)
    return {"params": flat_params(model), "as_view": set(seen)}


def test_gradients_are_bucket_views_by_default_with_the_same_result():
    # the exchange reads and overwrites DDP's buckets in place: with the gradients as views of
    # them, neither backward nor the end of the exchange copies the gradient, and nothing changes
    default = run_distributed(_bucket_view, 2, None)
    copied = run_distributed(_bucket_view, 2, False)
    assert [r["as_view"] for r in default] == [{True}, {True}]
    assert [r["as_view"] for r in copied] == [{False}, {False}]
    for a, b in zip(default, copied, strict=True):
        assert torch.equal(a["params"], b["params"])
