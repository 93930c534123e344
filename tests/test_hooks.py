"""The compressing comm hook on a plain DistributedDataParallel model (no Lightning)."""

import pickle

import pytest
import torch
import torch.distributed as dist
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


def test_state_pickles_without_process_group():
    state = CompressionState(TopK(k=4), process_group=dist.group.WORLD if dist.is_initialized() else None)
    clone = pickle.loads(pickle.dumps(state))
    assert clone.process_group is None and isinstance(clone.compressor, TopK)


def test_state_rejects_bad_arguments():
    with pytest.raises(ValueError, match="min_compression_size"):
        CompressionState("none", min_compression_size=-5)
    with pytest.raises(TypeError, match="error_feedback"):
        CompressionState("none", error_feedback="yes")
    with pytest.raises(ValueError, match="compressor"):
        CompressionState("gzip")
