"""Host-device syncs per training step of the compressing hook, counted on CPU with the proxy.

What is measured: one forward, backward (where DDP runs the comm hook and the package's whole
exchange) and optimizer step of a small DDP model on 2 gloo processes, after warm-up steps (DDP
rebuilds its buckets after the first iteration; the hook lays out its memories on the first
compressed step). ``tests/syncs.py``'s proxy counts the ops that would make the host wait on a
CUDA device, each with the Python line that issued it.

What is attributed to the package: events with a ``lightning_compress`` frame on their stack.
The same step on stock DDP (no hook) is measured too, and the totals must differ by exactly the
package's events: nothing else the hook changes adds syncs.

What is left out, and why: two CPU-only branches of ``compressors/topk.py``. Top-K's selection
(``topk_indices``) is exact on CPU by design (``int(keep.sum())``, ``nonzero``) and is
``torch.topk``, which does not sync, on CUDA; the range check of received indices
(``TopK.from_bytes``) raises ``ValueError`` on CPU and is a device-side assert on CUDA. Those
events are excluded *by location* (a frame in ``topk_indices``, ``_select_exact``,
``_select_with_nan`` or ``from_bytes``), not by subtracting what a bare ``TopK().compress(x)``
costs: that cost depends on the data (ties, the survivor count of the sampled threshold), so a
subtraction could hide or invent a sync, whereas the location names exactly what is excluded,
and the test prints it. A sync added anywhere else, including elsewhere in ``topk.py`` or in
the count sketch's use of the selection's result, is counted. The count sketch picks its
candidates with the same ``topk_indices``, so the same exclusion applies to it.

Target (issue 19): at most 1 host sync per step from the package, the read of the non-finite
flag (and the policy's norm, read in the same transfer).
"""

from __future__ import annotations

import threading

import pytest
import torch
from launch import init_process_group, run_distributed
from syncs import HostSync, count_host_syncs, hook_model, hook_states, train_step
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_compress.hooks import register_compression_hook

WARMUP = 3
PACKAGE = "lightning_compress"
# CPU-only branches: Top-K's exact selection, and the range check of received Top-K indices,
# which raises ValueError on CPU and is a device-side assert on CUDA (torch._assert_async, no
# sync; checked under set_sync_debug_mode("error") in tests/gpu/test_codecs_cuda.py)
CPU_ONLY_SELECTION = ("topk_indices", "_select_exact", "_select_with_nan", "from_bytes")


def _cpu_only_selection(event: HostSync) -> bool:
    return event.within("compressors/topk.py", CPU_ONLY_SELECTION)


def _from_package(event: HostSync) -> bool:
    return event.within(PACKAGE)


def _count(rank: int, world_size: int) -> dict[str, dict]:
    init_process_group(rank, world_size)
    out = {}
    for name, state in hook_states().items():
        model = DistributedDataParallel(hook_model(), bucket_cap_mb=0.01)
        if state is not None:
            register_compression_hook(model, state)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(rank)
        for _ in range(WARMUP):
            train_step(model, opt, torch.randn(16, 32, generator=g))
        with count_host_syncs("cpu") as syncs:
            train_step(model, opt, torch.randn(16, 32, generator=g))
        kept = syncs.excluding(_cpu_only_selection)
        out[name] = {
            "total": syncs.count,
            "excluded": [f"{e.op} at {e.where}" for e in syncs.events if _cpu_only_selection(e)],
            "package": [f"{e.op} at {e.where}" for e in kept.events if _from_package(e)],
            "kept": kept.count,
            "compressed": state is not None and state.last_compressed,
        }
    return out


@pytest.fixture(scope="module")
def counts() -> list[dict[str, dict]]:
    return run_distributed(_count, 2)


def _report(rank_counts: dict[str, dict], name: str) -> str:
    r = rank_counts[name]
    lines = [f"{name}: {len(r['package'])} from the package (of {r['total']} counted)"]
    lines += [f"  {e}" for e in r["package"]]
    lines += [f"  excluded (CPU-only Top-K branch): {e}" for e in r["excluded"]]
    return "\n".join(lines)


@pytest.mark.parametrize("name", ["qsgd4", "topk_ef", "topk_momentum", "sketch", "none"])
def test_at_most_one_host_sync_per_step_from_the_package(counts, name):
    for rank_counts in counts:
        print(_report(rank_counts, name))
        r = rank_counts[name]
        assert r["compressed"] or name == "none", "the measured step must run the codec"
        # nothing outside the package's own lines changes: the rest is stock DDP's
        assert r["kept"] - len(r["package"]) == rank_counts["stock_ddp"]["kept"], _report(rank_counts, name)
        assert len(r["package"]) <= 1, _report(rank_counts, name)


def test_stock_ddp_step_counts_no_sync_from_the_package(counts):
    for rank_counts in counts:
        assert rank_counts["stock_ddp"]["package"] == []


def _hook_thread(rank: int, world_size: int) -> dict:
    init_process_group(rank, world_size)
    model = DistributedDataParallel(nn.Linear(4, 4))
    threads = []

    def reading_hook(_state, bucket):
        threads.append(threading.get_ident())
        bucket.buffer().sum().item()  # one sync, made in whatever thread autograd runs the hook
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    model.register_comm_hook(None, reading_hook)
    counted = []
    for _ in range(2):  # DDP's first iteration, and one after its bucket rebuild
        with count_host_syncs("cpu") as syncs:
            model(torch.randn(2, 4)).sum().backward()
        counted.append([e.where.rpartition(" in ")[2] for e in syncs.events])
    return {"counted": counted, "hook_threads": threads, "main": threading.get_ident()}


def test_proxy_sees_syncs_made_in_a_ddp_comm_hook():
    (out,) = run_distributed(_hook_thread, 1)
    assert out["counted"] == [["reading_hook"], ["reading_hook"]]
    # on CPU autograd runs the hook in the thread that called backward(), where the mode is active
    assert set(out["hook_threads"]) == {out["main"]}


def test_proxy_counts_what_syncs_on_cuda_and_nothing_else():
    x = torch.randn(64)
    mask = x > 0

    def count(fn) -> list[str]:
        with count_host_syncs("cpu") as syncs:
            fn()
        return [e.op for e in syncs.events]

    assert count(lambda: x.sum().item()) == ["aten._local_scalar_dense.default"]
    assert count(lambda: bool(x.sum() > 0)) == ["aten._local_scalar_dense.default"]
    assert count(lambda: x[mask]) == ["aten.index.Tensor"]
    assert count(lambda: x.clone().index_put_((mask,), torch.tensor(0.0))) == ["aten.index_put_.default"]
    assert count(lambda: torch.nonzero(mask)) == ["aten.nonzero.default"]
    assert count(lambda: torch.unique(x)) and count(lambda: x.tolist()) == ["Tensor.tolist"]
    assert len(count(lambda: torch.repeat_interleave(x, torch.ones(64, dtype=torch.long)))) == 1
    assert count(lambda: torch.repeat_interleave(x, torch.ones(64, dtype=torch.long), output_size=64)) == []
    # arithmetic, reductions kept on the device, integer indexing, masked_fill_: nothing
    assert count(lambda: (x * 2 + 1).abs().sum().sqrt()) == []
    assert count(lambda: x[torch.tensor([1, 2])]) == []
    assert count(lambda: x.clone().masked_fill_(mask, 0.0)) == []
    assert torch.Tensor.tolist is torch._C.TensorBase.tolist  # restored
