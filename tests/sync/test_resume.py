"""Resume from a checkpoint taken in the middle of a period equals the uninterrupted run."""

from __future__ import annotations

import pytest
import torch
from fitting import resume
from launch import run_distributed
from lightning_ns import CompressedDDP

from lightning_compress.compressors import QSGD, NoCompression
from lightning_compress.sync import LocalSGD, OverlapLocalSGD, SlowMo

# 1088 samples over 2 ranks, batch 32: 17 optimizer steps per epoch, a multiple of no period used
# here, so the epoch-boundary checkpoint falls in the middle of a period
N = 1088
STEPS_PER_EPOCH = 17


def slowmo():
    return CompressedDDP(compressor=NoCompression(), sync=SlowMo(period=4, momentum=0.6))


def overlap():
    return CompressedDDP(compressor=NoCompression(), sync=OverlapLocalSGD())  # paper defaults: τ=2


def local_qsgd_ef():
    return CompressedDDP(compressor=QSGD(bits=4), error_feedback=True, min_compression_size=256,
                         sync=LocalSGD(period=4))


def overlap_qsgd():
    # the anchor average compressed, its chunks in flight across the checkpoint's sync point
    return CompressedDDP(compressor=QSGD(bits=4), min_compression_size=256, sync=OverlapLocalSGD())


FACTORIES = {
    "slowmo": slowmo, "overlap": overlap, "local_qsgd_ef": local_qsgd_ef, "overlap_qsgd": overlap_qsgd,
}


def _all(rank, world_size, ckpt_dir):
    import os

    out = {}
    for name, factory in FACTORIES.items():
        d = os.path.join(ckpt_dir, name)
        os.makedirs(d, exist_ok=True)
        out[name] = resume(rank, world_size, d, factory, N, 0.9)  # base momentum: per-rank buffers
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_distributed(_all, 2, str(tmp_path_factory.mktemp("ckpt")))


@pytest.mark.parametrize("name", list(FACTORIES))
def test_resume_mid_period_equals_uninterrupted(runs, name):
    for r in runs:
        res = r[name]
        assert res["steps_first"] == STEPS_PER_EPOCH
        assert torch.equal(res["full"], res["resumed"]), (name, (res["full"] - res["resumed"]).abs().max())
    # the checkpoint was taken while the replicas differed: rank 0's weights alone would not do
    assert not torch.equal(runs[0][name]["first"], runs[1][name]["first"])
    state = runs[0][name]["sync_state"]
    assert "local" in state and "optimizer_states" in state


def test_checkpoint_holds_each_schedules_state(runs):
    s = runs[0]["slowmo"]["sync_state"]
    assert s["u"].abs().sum() > 0 and s["x0"].shape == s["u"].shape
    o0, o1 = runs[0]["overlap"]["sync_state"], runs[1]["overlap"]["sync_state"]
    assert torch.equal(o0["z"], o1["z"])  # the completed anchor, identical on every rank
    assert not torch.equal(o0["v"], o1["v"])  # the anchor momentum is per rank
    q = runs[0]["local_qsgd_ef"]["sync_state"]
    assert q["residual"].abs().sum() > 0 and "generator" in q
