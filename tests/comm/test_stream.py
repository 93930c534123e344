"""The DDP hook streams a quantizer's chunks onto the wire while backward runs (real gloo groups,
real DDP with several buckets): bit-identical to the fused exchange, identical ranks, chunks
really issued before the last bucket, and the non-finite protocol kept."""

import pytest
import torch
import torch.distributed as dist
from launch import init_process_group, run_distributed
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_compress.comm import engine
from lightning_compress.compressors import QSGD
from lightning_compress.exchange import COMPRESSED
from lightning_compress.hooks import CompressionState, register_compression_hook

STEPS = 4
NAN_STEP = 2


def _model() -> nn.Module:
    torch.manual_seed(0)  # the same weights on every rank and in every run
    return nn.Sequential(
        nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
        nn.Linear(256, 10),
    )


def _steps(rank, world, overlap, error_feedback, nan):
    init_process_group(rank, world)
    engine.CHUNK_NUMEL = 8192  # a 150 k-element gradient in 19 chunks
    # 50 kB buckets: every large layer in its own bucket, handed over while backward goes on
    ddp = DistributedDataParallel(_model(), bucket_cap_mb=0.05)
    state = CompressionState(QSGD(bits=4), error_feedback=error_feedback, seed=3)
    state.overlap_backward = overlap
    register_compression_hook(ddp, state)
    torch.manual_seed(10 + rank)
    grads, early, memory_before_nan, memory_after_nan = [], [], None, None
    for step in range(STEPS):
        x = torch.randn(16, 32)
        if nan and step == NAN_STEP and rank == 1:
            x[0, 0] = float("nan")
        if step == NAN_STEP:
            memory_before_nan = state.memory.residuals.get(COMPRESSED, torch.zeros(0)).clone()
        ddp.zero_grad()
        ddp(x).square().mean().backward()
        if step == NAN_STEP:
            memory_after_nan = state.memory.residuals.get(COMPRESSED, torch.zeros(0)).clone()
        grads.append(torch.cat([p.grad.reshape(-1) for p in ddp.parameters()]).clone())
        early.append(state.early_chunks)
    gathered = [torch.empty_like(grads[-1]) for _ in range(world)]
    dist.all_gather(gathered, grads[-1])
    return {
        "grads": grads,
        "early": early,
        "ranks_last": gathered,
        "skipped": state.skipped_steps,
        "memory": (memory_before_nan, memory_after_nan),
    }


@pytest.fixture(scope="module")
def runs():
    cases = [(2, False), (2, True), (3, False)]
    return {
        (world, overlap, ef): run_distributed(_steps, world, overlap, ef, False)
        for world, ef in cases
        for overlap in (True, False)
    }


@pytest.mark.parametrize(("world", "ef"), [(2, False), (2, True), (3, False)])
def test_streamed_exchange_is_bit_identical_to_the_fused_one(runs, world, ef):
    streamed, fused = runs[(world, True, ef)], runs[(world, False, ef)]
    for rank in range(world):
        for step in range(STEPS):
            assert torch.equal(streamed[rank]["grads"][step], fused[rank]["grads"][step]), (rank, step)


@pytest.mark.parametrize(("world", "ef"), [(2, False), (2, True), (3, False)])
def test_streamed_ranks_are_identical(runs, world, ef):
    gathered = runs[(world, True, ef)][0]["ranks_last"]
    for g in gathered[1:]:
        assert torch.equal(g, gathered[0])


@pytest.mark.parametrize("world", [2, 3])
def test_chunks_go_on_the_wire_before_the_last_bucket(runs, world):
    streamed, fused = runs[(world, True, False)][0]["early"], runs[(world, False, False)][0]["early"]
    # the first exchange learns the layout (fused); from the second on, the chunks of the last
    # layers are issued while backward computes the first layers' gradients
    assert streamed[0] == 0
    assert all(n >= 2 for n in streamed[1:]), streamed
    assert fused == [0] * STEPS


def test_a_single_bucket_streams_nothing_early():
    out = run_distributed(_single_bucket, 2)
    assert out[0]["early"] == [0] * STEPS


def _single_bucket(rank, world):
    init_process_group(rank, world)
    engine.CHUNK_NUMEL = 8192
    ddp = DistributedDataParallel(_model(), bucket_cap_mb=256)
    state = CompressionState(QSGD(bits=4))
    register_compression_hook(ddp, state)
    early = []
    for _ in range(STEPS):
        ddp.zero_grad()
        ddp(torch.randn(16, 32)).square().mean().backward()
        early.append(state.early_chunks)
    return {"early": early}


def test_nonfinite_step_is_skipped_on_every_rank_and_memory_kept():
    out = run_distributed(_steps, 2, True, True, True)
    for r in out:
        assert r["skipped"] == 1
        assert r["early"][NAN_STEP] >= 2  # the NaN step did stream: the flag came at the end
        assert torch.count_nonzero(r["grads"][NAN_STEP]) == 0  # every rank's update dropped
        before, after = r["memory"]
        assert before.numel() > 0 and torch.equal(before, after)  # error-feedback memory untouched
        assert torch.isfinite(r["grads"][-1]).all()  # and the next steps are clean
    assert torch.equal(out[0]["grads"][-1], out[1]["grads"][-1])
