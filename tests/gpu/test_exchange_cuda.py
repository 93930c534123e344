"""``exchange()`` on NCCL for each exchange kind: the average over ranks, kept on the GPU.

World size 1 runs in this process on a 1-rank NCCL group (a ``FileStore`` in a temporary
directory); world size 2 runs on two processes (``run_distributed``), one GPU each, and is
skipped with fewer than two GPUs. Every rank builds every rank's input from the same seed, so
each can compute the exact mean itself.

Tolerances, per codec: ``NoCompression`` and ``TopK(ratio=1.0)`` are exact (each contribution
is divided by the world size, a power of two here, before the sum, which is exact); the count
sketch is exact at the coordinates it applies and zero elsewhere; QSGD is checked statistically
(a bounded error per exchange, and an error that shrinks when exchanges are averaged, which a
biased rounding would not do).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from launch import init_process_group, run_distributed

from lightning_compress.comm.collectives import exchange
from lightning_compress.comm.ledger import BitLedger
from lightning_compress.compressors import QSGD, CountSketch, NoCompression, TopK

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.cuda,
]

NUMEL = 4096
QSGD_DRAWS = 64


def _inputs(world_size: int, kind: str) -> list[torch.Tensor]:
    """Every rank's input (on CPU): Gaussian, plus a few heavy coordinates for the sketch."""
    g = torch.Generator().manual_seed(1234)
    xs = [torch.randn(NUMEL, generator=g) for _ in range(world_size)]
    if kind == "sketch":
        for x in xs:  # heavy hitters shared by every rank: what a count sketch recovers
            x[:: NUMEL // 16] += 50.0
    return xs


def _codecs() -> dict[str, object]:
    return {
        "allreduce": NoCompression(),
        "allgather": TopK(ratio=1.0),
        "two_phase": QSGD(bits=8),
        "sketch": CountSketch(rows=5, ratio=16 / NUMEL),
    }


def check_exchange(rank: int, world_size: int, kind: str) -> None:
    """Exchange this rank's input with the codec of ``kind`` and check the average (raises if wrong)."""
    codec = _codecs()[kind]
    assert codec.exchange == kind
    device = torch.device("cuda", torch.cuda.current_device())
    xs = _inputs(world_size, kind)
    truth = torch.zeros(NUMEL)
    for x in xs:
        truth.add_(x / world_size)  # divided, then summed: the exchange's own arithmetic
    truth = truth.to(device)
    mine = xs[rank].to(device)
    generator = torch.Generator(device=device).manual_seed(rank)
    result = exchange(codec, mine.clone(), None, BitLedger(), generator, want_local=kind != "sketch")
    average = result.average
    assert average.is_cuda and average.device == device, average.device
    assert average.dtype == torch.float32 and average.shape == (NUMEL,)
    if result.local is not None:
        assert result.local.device == device
    if kind in ("allreduce", "allgather"):
        assert torch.equal(average, truth), (average - truth).abs().max()
    elif kind == "sketch":
        applied = result.applied
        assert applied is not None and applied.device == device
        heavy = torch.arange(0, NUMEL, NUMEL // 16, device=device)
        assert torch.isin(heavy, applied).all(), "the heavy coordinates must be recovered"
        assert torch.equal(average[applied], truth[applied])
        rest = torch.ones(NUMEL, dtype=torch.bool, device=device)
        rest[applied] = False
        assert not average[rest].any()
    else:  # QSGD: stochastic rounding (2 ranks: one per rank's payload, gathered), unbiased
        scale = truth.norm()
        single = (average - truth).norm() / scale
        assert single < 0.05, single
        mean = average.clone()
        for _ in range(QSGD_DRAWS - 1):
            mean.add_(exchange(codec, mine.clone(), None, None, generator).average)
        mean.div_(QSGD_DRAWS)
        averaged = (mean - truth).norm() / scale
        # unbiased: independent draws average out, the error falls about as 1/sqrt(draws) (8x)
        assert averaged < single / 4, (single, averaged)


@pytest.fixture(scope="module")
def nccl_world_of_one(tmp_path_factory):
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    torch.cuda.set_device(0)
    store = dist.FileStore(os.path.join(tmp_path_factory.mktemp("nccl"), "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["allreduce", "allgather", "two_phase", "sketch"])
def test_exchange_on_one_gpu(nccl_world_of_one, kind):
    check_exchange(0, 1, kind)


def _on_nccl(rank: int, world_size: int, kinds: list[str]) -> None:
    init_process_group(rank, world_size, backend="nccl")
    for kind in kinds:
        check_exchange(rank, world_size, kind)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_exchange_on_two_gpus():
    run_distributed(_on_nccl, 2, ["allreduce", "allgather", "two_phase", "sketch"])
