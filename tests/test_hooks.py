"""The compressing comm hook on a plain DistributedDataParallel model (no Lightning)."""

import pytest
import torch
from launch import init_process_group, run_distributed
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_compress.compressors import QSGD, NoCompression, TopK
from lightning_compress.hooks import CompressionState, compressed_hook, register_compression_hook


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))


def _train(rank, world_size, codec, bucket_cap_mb, steps, min_size):
    init_process_group(rank, world_size)
    model = DistributedDataParallel(_model(), bucket_cap_mb=bucket_cap_mb)
    state = CompressionState(codec, min_compression_size=min_size)
    state.bind(model.module.named_parameters())
    seen = set()

    def counting_hook(st, bucket):
        seen.add(bucket.index())
        return compressed_hook(st, bucket)

    model.register_comm_hook(state, counting_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(rank)
    grads = []
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(16, 32, generator=g)
        model(x).pow(2).mean().backward()
        grads.append(torch.cat([p.grad.reshape(-1).clone() for p in model.parameters()]))
        opt.step()
    return {
        "params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
        "grads": grads,
        "steps": state.ledger.steps,
        "buckets": len(seen),
    }


@pytest.mark.parametrize(
    "codec", [NoCompression(), QSGD(bits=4), TopK(ratio=0.05)], ids=["none", "qsgd4", "topk"]
)
def test_many_small_buckets_on_gloo_no_mismatch_identical_ranks(codec):
    out = run_distributed(_train, 2, codec, 0.001, 5, 128)
    assert out[0]["buckets"] >= 3, "the test needs several buckets"
    assert out[0]["steps"] == 5
    for a, b in zip(out[0]["grads"], out[1]["grads"], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(out[0]["params"], out[1]["params"])


def _reference(rank, world_size):
    """Uncompressed hook vs DDP's own allreduce: the same averaged gradients."""
    init_process_group(rank, world_size)
    ours = DistributedDataParallel(_model(), bucket_cap_mb=0.001)
    register_compression_hook(ours, CompressionState(NoCompression()))
    stock = DistributedDataParallel(_model())
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(rank))
    ours(x).sum().backward()
    stock(x).sum().backward()
    pairs = zip(ours.parameters(), stock.parameters(), strict=True)
    return [(a.grad - b.grad).abs().max().item() for a, b in pairs]


def test_uncompressed_hook_equals_ddp_allreduce():
    out = run_distributed(_reference, 2)
    assert max(out[0]) < 1e-6


def _in_flight_per_bucket(rank, world_size, codec, nonfinite, nan_rank):
    """Per bucket, how many allreduces are in flight when the hook returns; and the results."""
    init_process_group(rank, world_size)
    ours = DistributedDataParallel(_model(), bucket_cap_mb=0.001)
    state = CompressionState(codec, min_compression_size=128, nonfinite=nonfinite)
    state.bind(ours.module.named_parameters())
    in_flight = []

    def watching_hook(st, bucket):
        fut = compressed_hook(st, bucket)
        in_flight.append((bucket.is_last(), len(st._inflight)))
        return fut

    ours.register_comm_hook(state, watching_hook)
    stock = DistributedDataParallel(_model(), bucket_cap_mb=0.001)
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(rank))
    ours(x).sum().backward()  # DDP's first iteration: one bucket; then it rebuilds them small
    stock(x).sum().backward()
    ours.zero_grad(), stock.zero_grad(), in_flight.clear()
    if rank == nan_rank:
        x[0, 0] = float("nan")
    ours(x).sum().backward()
    stock(x).sum().backward()
    pairs = zip(ours.parameters(), stock.parameters(), strict=True)
    grads = [(a.grad.clone(), b.grad.clone()) for a, b in pairs]
    return {"in_flight": in_flight, "grads": grads, "ledger": state.ledger.state_dict(),
            "skipped": state.last_step_skipped, "numel": sum(p.numel() for p in ours.parameters())}


def test_plain_float_allreduce_starts_each_bucket_as_it_arrives_like_ddp():
    out = run_distributed(_in_flight_per_bucket, 2, NoCompression(), "ignore", -1)
    in_flight = out[0]["in_flight"]
    assert len(in_flight) >= 3, "the test needs several buckets"
    # bucket i's allreduce is on the wire while backward goes on; all done at the last bucket
    assert [n for last, n in in_flight if not last] == list(range(1, len(in_flight)))
    assert in_flight[-1] == (True, 0)
    for ours, stock in out[0]["grads"]:
        assert torch.equal(ours, stock)  # DDP's own arithmetic: divide, then allreduce
    ledger = out[0]["ledger"]
    assert ledger["last"]["payload_bytes"] == 4 * out[0]["numel"]  # exactly what DDP sends
    assert ledger["last"]["collectives"] == len(in_flight) and ledger["steps"] == 2
    # a codec parks every bucket until the last one (one fused exchange)
    out = run_distributed(_in_flight_per_bucket, 2, QSGD(bits=8), "ignore", -1)
    assert all(n == 0 for _, n in out[0]["in_flight"])


def test_plain_float_allreduce_finds_nonfinite_in_the_averages_and_skips_on_every_rank():
    out = run_distributed(_in_flight_per_bucket, 2, NoCompression(), "skip", 1)
    assert [r["skipped"] for r in out] == [True, True]
    for r in out:
        assert all(not ours.any() for ours, _ in r["grads"])  # zero update on every rank
        assert r["ledger"]["last"]["payload_bytes"] == 4 * r["numel"]  # no flag: read from the averages
    out = run_distributed(_in_flight_per_bucket, 2, NoCompression(), "skip", -1)
    assert [r["skipped"] for r in out] == [False, False]
    for ours, stock in out[0]["grads"]:
        assert torch.equal(ours, stock)


def test_state_rejects_bad_arguments():
    with pytest.raises(ValueError, match="min_compression_size"):
        CompressionState("none", min_compression_size=-5)
    with pytest.raises(TypeError, match="error_feedback"):
        CompressionState("none", error_feedback="yes")
    with pytest.raises(ValueError, match="compressor"):
        CompressionState("gzip")
