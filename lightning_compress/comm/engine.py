"""The communication engine for fixed-size payloads: chunked, pipelined, collective chosen by cost.

A quantizer's payload (:class:`~lightning_compress.compressors.QSGD`: codes and scales) has a size
that depends only on the number of elements, so a flat vector can be cut into chunks that are
exchanged one after the other, each with its own collectives, and decoded to the same average.
Three things make the exchange keep the link busy:

1. **Chunks in a pipeline.** The vector is cut into chunks of about :data:`CHUNK_NUMEL` elements
   (aligned to the codec's buckets and bit packing, so the chunks' payloads add up to exactly the
   unchunked one's bytes). Every collective is issued with ``async_op=True``: all chunks are
   encoded and issued first (chunk ``i+1`` is encoded while chunk ``i`` is on the wire), then each
   is awaited and decoded in turn while the later ones are still on the wire. Measured on a
   100 Mbit/s emulated link with two workers (``benchmarks/wire.py``, ``docs/benchmarks.md``):
   one 2.2 MB all-gather at a time delivered 64-78% of the rate, the same bytes as 8 all-gathers
   in flight 92%. Chunks are issued from the end of the vector to its start, the order in which
   backward makes a model-ordered gradient ready, so a DDP hook can issue a chunk as soon as its
   buckets arrive, while backward goes on (:meth:`PipelinedExchange.start`,
   :meth:`PipelinedExchange.issue`); the fused call issues the same chunks in the same order, so
   both give bit-identical results.
2. **The collective chosen by cost** (:func:`choose_collective`). Per rank and per payload byte,
   an all-gather of every rank's payload transmits ``W−1`` bytes in one collective; the two-phase
   exchange (all-to-all of shards, decode-average-re-encode, all-gather of the re-encoded shards)
   transmits ``2(W−1)/W`` in two, and re-quantizes. With two workers both move the same bytes, so
   the all-gather wins (one collective, no re-encoding, no second rounding); from three workers
   on, the two-phase exchange's bytes per rank stay flat while the all-gather's grow.
3. **One issue order.** Which collective is issued when depends only on the number of chunks
   (never on timing), so every rank issues the same sequence: gloo matches collectives by the
   order they are issued in, and NCCL requires the same. Every rank decodes the same bytes in
   rank order, so the average is bit-identical on every rank.

The code is device-agnostic: on CUDA the collectives run on the process group's stream,
``Work.wait()`` orders the current stream after them (no host sync), and the encoding of the next
chunk overlaps the transfer of the previous one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_compress._compat import all_gather_single
from lightning_compress.comm.ledger import BitLedger, all_gather_wire_bytes, all_to_all_wire_bytes
from lightning_compress.compressors.base import Compressor, Payload

#: Elements per chunk (2 MiB of float32; 256 KiB of 4-bit codes). Large enough that a chunk's
#: collective costs far more than issuing it, small enough that a 4 M-parameter gradient makes
#: 8-9 chunks, all in flight at once (every chunk is issued before the first is awaited).
#: Measured against 1 M elements (QSGD 4-bit, 2 workers, 100 Mbit/s, 3 alternating pairs):
#: 270.6 / 285.8 / 268.4 against 292.7 / 286.8 / 314.1 ms per step (``docs/benchmarks.md``).
CHUNK_NUMEL = 1 << 19

COLLECTIVES = ("allgather", "two_phase")

#: Bytes per piece when one payload is gathered in pieces (:func:`all_gather_in_pieces`).
PIECE_BYTES = 1 << 18


def choose_collective(world_size: int) -> str:
    """The collective for fixed-size payloads among ``world_size`` ranks, by bytes then collectives.

    Bytes one rank transmits per byte of its payload: ``W−1`` for an all-gather, ``2(W−1)/W`` for
    the two-phase exchange. The all-gather is chosen when it moves no more bytes (``W <= 2``):
    then it is also one collective instead of two, with no re-encoding in between.
    """
    gather = float(world_size - 1)
    two_phase = 2.0 * (world_size - 1) / world_size
    return "allgather" if gather <= two_phase else "two_phase"


def chunk_bounds(numel: int, unit: int, chunk_numel: int = CHUNK_NUMEL) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``numel``: chunks of a multiple of ``unit`` elements.

    Every chunk but the last holds ``max(unit, chunk_numel // unit * unit)`` elements; the last
    holds the rest. A vector of at most one chunk is one chunk (an empty one: none).
    """
    size = max(unit, chunk_numel // unit * unit)
    return [(start, min(start + size, numel)) for start in range(0, numel, size)]


def all_gather_in_pieces(
    send: Tensor, group: dist.ProcessGroup | None, ledger: BitLedger | None, piece_bytes: int = PIECE_BYTES
) -> Tensor:
    """Every rank's ``send`` (uint8, the same size on every rank) as rows of ``(W, n)``, in rank order.

    For a payload that cannot be cut before it is encoded (Top-K selects over the whole vector):
    its bytes are gathered in pieces of ``piece_bytes``, all in flight at once (``async_op``), in
    the same order on every rank. The bytes are those of one all-gather; several collectives in
    flight keep the link busier than one (see the module docstring).
    """
    world = dist.get_world_size(group)
    pieces = []
    for a, b in chunk_bounds(send.numel(), 1, piece_bytes):
        recv = torch.empty(world * (b - a), dtype=torch.uint8, device=send.device)
        work = all_gather_single(recv, send[a:b], group=group, async_op=True)
        pieces.append((recv, work))
        if ledger is not None:
            ledger.record(b - a, all_gather_wire_bytes(b - a, world))
    for _, work in pieces:
        work.wait()
    if len(pieces) == 1:
        return pieces[0][0].view(world, -1)
    return torch.cat([recv.view(world, -1) for recv, _ in pieces], dim=1)


def all_to_all_in_pieces(
    send: Tensor, group: dist.ProcessGroup | None, ledger: BitLedger | None, piece_bytes: int = PIECE_BYTES
) -> Tensor:
    """Rank ``j``'s row ``r`` of ``send`` (uint8 ``(W, n)``) lands in row ``j`` of rank ``r``'s result.

    The all-to-all of equal slots (the first phase of a two-phase exchange), cut into pieces of
    ``piece_bytes`` per slot, all in flight at once and issued in the same order on every rank,
    like :func:`all_gather_in_pieces`. Returns ``(W, n)``: every rank's slot for this rank.
    """
    world, n = send.shape
    pieces = []
    for a, b in chunk_bounds(n, 1, piece_bytes):
        part = send[:, a:b].contiguous()
        recv = torch.empty_like(part)
        work = dist.all_to_all_single(recv, part, group=group, async_op=True)
        pieces.append((recv, work))
        if ledger is not None:
            ledger.record(part.numel(), all_to_all_wire_bytes(part.numel(), world))
    for _, work in pieces:
        work.wait()
    if len(pieces) == 1:
        return pieces[0][0]
    return torch.cat([recv for recv, _ in pieces], dim=1)


@dataclass
class _Chunk:
    """One chunk's state as it moves through the pipeline's stages."""

    start: int
    stop: int
    payloads: list[Payload] = field(default_factory=list)  # two-phase: this rank's shards (error feedback)
    shard: int = 0  # two-phase: elements per shard
    send: Tensor | None = None  # what the pending collective reads (kept alive until it is done)
    recv: Tensor | None = None  # what the pending collective fills
    work: Any = None  # the pending collective

    @property
    def numel(self) -> int:
        return self.stop - self.start

    def wait(self) -> Tensor:
        assert self.recv is not None
        if self.work is not None:
            self.work.wait()
            self.work = None
        self.send = None
        return self.recv


class PipelinedExchange:
    """Average one flat vector over ranks with a fixed-size codec, in pipelined chunks.

    Args:
        compressor: a codec whose payload size depends only on the element count
            (``exchange == "two_phase"``).
        group: the process group.
        ledger: records every collective's bytes (``None``: nothing recorded).
        generator: this rank's rounding generator; chunks draw from it in chunk order.
        collective: ``"allgather"`` or ``"two_phase"``; ``None`` chooses by cost
            (:func:`choose_collective`).
        chunk_numel: elements per chunk (rounded to the codec's alignment); ``None``:
            :data:`CHUNK_NUMEL`, read when the exchange is built.

    """

    def __init__(
        self,
        compressor: Compressor,
        group: dist.ProcessGroup | None,
        ledger: BitLedger | None,
        generator: torch.Generator | None = None,
        collective: str | None = None,
        chunk_numel: int | None = None,
    ) -> None:
        self.compressor = compressor
        self.group = group
        self.ledger = ledger
        self.generator = generator
        if collective is not None and collective not in COLLECTIVES:
            raise ValueError(f"collective must be one of {COLLECTIVES} or None, got {collective!r}")
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.collective = choose_collective(self.world) if collective is None else collective
        self.chunk_numel = CHUNK_NUMEL if chunk_numel is None else chunk_numel

    def __call__(self, x: Tensor, want_local: bool = False) -> tuple[Tensor, Tensor | None]:
        """``(average, local)``: the average over ranks, and this rank's own decoded ``x``."""
        self.start(x, want_local)
        return self.finish()

    # -- the exchange in steps: start, issue chunk by chunk as its values are final, finish -----
    def start(self, x: Tensor, want_local: bool = False) -> list[tuple[int, int]]:
        """Begin the exchange of flat ``x``, whose values may still be written chunk by chunk.

        Returns the chunks' ``(start, stop)`` in **issue order**: from the end of ``x`` to its
        start, the order in which backward makes a model-ordered gradient ready. Chunk ``i``'s
        values must be final when :meth:`issue` is called for it; the rest of ``x`` may be
        written meanwhile (a DDP hook streams buckets in: :mod:`lightning_compress.hooks`).
        """
        n = x.numel()
        self.average = torch.empty(n, dtype=torch.float32, device=x.device)
        self.local = torch.empty(n, dtype=torch.float32, device=x.device) if want_local else None
        self.x = x.reshape(-1)
        unit = self.compressor.alignment()
        self._stages: list[Callable[[_Chunk], None]]
        if self.collective == "two_phase":
            unit *= self.world  # every shard of a full chunk aligned
            self._stages = [self._scatter, self._reduce_and_gather, self._decode]
        else:
            self._stages = [self._gather, self._decode]
        bounds = chunk_bounds(n, unit, self.chunk_numel)[::-1]
        self._chunks = [_Chunk(a, b) for a, b in bounds]
        self._issued = 0
        return bounds

    @property
    def issued(self) -> int:
        """How many chunks (in issue order) have been encoded and put on the wire."""
        return self._issued

    def issue(self) -> None:
        """Encode the next chunk in issue order and start its first collective."""
        self._stages[0](self._chunks[self._issued])
        self._issued += 1

    def issue_all(self) -> None:
        """Issue every chunk not issued yet, and return without waiting for any."""
        while self._issued < len(self._chunks):
            self.issue()

    def finish(self) -> tuple[Tensor, Tensor | None]:
        """Issue the chunks not issued yet, run every later stage, return ``(average, local)``.

        Stage by stage: every chunk's first collective is issued before any is awaited (the
        encoding of chunk ``i+1`` overlaps the transfer of chunk ``i``, and several collectives
        are in flight at once); then each later stage runs over the chunks in issue order, each
        waiting only for its own chunk's collective while the later chunks are still on the wire.
        The order depends on the number of chunks only, so it is the same on every rank.
        """
        self.issue_all()
        for stage in self._stages[1:]:
            for chunk in self._chunks:
                stage(chunk)
        average, local = self.average, self.local
        del self.average, self.local, self.x, self._chunks, self._stages
        return average, local

    # -- stages --------------------------------------------------------------------------------
    def _encode(self, values: Tensor) -> tuple[Tensor, Payload]:
        payload = self.compressor.compress(values, self.generator)
        return payload.to_bytes(), payload

    def _gather(self, chunk: _Chunk) -> None:
        """Encode the chunk and start the all-gather of every rank's payload."""
        send, _ = self._encode(self.x[chunk.start : chunk.stop])
        self._record_coords(chunk.numel, send.numel())
        self._start_gather(chunk, send)

    def _scatter(self, chunk: _Chunk) -> None:
        """Cut the chunk into ``W`` equal shards, encode each, start the all-to-all."""
        world = self.world
        shard = chunk.shard = -(-chunk.numel // world)
        values = self.x[chunk.start : chunk.stop]
        if shard * world != chunk.numel:
            values = torch.nn.functional.pad(values, (0, shard * world - chunk.numel))
        encoded = [self._encode(values[r * shard : (r + 1) * shard]) for r in range(world)]
        chunk.payloads = [p for _, p in encoded]
        send = chunk.send = torch.cat([b for b, _ in encoded])
        self._record_coords(chunk.numel, send.numel())
        chunk.recv = torch.empty_like(send)
        chunk.work = dist.all_to_all_single(chunk.recv, send, group=self.group, async_op=True)
        self._record(send.numel(), all_to_all_wire_bytes(send.numel(), world))

    def _reduce_and_gather(self, chunk: _Chunk) -> None:
        """Decode and average this rank's shard of every rank, re-encode it, start the all-gather.

        Each decoded payload is divided by ``W`` as it is added: the sum of ``W`` decoded values
        near float32's maximum would overflow. Stochastic rounding keeps the re-encoding unbiased.
        """
        recv = chunk.wait()
        mine, _ = self._sum_decoded(recv, chunk.shard)
        send, _ = self._encode(mine)
        self._start_gather(chunk, send)

    def _decode(self, chunk: _Chunk) -> None:
        """Wait for the all-gather; decode every rank's part, in rank order, into the average."""
        recv = chunk.wait()
        if self.collective == "allgather":
            # every rank's payload of the whole chunk: the average is the mean of their decodings
            average = self.average[chunk.start : chunk.stop]
            _, own = self._sum_decoded(recv, chunk.numel, out=average, keep_own=self.local is not None)
            if self.local is not None:
                self.local[chunk.start : chunk.stop] = own
        else:
            # the averaged shards, one per rank, laid end to end
            step = recv.numel() // self.world
            shards = [self._decoded(recv[r * step : (r + 1) * step], chunk.shard) for r in range(self.world)]
            self.average[chunk.start : chunk.stop] = torch.cat(shards)[: chunk.numel]
            if self.local is not None:
                own = torch.cat([self._decompress(p) for p in chunk.payloads])
                self.local[chunk.start : chunk.stop] = own[: chunk.numel]
        chunk.recv = None
        chunk.payloads = []

    # -- helpers -------------------------------------------------------------------------------
    def _start_gather(self, chunk: _Chunk, send: Tensor) -> None:
        """Start the all-gather of every rank's ``send`` into the chunk (and record its bytes)."""
        chunk.send = send
        chunk.recv = torch.empty(self.world * send.numel(), dtype=torch.uint8, device=send.device)
        chunk.work = all_gather_single(chunk.recv, send, group=self.group, async_op=True)
        self._record(send.numel(), all_gather_wire_bytes(send.numel(), self.world))

    def _sum_decoded(
        self, recv: Tensor, numel: int, out: Tensor | None = None, keep_own: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """``(Σ_r decode(part r) / W, own)`` over the ``W`` equal parts of ``recv``, in rank order.

        The sum is written into ``out`` (new if ``None``). ``own`` is this rank's decoded part
        when ``keep_own`` (its own payload, as every rank received it), else ``None``.
        """
        step = recv.numel() // self.world
        if out is None:
            out = torch.empty(numel, dtype=torch.float32, device=recv.device)
        own = None
        for r in range(self.world):
            decoded = self._decoded(recv[r * step : (r + 1) * step], numel)
            if r == 0:
                torch.mul(decoded, 1.0 / self.world, out=out)
            else:
                out.add_(decoded, alpha=1.0 / self.world)
            if keep_own and r == self.rank:
                own = decoded
        return out, own

    def _decoded(self, buf: Tensor, numel: int) -> Tensor:
        payload = self.compressor.from_bytes(buf, (numel,), torch.float32)
        return self._decompress(payload)

    def _decompress(self, payload: Payload) -> Tensor:
        return self.compressor.decompress(payload).reshape(-1).to(torch.float32)

    def _record_coords(self, coords: int, nbytes: int) -> None:
        if self.ledger is not None:
            self.ledger.record_coords(coords, nbytes, self.world)

    def _record(self, nbytes: int, wire: float) -> None:
        if self.ledger is not None:
            self.ledger.record(nbytes, wire)
