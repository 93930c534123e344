"""A gradient streamed into the engine bucket by bucket: chunks go on the wire while backward runs.

DDP hands its gradient buckets to the hook one by one, from the autograd thread, while backward
goes on; the last bucket arrives when backward ends. A fused exchange (one flat vector built at
the last bucket) leaves the link idle for the whole backward pass. A :class:`GradientStream`
instead copies each bucket's compressed parameters into the flat, model-ordered vector as the
bucket arrives, and hands every chunk whose values are all final to the engine
(:class:`~lightning_compress.comm.engine.PipelinedExchange`), which encodes it and puts it on the
wire at once.

What every rank must agree on, and why it does:

* **The chunks and their issue order** come from the layout alone (which parameters are
  compressed, their sizes, model order): the engine issues chunks from the end of the vector to
  its start, the order in which backward produces a model-ordered gradient.
* **When a chunk is issued** depends on which parameters have arrived, that is on DDP's buckets
  and the order it calls the hook in: identical on every rank (DDP builds its buckets from
  rank 0's order, and calls the hook in bucket order). A chunk is issued only after every chunk
  before it in issue order, so however the buckets are cut, every rank issues the same sequence
  of collectives; with one bucket, every chunk is issued at the end (the fused exchange).
* **The values** are those of the fused exchange: the same chunks, the same order of random
  draws, the same arithmetic. Streamed and fused exchanges give bit-identical averages (tested).

The plan (:class:`StreamPlan`) is learnt from a fused step (where the whole gradient is seen at
once), so a hook streams from its second compressed exchange on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_compress.comm.engine import PipelinedExchange

#: ``(name, numel)`` per parameter, in model order
Layout = tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class StreamPlan:
    """Where each compressed parameter lies in the flat, model-ordered vector.

    Attributes:
        offsets: ``id(parameter) -> offset`` of every compressed parameter.
        layout: ``(name, numel)`` of the compressed parameters, in model order.
        dense_layout: ``(name, numel)`` of the parameters sent dense, in model order.
        numel: elements of the flat vector.

    """

    offsets: dict[int, int]
    layout: Layout
    dense_layout: Layout
    numel: int

    @classmethod
    def from_parameters(cls, compressed: Sequence[tuple[int, str, int]], dense: Layout) -> StreamPlan:
        """The plan of ``compressed`` (``(id(parameter), name, numel)`` in model order)."""
        offsets, offset = {}, 0
        for pid, _, numel in compressed:
            offsets[pid] = offset
            offset += numel
        return cls(offsets, tuple((name, numel) for _, name, numel in compressed), dense, offset)


class GradientStream:
    """One step's compressed gradient, streamed into the engine as DDP's buckets arrive.

    Args:
        plan: where each compressed parameter goes.
        engine: the exchange; :meth:`PipelinedExchange.start` is called here.
        device: where the flat vector lives (the buckets' device).
        prepare: applied in place to each parameter's float32 slice once it is copied in, before
            any chunk holding it is issued (unscale a GradScaler's gradients, add the
            error-feedback residual): the same element-wise operations the fused exchange applies
            to the whole vector.
        want_local: also decode this rank's own payload (error feedback needs it).

    """

    def __init__(
        self,
        plan: StreamPlan,
        engine: PipelinedExchange,
        device: torch.device,
        prepare: Callable[[int, Tensor], None] | None = None,
        want_local: bool = False,
    ) -> None:
        self.plan = plan
        self.engine = engine
        self.prepare = prepare
        #: the flat float32 vector the chunks are encoded from (``p`` with error feedback)
        self.flat = torch.empty(plan.numel, dtype=torch.float32, device=device)
        self.bounds = engine.start(self.flat, want_local)
        #: elements of each chunk (in issue order) whose values are not final yet
        self.missing = [stop - start for start, stop in self.bounds]
        self.arrived: set[int] = set()

    def add(self, params: Sequence[Tensor], buffer: Tensor) -> None:
        """Copy one bucket's compressed parameters in; issue every chunk that became complete."""
        offset = 0
        for p in params:
            view, offset = buffer[offset : offset + p.numel()], offset + p.numel()
            start = self.plan.offsets.get(id(p))
            if start is None:
                continue  # sent dense
            if id(p) in self.arrived:
                raise RuntimeError("a parameter's gradient reached the compressing hook twice in one step")
            self.arrived.add(id(p))
            stop = start + p.numel()
            target = self.flat[start:stop]
            target.copy_(view)
            if self.prepare is not None:
                self.prepare(start, target)
            for i, (a, b) in enumerate(self.bounds):
                self.missing[i] -= max(0, min(b, stop) - max(a, start))
        while self.engine.issued < len(self.bounds) and self.missing[self.engine.issued] == 0:
            self.engine.issue()

    @property
    def complete(self) -> bool:
        """Whether every compressed parameter of the plan has arrived."""
        return len(self.arrived) == len(self.plan.offsets)

    def finish(self) -> tuple[Tensor, Tensor | None]:
        """``(average, local)`` over the flat vector, once every bucket has arrived."""
        if not self.complete:
            raise RuntimeError(
                f"the compressing hook received {len(self.arrived)} of the {len(self.plan.offsets)} "
                "compressed parameters it streams; the set of parameters that DDP reduces changed in training"
            )
        return self.engine.finish()
