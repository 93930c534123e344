"""The bit ledger: what each rank really hands to collectives, and what it puts on the wire.

Two figures are kept because they differ by the collective algorithm:

- *payload bytes*: the size of the tensors this rank passes to ``all_reduce``, ``all_to_all``,
  ``all_gather`` (exact, counted from the tensors themselves);
- *wire bytes*: the bytes this rank transmits for those calls under the ring/pairwise algorithms
  gloo and NCCL use (``2(W−1)/W·n`` for an allreduce of ``n`` bytes, ``(W−1)/W·n`` for an
  all-to-all, ``(W−1)·n`` for an all-gather of ``n`` bytes per rank). Protocol headers come on
  top; the benchmark compares this figure with the network interface's counters.

The *dense baseline* is what stock DDP would have put on the wire for the same optimizer steps: a
float32 ring allreduce of every gradient coordinate (also on the local steps of Local SGD and
SlowMo, where this package sends nothing).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields


def allreduce_wire_bytes(nbytes: int, world_size: int) -> float:
    """Bytes one rank transmits in a ring allreduce of ``nbytes``."""
    return 2.0 * (world_size - 1) / world_size * nbytes if world_size > 1 else 0.0


def all_to_all_wire_bytes(nbytes: int, world_size: int) -> float:
    """Bytes one rank transmits in an all-to-all whose input holds ``nbytes`` (its own share stays)."""
    return (world_size - 1) / world_size * nbytes if world_size > 1 else 0.0


def all_gather_wire_bytes(nbytes: int, world_size: int) -> float:
    """Bytes one rank transmits in a ring all-gather of ``nbytes`` per rank."""
    return float((world_size - 1) * nbytes)


@dataclass
class StepRecord:
    """The figures of one optimizer step on one rank."""

    payload_bytes: int = 0
    wire_bytes: float = 0.0
    dense_wire_bytes: float = 0.0
    coords: int = 0
    encoded_bits: int = 0
    collectives: int = 0

    @property
    def bits_sent(self) -> int:
        return 8 * self.payload_bytes

    @property
    def bits_per_coord(self) -> float:
        """Bits of the encoded gradient per coordinate (codes, scales, indices, dense fallback)."""
        return self.encoded_bits / self.coords if self.coords else 0.0

    @property
    def compression_ratio(self) -> float:
        """Wire bytes stock DDP (a float32 ring allreduce) would need, over the bytes actually sent.

        ``inf`` for a step that sent nothing where DDP would have (a local step), 0.0 for a step
        with no gradient at all.
        """
        if self.wire_bytes:
            return self.dense_wire_bytes / self.wire_bytes
        return math.inf if self.dense_wire_bytes else 0.0


@dataclass
class BitLedger:
    """Per-step and cumulative communication figures of this rank.

    The exchange calls :meth:`record` for every collective and :meth:`record_coords` once per
    exchanged tensor, then :meth:`end_step` once per optimizer step.
    """

    current: StepRecord = field(default_factory=StepRecord)
    last: StepRecord = field(default_factory=StepRecord)
    total: StepRecord = field(default_factory=StepRecord)
    #: optimizer steps closed
    steps: int = 0
    #: steps that called at least one collective (fewer than ``steps`` under local-step schedules)
    exchanges: int = 0

    def record(self, payload_bytes: int, wire_bytes: float) -> None:
        """Count one collective: bytes handed to it and bytes it puts on the wire."""
        self.current.payload_bytes += int(payload_bytes)
        self.current.wire_bytes += float(wire_bytes)
        self.current.collectives += 1

    def record_coords(self, coords: int, encoded_bytes: int, world_size: int) -> None:
        """Count ``coords`` gradient coordinates exchanged, encoded in ``encoded_bytes``."""
        self.current.coords += int(coords)
        self.current.encoded_bits += 8 * int(encoded_bytes)
        self.current.dense_wire_bytes += allreduce_wire_bytes(4 * int(coords), world_size)

    def end_step(self) -> StepRecord:
        """Close the current step; returns its record (also kept as :attr:`last`)."""
        done = self.current
        for f in fields(StepRecord):
            setattr(self.total, f.name, getattr(self.total, f.name) + getattr(done, f.name))
        self.last = done
        self.current = StepRecord()
        self.steps += 1
        self.exchanges += done.collectives > 0
        return done

    def state_dict(self) -> dict:
        total, last = asdict(self.total), asdict(self.last)
        return {"total": total, "last": last, "steps": self.steps, "exchanges": self.exchanges}

    def load_state_dict(self, state: dict) -> None:
        self.total = StepRecord(**state["total"])
        self.last = StepRecord(**state.get("last", {}))
        self.steps = int(state["steps"])
        self.exchanges = int(state.get("exchanges", self.steps))  # saved before exchanges were counted
        self.current = StepRecord()
