"""The pipelined exchange of fixed-size payloads on real gloo groups: several chunks in flight,
both collectives, identical results on every rank, exact bytes, the statistics of the average."""

import pytest
import torch
import torch.distributed as dist
from launch import init_process_group, run_distributed

from lightning_compress.comm import BitLedger, two_phase_allreduce
from lightning_compress.comm.engine import choose_collective, chunk_bounds
from lightning_compress.comm.ledger import all_gather_wire_bytes, all_to_all_wire_bytes
from lightning_compress.compressors import QSGD

N = 10_000  # with 512-element buckets and CHUNK below: 4 full chunks and a ragged one
CHUNK = 2048


@pytest.mark.parametrize(
    ("world", "expected"), [(1, "allgather"), (2, "allgather"), (3, "two_phase"), (8, "two_phase")]
)
def test_collective_chosen_by_bytes_per_rank(world, expected):
    assert choose_collective(world) == expected


@pytest.mark.parametrize(
    ("numel", "unit", "chunk"), [(10_000, 512, 2048), (10_000, 1536, 2048), (100, 512, 2048), (0, 8, 64)]
)
def test_chunks_cover_the_vector_in_aligned_pieces(numel, unit, chunk):
    bounds = chunk_bounds(numel, unit, chunk)
    assert [a for a, _ in bounds] == ([0] + [b for _, b in bounds[:-1]] if numel else [])  # contiguous
    assert (bounds[-1][1] if bounds else 0) == numel
    for a, b in bounds[:-1]:
        assert (b - a) % unit == 0 and b - a == max(unit, chunk // unit * unit)


def _exchange(rank, world, collective, reps, bits):
    init_process_group(rank, world)
    torch.manual_seed(100 + rank)
    x = torch.randn(N) * (1.0 + rank)
    codec = QSGD(bits=bits)
    gen = torch.Generator().manual_seed(rank)
    ledger = BitLedger()
    first = two_phase_allreduce(
        codec, x, None, ledger, gen, want_local=True, collective=collective, chunk_numel=CHUNK
    )
    ledger.end_step()
    total = first.average.clone()
    for _ in range(reps - 1):
        total += two_phase_allreduce(
            codec, x, None, None, gen, collective=collective, chunk_numel=CHUNK
        ).average
    xs = [torch.empty(N) for _ in range(world)]
    dist.all_gather(xs, x)
    locals_ = [torch.empty(N) for _ in range(world)]
    dist.all_gather(locals_, first.local)
    return {
        "avg": first.average,
        "mean_of_reps": total / reps,
        "mean": torch.stack(xs).mean(0),
        "locals": locals_,
        "x": x,
        "last": ledger.last,
    }


@pytest.fixture(scope="module")
def runs():
    return {
        (world, collective): run_distributed(_exchange, world, collective, 64, 4)
        for world, collective in [(2, "allgather"), (2, "two_phase"), (3, "allgather"), (3, "two_phase")]
    }


@pytest.mark.parametrize("key", [(2, "allgather"), (2, "two_phase"), (3, "allgather"), (3, "two_phase")])
def test_every_rank_gets_the_same_average(runs, key):
    out = runs[key]
    for r in out:
        assert torch.equal(r["avg"], out[0]["avg"])


@pytest.mark.parametrize("key", [(2, "allgather"), (2, "two_phase"), (3, "allgather"), (3, "two_phase")])
def test_average_is_unbiased(runs, key):
    out = runs[key]
    mean = out[0]["mean"]
    one = (out[0]["avg"] - mean).norm()
    # 64 independent exchanges: an unbiased estimate's error shrinks as 1/sqrt(64) = 1/8
    assert (out[0]["mean_of_reps"] - mean).norm() < one / 4


@pytest.mark.parametrize("world", [2, 3])
def test_gathered_average_is_the_mean_of_own_decodings(runs, world):
    out = runs[(world, "allgather")]
    for r in out:
        torch.testing.assert_close(r["avg"], torch.stack(r["locals"]).mean(0))
        # the rank's own decoding is an unbiased 4-bit quantization of its input
        assert (r["locals"][0] - out[0]["x"]).norm() / out[0]["x"].norm() < 0.2


@pytest.mark.parametrize("world", [2, 3])
def test_gathering_skips_the_second_rounding(runs, world):
    # the two-phase exchange quantizes the average a second time: more error than one rounding
    gathered = (runs[(world, "allgather")][0]["avg"] - runs[(world, "allgather")][0]["mean"]).norm()
    two_phase = (runs[(world, "two_phase")][0]["avg"] - runs[(world, "two_phase")][0]["mean"]).norm()
    assert gathered < 0.8 * two_phase


@pytest.mark.parametrize("world", [2, 3])
def test_chunked_bytes_are_the_unchunked_payload(runs, world):
    codec = QSGD(bits=4)
    chunks = len(chunk_bounds(N, codec.alignment(), CHUNK))
    rec = runs[(world, "allgather")][0]["last"]
    # aligned chunks: their payloads add up to exactly one payload of the whole vector
    assert rec.payload_bytes == codec.payload_nbytes(N)
    assert rec.encoded_bits == 8 * codec.payload_nbytes(N) and rec.coords == N
    assert rec.collectives == chunks
    assert rec.wire_bytes == all_gather_wire_bytes(codec.payload_nbytes(N), world)


@pytest.mark.parametrize("world", [2, 3])
def test_two_phase_bytes_per_chunk(runs, world):
    codec = QSGD(bits=4)
    bounds = chunk_bounds(N, codec.alignment() * world, CHUNK)
    payload = wire = 0.0
    for a, b in bounds:
        shard = codec.payload_nbytes(-(-(b - a) // world))
        payload += world * shard + shard
        wire += all_to_all_wire_bytes(world * shard, world) + all_gather_wire_bytes(shard, world)
    rec = runs[(world, "two_phase")][0]["last"]
    assert rec.payload_bytes == payload
    assert rec.wire_bytes == pytest.approx(wire)
    assert rec.collectives == 2 * len(bounds)


def test_unknown_collective_is_refused():
    # checked before any process group is needed
    with pytest.raises(ValueError, match="collective must be one of"):
        two_phase_allreduce(QSGD(), torch.zeros(8), None, None, collective="ring")


def _ddp_steps(rank, world):
    from torch.nn.parallel import DistributedDataParallel

    from lightning_compress.hooks import CompressionState, register_compression_hook

    init_process_group(rank, world)
    torch.manual_seed(0)
    model = torch.nn.Linear(1024, 1100)  # 1.13 M weights: three chunks of the fused gradient
    ddp = DistributedDataParallel(model)
    state = CompressionState(QSGD(bits=4), min_compression_size=2048)  # the bias travels dense
    register_compression_hook(ddp, state)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    torch.manual_seed(rank)
    for _ in range(3):
        opt.zero_grad()
        ddp(torch.randn(8, 1024)).square().mean().backward()
        opt.step()
    return {
        "params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
        "last": state.ledger.last,
    }


def test_the_hook_exchanges_a_large_gradient_in_chunks():
    out = run_distributed(_ddp_steps, 2)
    assert torch.equal(out[0]["params"], out[1]["params"])
    codec = QSGD(bits=4)
    rec = out[0]["last"]
    # the weight's chunks (one collective each) and the bias with the flag in one dense allreduce
    assert rec.collectives == len(chunk_bounds(1024 * 1100, codec.alignment())) + 1 == 4
    assert rec.payload_bytes == codec.payload_nbytes(1024 * 1100) + 4 * 1100 + 4


def _pieces(rank, world):
    from lightning_compress.comm.engine import all_gather_in_pieces

    init_process_group(rank, world)
    send = torch.randint(0, 256, (1000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(rank))
    ledger = BitLedger()
    rows = all_gather_in_pieces(send, None, ledger, piece_bytes=300)  # 4 pieces, the last short
    ledger.end_step()
    whole = torch.empty(world * 1000, dtype=torch.uint8)
    dist.all_gather_into_tensor(whole, send)
    return {"rows": rows, "whole": whole, "last": ledger.last}


def test_gathering_in_pieces_gives_one_all_gathers_bytes():
    out = run_distributed(_pieces, 3)
    for r in out:
        assert torch.equal(r["rows"], r["whole"].view(3, 1000))  # rank order, nothing moved
        assert (r["last"].payload_bytes, r["last"].collectives) == (1000, 4)
        assert r["last"].wire_bytes == all_gather_wire_bytes(1000, 3)
