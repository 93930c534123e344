"""Collectives that move compressed payloads and return the average over ranks.

Every function here takes one flat float32 tensor (this rank's contribution), issues its
collectives from the calling thread in a fixed order (so gloo sees the same sequence on every
rank), records each one in the :class:`~lightning_compress.comm.ledger.BitLedger`, and returns
the average over ranks. The result is bit-identical on every rank: each rank decodes the same
received bytes in the same order.

Every average divides each rank's contribution by the world size *before* summing, as stock DDP
does (``GradBucket`` buffers are divided before their allreduce): a sum of finite values can
overflow float32 (``3e38 + 3e38``), a sum of values already divided by ``W`` cannot.

What crosses the network is always the packed payload (``Payload.to_bytes()``: uint8 codes,
indices, scales, sketch tables), never a decoded float tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_compress._compat import default_store
from lightning_compress.comm.engine import PipelinedExchange, all_gather_in_pieces
from lightning_compress.comm.ledger import (
    BitLedger,
    allreduce_wire_bytes,
)
from lightning_compress.compressors.base import Compressor

ProcessGroup = dist.ProcessGroup


@dataclass
class ExchangeResult:
    """The average over ranks, plus what this rank needs for its own memory.

    Attributes:
        average: the decoded average, identical on every rank.
        local: this rank's own decoded contribution (``Δ`` of error feedback), when asked for.
        applied: for sketches, the coordinates that were applied (their memory is reset).

    """

    average: Tensor
    local: Tensor | None = None
    applied: Tensor | None = None


def _world(group: ProcessGroup | None) -> int:
    return dist.get_world_size(group)


@torch.no_grad()
def write_flat_(tensors: Sequence[Tensor], flat: Tensor, saturate: bool = False) -> None:
    """Copy consecutive slices of ``flat`` into ``tensors`` (cast to each tensor's dtype).

    With ``saturate``, each slice is first clamped (in place, in ``flat``) to the finite range of
    its tensor's dtype, so a value that rounding or an estimate pushed past it (a float16
    gradient and a float32 average above 65504) is written as the largest finite value, not Inf.
    For an average of finite values, whose exact value lies within that range, this is the
    nearest representable value. NaN is kept.
    """
    offset = 0
    for t in tensors:
        n = t.numel()
        src = flat[offset : offset + n]
        if saturate and t.is_floating_point():
            limit = min(torch.finfo(t.dtype).max, torch.finfo(flat.dtype).max)
            src.clamp_(-limit, limit)
        t.copy_(src.view_as(t))
        offset += n
    if offset != flat.numel():
        raise ValueError(f"flat vector holds {flat.numel()} elements, the tensors {offset}")


def nonfinite_flag(tensors: Sequence[Tensor], device: torch.device | None = None) -> Tensor:
    """1.0 if any of ``tensors`` holds a NaN or Inf, else 0.0: a 1-element float32 tensor.

    ``aminmax`` per tensor: exact (no overflow, unlike a norm), NaN and ±Inf show in its result,
    one read of the data, about 20x cheaper than ``isfinite(x).all()``, which writes a mask as
    large as the input; nothing is read to the host. On ``device`` (default: the tensors').
    """
    extremes = [torch.stack(torch.aminmax(t.detach())).to(torch.float32) for t in tensors if t.numel()]
    if device is None and tensors:
        device = tensors[0].device
    if not extremes:
        return torch.zeros(1, device=device)
    return (~torch.isfinite(torch.cat(extremes)).all()).to(device=device, dtype=torch.float32).reshape(1)


def background_group(group: ProcessGroup | None) -> ProcessGroup | None:
    """A process group of its own for collectives that stay in flight across training steps.

    A process group runs its collectives in the order they were issued (gloo: a queue served by a
    few threads; NCCL: one stream). Lightning broadcasts a flag on the default group at every
    training step; behind a model average still in flight on the same group, that broadcast waits
    until the average has crossed the wire, and the step with it: the average no longer overlaps
    the compute. A group of its own (same ranks, backend and timeout; its own connections) keeps
    the two apart. ``None`` (the default group) gets a new group over every rank; every rank must
    call this at the same point. A given subgroup is returned as it is (creating one would need
    every rank of the world, members or not, to call it).
    """
    if group is not None or not dist.is_initialized() or dist.get_world_size() == 1:
        return group
    timeout = default_store().timeout  # the default group's (CompressedDDP(timeout=...))
    return dist.new_group(backend=dist.get_backend(), timeout=timeout)


def allreduce_mean(x: Tensor, group: ProcessGroup | None, ledger: BitLedger | None) -> Tensor:
    """Dense float allreduce (in place) of ``x / world_size``: the uncompressed baseline.

    Divided before the sum, as DDP's default hook does, so finite inputs give a finite mean.
    """
    start_allreduce_mean(x, group, ledger).wait()
    return x


def start_allreduce_mean(x: Tensor, group: ProcessGroup | None, ledger: BitLedger | None) -> dist.Work:
    """Start :func:`allreduce_mean` of ``x`` (in place) and return its work: wait before reading ``x``."""
    world = _world(group)
    x.div_(world)
    work = dist.all_reduce(x, group=group, async_op=True)
    if ledger is not None:
        nbytes = x.numel() * x.element_size()
        ledger.record(nbytes, allreduce_wire_bytes(nbytes, world))
    return work


def two_phase_allreduce(
    compressor: Compressor,
    x: Tensor,
    group: ProcessGroup | None,
    ledger: BitLedger | None,
    generator: torch.Generator | None = None,
    want_local: bool = False,
    collective: str | None = "two_phase",
    chunk_numel: int | None = None,
) -> ExchangeResult:
    """Compressed allreduce for fixed-size payloads (quantizers), in pipelined chunks.

    With ``collective="two_phase"`` (the default here), per chunk:

    1. Cut the chunk into ``W`` equal shards (zero-padded) and compress each one.
    2. All-to-all: rank ``r`` receives every rank's payload of shard ``r``.
    3. Rank ``r`` decodes and averages its shard, then re-compresses the average (stochastic
       rounding keeps it unbiased).
    4. All-gather of the re-compressed shards; every rank decodes all of them.

    Each rank sends about ``2·(W−1)/W·d·B/8`` bytes whatever ``W`` is, like a ring allreduce of
    ``B``-bit values, whereas gathering every rank's full payload grows as ``(W−1)·d·B/8``.
    ``collective="allgather"`` gathers every rank's payload instead (one collective, no
    re-encoding), and ``None`` chooses by cost: see :mod:`lightning_compress.comm.engine`, which
    also describes the pipeline.
    """
    engine = PipelinedExchange(compressor, group, ledger, generator, collective, chunk_numel)
    average, local = engine(x, want_local)
    return ExchangeResult(average, local)


def sparse_allgather(
    compressor: Compressor,
    x: Tensor,
    group: ProcessGroup | None,
    ledger: BitLedger | None,
    generator: torch.Generator | None = None,
    want_local: bool = False,
) -> ExchangeResult:
    """All-gather of every rank's sparse payload (values + indices), summed densely.

    Sparse payloads of different ranks hit different coordinates, so they cannot be reduced on
    the way: each rank receives all ``W`` payloads and its traffic grows as ``(W−1)·k`` values
    and indices. That is cheaper than a dense allreduce while ``W·k·(value + index bytes) <
    2·d·4``, i.e. for Top-K at 1 % up to a few hundred ranks.
    """
    world = _world(group)
    n = x.numel()
    payload = compressor.compress(x, generator)
    send = payload.to_bytes()
    if ledger is not None:
        ledger.record_coords(n, payload.nbytes, world)
    # gathered in pieces in flight at once (identical bytes; the link stays busier)
    gathered = all_gather_in_pieces(send, group, ledger)

    total = torch.zeros(n, dtype=torch.float32, device=x.device)
    scatter_add = getattr(compressor, "scatter_add_into", None)
    # one payload at a time, in rank order: every rank adds in the same order (bit-identical
    # results), and indices are unique inside one payload (no atomic races on CUDA); each
    # payload is divided by W as it is added, so finite values cannot overflow the sum
    for r in range(world):
        received = compressor.from_bytes(gathered[r], (n,), torch.float32)
        if scatter_add is not None:
            scatter_add(total, received, alpha=1.0 / world)
        else:
            total.add_(compressor.decompress(received).reshape(-1).to(torch.float32), alpha=1.0 / world)
    local = compressor.decompress(payload).reshape(-1).to(torch.float32) if want_local else None
    return ExchangeResult(total, local)


def sketch_allreduce(
    compressor: Compressor,
    v: Tensor,
    group: ProcessGroup | None,
    ledger: BitLedger | None,
) -> ExchangeResult:
    """Sketched SGD's exchange (Ivkin et al., arXiv 1903.04488, Alg. 1, lines 6-10).

    1. Sketch this rank's accumulated vector ``v``; sketches are linear, so one allreduce of the
       ``rows × cols`` tables yields the sketch of the sum.
    2. Recover the ``P·k`` candidate heavy coordinates from the summed sketch.
    3. Second round: allreduce the exact values of ``v`` at the candidates.
    4. Keep the ``k`` largest of those exact sums: the update, averaged over ranks.

    ``applied`` holds the ``k`` coordinates, whose momentum and error the caller resets.
    """
    world = _world(group)
    n = v.numel()
    sketch = compressor.sketch
    table = sketch(v).contiguous()
    k = compressor.k_for(n)  # type: ignore[attr-defined]
    # 1. allreduce the sketch tables, each divided by W first (the sketch of the mean; the
    #    division does not change which coordinates are heaviest)
    table.div_(world)
    dist.all_reduce(table, group=group)
    if ledger is not None:
        nbytes = table.numel() * table.element_size()
        ledger.record(nbytes, allreduce_wire_bytes(nbytes, world))
    # 2. candidates from the summed sketch (identical on every rank)
    candidates = compressor.candidates(table, n)  # type: ignore[attr-defined]
    # 3. exact values at the candidates
    exact = v[candidates].to(torch.float32).div_(world).contiguous()  # the mean, never an overflowing sum
    dist.all_reduce(exact, group=group)
    if ledger is not None:
        nbytes = exact.numel() * exact.element_size()
        ledger.record(nbytes, allreduce_wire_bytes(nbytes, world))
        ledger.record_coords(n, compressor.payload_nbytes(n) + nbytes, world)
    # 4. top-k of the exact sums
    top = torch.topk(exact.abs(), min(k, exact.numel()), sorted=False).indices
    applied = candidates[top]
    average = torch.zeros(n, dtype=torch.float32, device=v.device)
    average[applied] = exact[top]
    return ExchangeResult(average, None, applied)


def exchange(
    compressor: Compressor,
    x: Tensor,
    group: ProcessGroup | None,
    ledger: BitLedger | None,
    generator: torch.Generator | None = None,
    want_local: bool = False,
) -> ExchangeResult:
    """Average ``x`` over ranks with the collective that fits ``compressor.exchange``."""
    kind = compressor.exchange
    if kind == "allreduce":
        y = x.to(torch.float32, copy=True)
        if ledger is not None:
            ledger.record_coords(x.numel(), compressor.payload_nbytes(x.numel()), _world(group))
        return ExchangeResult(allreduce_mean(y, group, ledger), x.to(torch.float32) if want_local else None)
    if kind == "two_phase":
        # the collective chosen by cost: an all-gather for 2 ranks, the two phases from 3 on
        return two_phase_allreduce(compressor, x, group, ledger, generator, want_local, collective=None)
    if kind == "allgather":
        return sparse_allgather(compressor, x, group, ledger, generator, want_local)
    if kind == "sketch":
        return sketch_allreduce(compressor, x, group, ledger)
    raise ValueError(
        f"{type(compressor).__name__}.exchange={kind!r} is not one of allreduce, two_phase, allgather, sketch"
    )
