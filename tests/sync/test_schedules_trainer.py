"""LocalSGD, SlowMo and OverlapLocalSGD in real Lightning Trainers on real 2-rank gloo groups."""

from __future__ import annotations

import pytest
import torch
from fitting import fit_many
from launch import run_distributed
from lightning_ns import CompressedDDP

from lightning_compress.compressors import QSGD, NoCompression, TopK
from lightning_compress.sync import LocalSGD, OverlapLocalSGD, SlowMo

TAU = 4
STEPS = 320  # long enough for every schedule to converge on the toy task (and a multiple of TAU)
RECORD = 12
WARMUP = 8  # a multiple of TAU: the last step (STEPS) is then a sync point


def stock_ddp():
    return "ddp"


def local_sgd():
    return CompressedDDP(compressor=NoCompression(), sync=LocalSGD(period=TAU))


def slowmo():
    return CompressedDDP(compressor=NoCompression(), sync=SlowMo(period=TAU, momentum=0.5))


def overlap():
    return CompressedDDP(compressor=NoCompression(), sync=OverlapLocalSGD(period=TAU))


def local_qsgd8():
    return CompressedDDP(compressor=QSGD(bits=8), min_compression_size=256, sync=LocalSGD(period=TAU))


def slowmo_qsgd8():
    return CompressedDDP(compressor=QSGD(bits=8), min_compression_size=256, sync=SlowMo(period=TAU))


def local_topk_ef():
    return CompressedDDP(compressor=TopK(ratio=0.1), error_feedback=True, min_compression_size=256,
                         sync=LocalSGD(period=TAU, warmup_steps=WARMUP))


def overlap_qsgd8():
    return CompressedDDP(compressor=QSGD(bits=8), min_compression_size=256, sync=OverlapLocalSGD(period=TAU))


def slowmo_average_buffers():
    return CompressedDDP(compressor=NoCompression(), sync=SlowMo(period=TAU, momentum_buffers="average"))


@pytest.fixture(scope="module")
def exact_runs():
    factories = {"ddp": stock_ddp, "local": local_sgd, "slowmo": slowmo, "overlap": overlap}
    return run_distributed(fit_many, 2, factories, STEPS, RECORD)


@pytest.fixture(scope="module")
def compressed_runs():
    factories = {"ddp": stock_ddp, "local_q": local_qsgd8, "slowmo_q": slowmo_qsgd8, "topk": local_topk_ef,
                 "overlap_q": overlap_qsgd8}
    return run_distributed(fit_many, 2, factories, STEPS, RECORD)


def _synced(step, warmup=0):
    return step > warmup and (step - warmup) % TAU == 0


@pytest.mark.parametrize("name", ["local", "slowmo", "overlap"])
def test_reaches_ddp_accuracy(exact_runs, name):
    base = exact_runs[0]["ddp"]["acc"]
    assert base > 0.85, f"the task should be learnable (stock DDP reached {base})"
    for rank in exact_runs:
        assert rank[name]["acc"] >= base - 0.02, (name, rank[name]["acc"], base)


@pytest.mark.parametrize("name", ["local", "slowmo"])
def test_replicas_identical_exactly_at_sync_points(exact_runs, name):
    r0, r1 = (r[name] for r in exact_runs)
    assert torch.equal(r0["params"], r1["params"])  # STEPS is a multiple of TAU
    for step in range(1, RECORD + 1):
        same = torch.equal(r0["rec_params"][step], r1["rec_params"][step])
        # right after a sync point identical; on local steps each rank followed its own gradients
        assert same == _synced(step), (name, step, same)


def test_overlap_anchor_identical_replicas_pulled_towards_it(exact_runs):
    r0, r1 = (r["overlap"] for r in exact_runs)
    assert torch.equal(r0["anchor"], r1["anchor"])
    for step, anchor in r0["rec_anchors"].items():
        assert torch.equal(anchor, r1["rec_anchors"][step]), step
    # Overlap-Local-SGD never makes the replicas identical (each is pulled towards the anchor)
    assert not torch.equal(r0["params"], r1["params"])
    # the pulled-back replicas stay close to each other
    gap = (r0["params"] - r1["params"]).norm() / r0["params"].norm()
    assert gap < 0.05, gap


@pytest.mark.parametrize("name", ["local", "slowmo", "overlap"])
def test_ledger_counts_one_model_per_period(exact_runs, name):
    for rank in exact_runs:
        r = rank[name]
        full = 4 * (r["numel"] + 1)  # the model and the non-finite flag, one allreduce
        assert r["steps"] == STEPS == r["optimizer_steps"]  # one ledger step per optimizer step
        assert r["total"].payload_bytes == STEPS // TAU * full
        assert r["total"].payload_bytes / r["steps"] == full / TAU
        assert r["total"].collectives == STEPS // TAU  # one fused collective per sync point
        # against stock DDP, which allreduces every gradient at every step: τ times fewer bytes
        assert r["total"].compression_ratio == pytest.approx(TAU, rel=1e-3)
        for step in range(1, RECORD + 1):
            assert r["rec_ledger_steps"][step] == step
            assert r["rec_bytes"][step] == (full if _synced(step) else 0), (name, step)


def test_compressed_delta_average_agrees_and_trains(compressed_runs):
    base = compressed_runs[0]["ddp"]["acc"]
    for name in ("local_q", "slowmo_q", "topk"):
        r0, r1 = (r[name] for r in compressed_runs)
        assert torch.equal(r0["params"], r1["params"]), name
        for step in range(1, RECORD + 1):
            warmup = WARMUP if name == "topk" else 0
            synced = step <= warmup or _synced(step, warmup)
            assert torch.equal(r0["rec_params"][step], r1["rec_params"][step]) == synced, (name, step)
        assert r0["acc"] >= base - 0.02, (name, r0["acc"], base)


@pytest.mark.parametrize("name", ["local_q", "overlap_q"])
def test_compressed_average_bytes(compressed_runs, name):
    r = compressed_runs[0][name]
    codec = QSGD(bits=8)
    sizes = [16 * 128, 128, 128 * 128, 128, 128 * 4, 4]
    large = sum(n for n in sizes if n >= 256)
    small = sum(n for n in sizes if n < 256)
    # 2 ranks: the dense part with the flag, and one all-gather of the whole compressed payload
    per_sync = 4 * (small + 1) + codec.payload_nbytes(large)
    assert r["numel"] == large + small
    assert r["total"].payload_bytes == STEPS // TAU * per_sync
    # on the wire: about 4x fewer bytes than the exact float32 average of the same coordinates
    assert r["total"].coords == STEPS // TAU * r["numel"]
    assert r["total"].compression_ratio > 3.5, r["total"].compression_ratio
    for step in range(1, RECORD + 1):  # the bytes are counted in the step that issues them
        assert r["rec_bytes"][step] == (per_sync if _synced(step) else 0), (name, step)


def test_compressed_overlap_anchor_identical_and_trains(compressed_runs):
    base = compressed_runs[0]["ddp"]["acc"]
    r0, r1 = (r["overlap_q"] for r in compressed_runs)
    assert torch.equal(r0["anchor"], r1["anchor"])
    for step, anchor in r0["rec_anchors"].items():
        assert torch.equal(anchor, r1["rec_anchors"][step]), step
    assert not torch.equal(r0["params"], r1["params"])  # pulled towards the anchor, never replaced
    assert r0["acc"] >= base - 0.02, (r0["acc"], base)


def test_warmup_communicates_every_step_then_locally(compressed_runs):
    r0, r1 = (r["topk"] for r in compressed_runs)
    assert r0["steps"] == STEPS
    for step in range(1, RECORD + 1):
        if step <= WARMUP:  # warm-up: every step exchanges (compressed) gradients
            assert r0["rec_bytes"][step] > 0, step
        else:
            assert (r0["rec_bytes"][step] > 0) == _synced(step, WARMUP), step


def _bn(rank, world_size):
    # BatchNorm model, base momentum 0.9, two periods
    factories = {"local": local_sgd, "slowmo": slowmo, "slowmo_avg": slowmo_average_buffers,
                 "overlap": overlap}
    return fit_many(rank, world_size, factories, 2 * TAU, 2 * TAU, {"momentum": 0.9}, True)


def _same_momentum(states0, states1):
    pairs = zip(states0, states1, strict=True)
    return [torch.equal(a["momentum_buffer"], b["momentum_buffer"]) for a, b in pairs]


@pytest.fixture(scope="module")
def bn_runs():
    return run_distributed(_bn, 2)


def test_slowmo_momentum_buffers_policies(bn_runs):
    # "zero" (default) leaves no buffers right after the last (sync) step; "average" identical ones
    assert bn_runs[0]["slowmo"]["optimizer_state"] == []
    keep0, keep1 = (r["local"]["optimizer_state"] for r in bn_runs)  # LocalSGD keeps local buffers
    assert keep0 and not all(_same_momentum(keep0, keep1))
    avg0, avg1 = (r["slowmo_avg"]["optimizer_state"] for r in bn_runs)
    assert avg0 and all(_same_momentum(avg0, avg1))
    r = bn_runs[0]["slowmo_avg"]
    n_buffers = sum(v.numel() for v in r["buffers"].values() if v.is_floating_point())
    # per sync point: one allreduce of parameters and float buffers, one of the momentum buffers
    assert r["total"].payload_bytes == 2 * (4 * (r["numel"] + n_buffers + 1) + 4 * r["numel"])
    assert r["total"].collectives == 2 * 2


def test_float_buffers_averaged_integer_buffers_left_alone(bn_runs):
    res = bn_runs
    for name in ("local", "slowmo"):
        b0, b1 = (r[name]["buffers"] for r in res)
        assert res[0][name]["broadcast_buffers"] is False
        mean_key = next(k for k in b0 if k.endswith("running_mean"))
        assert torch.equal(b0[mean_key], b1[mean_key]), name
        assert torch.equal(b0[next(k for k in b0 if k.endswith("running_var"))],
                           b1[next(k for k in b1 if k.endswith("running_var"))])
        count = next(k for k in b0 if k.endswith("num_batches_tracked"))
        assert b0[count].dtype == torch.long and int(b0[count]) == 2 * TAU  # counted, not averaged
        assert torch.equal(res[0][name]["params"], res[1][name]["params"])
    # overlap: buffers travel in the anchor allreduce; replicas not identical, but the anchor is
    assert torch.equal(res[0]["overlap"]["anchor"], res[1]["overlap"]["anchor"])
