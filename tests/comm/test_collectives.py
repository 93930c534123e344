"""The payload collectives on real gloo groups: averages, identical results, exact byte counts."""

import pytest
import torch
import torch.distributed as dist
from launch import init_process_group, run_distributed

from lightning_compress.comm import BitLedger, exchange
from lightning_compress.comm.ledger import all_gather_wire_bytes, allreduce_wire_bytes
from lightning_compress.compressors import QSGD, CountSketch, NoCompression, TopK


def _run(rank, world_size, codec, n):
    init_process_group(rank, world_size)
    torch.manual_seed(rank)
    x = torch.randn(n)
    if isinstance(codec, CountSketch):
        x[:5] += 50.0 * (rank + 1)  # shared heavy hitters
    ledger = BitLedger()
    res = exchange(
        codec, x, None, ledger, torch.Generator().manual_seed(rank), want_local=codec.exchange != "sketch"
    )
    ledger.end_step()
    xs = [torch.empty(n) for _ in range(world_size)]
    dist.all_gather(xs, x)
    locals_ = None
    if res.local is not None:
        locals_ = [torch.empty(n) for _ in range(world_size)]
        dist.all_gather(locals_, res.local.contiguous())
    return {"avg": res.average, "xs": xs, "locals": locals_, "last": ledger.last, "applied": res.applied}


@pytest.mark.parametrize("world_size", [2, 3])
def test_dense_allreduce_is_the_exact_mean(world_size):
    out = run_distributed(_run, world_size, NoCompression(), 1000)
    mean = torch.stack(out[0]["xs"]).mean(0)
    for r in out:
        torch.testing.assert_close(r["avg"], mean)
        assert r["last"].payload_bytes == 4000
        assert r["last"].wire_bytes == pytest.approx(allreduce_wire_bytes(4000, world_size))


def test_sparse_allgather_sums_every_rank_payload():
    codec = TopK(k=20)
    out = run_distributed(_run, 3, codec, 1000)
    expected = torch.stack(out[0]["locals"]).mean(0)  # the mean of the ranks' decoded payloads
    for r in out:
        assert torch.equal(r["avg"], out[0]["avg"])
        torch.testing.assert_close(r["avg"], expected)
        nbytes = codec.payload_nbytes(1000)
        assert r["last"].payload_bytes == nbytes
        assert r["last"].wire_bytes == all_gather_wire_bytes(nbytes, 3)


def test_quantized_exchange_of_two_ranks_is_one_all_gather():
    codec = QSGD(bits=8)
    out = run_distributed(_run, 2, codec, 4096)
    mean = torch.stack(out[0]["xs"]).mean(0)
    assert torch.equal(out[0]["avg"], out[1]["avg"])
    # one 8-bit quantization per rank, no re-quantization: small relative error
    assert (out[0]["avg"] - mean).norm() / mean.norm() < 0.02
    # the average is exactly the mean of the ranks' own decoded payloads (what error feedback keeps)
    torch.testing.assert_close(out[0]["avg"], torch.stack(out[0]["locals"]).mean(0))
    nbytes = codec.payload_nbytes(4096)
    rec = out[0]["last"]
    assert (rec.payload_bytes, rec.collectives) == (nbytes, 1)
    assert rec.wire_bytes == all_gather_wire_bytes(nbytes, 2)


def test_sketch_recovers_shared_heavy_hitters_with_exact_values():
    codec = CountSketch(rows=5, k=5)
    out = run_distributed(_run, 2, codec, 20_000)
    mean = torch.stack(out[0]["xs"]).mean(0)
    for r in out:
        assert sorted(r["applied"].tolist()) == [0, 1, 2, 3, 4]
        # second round: the values applied are the exact averages, not sketch estimates
        torch.testing.assert_close(r["avg"][:5], mean[:5])
        assert torch.count_nonzero(r["avg"]) == 5
