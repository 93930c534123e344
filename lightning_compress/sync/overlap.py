"""Overlap-Local-SGD: the model average runs in the background during the next local steps.

Wang, Liang, Joshi, "Overlap Local-SGD: An Algorithmic Approach to Hide Communication Delays in
Distributed SGD", ICASSP 2020, arXiv 2002.09539.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_compress.comm.collectives import background_group
from lightning_compress.comm.engine import PipelinedExchange
from lightning_compress.comm.ledger import BitLedger, allreduce_wire_bytes
from lightning_compress.compressors.base import NoCompression
from lightning_compress.exchange import RankGenerator
from lightning_compress.sync.averaging import (
    PeriodicAveraging,
    check_number,
    check_optional_bool,
    compressed_first,
    divide_by_lr,
    flatten,
    learning_rates,
    reset_optimizer_state,
    write_flat_,
)

if TYPE_CHECKING:
    from torch.optim import Optimizer

    from lightning_compress.sync.base import SyncContext


log = logging.getLogger(__name__)

#: the anchor average's rounding stream: apart from the hook's and Local SGD's
_SEED_OFFSET = 2_000_003


@torch.no_grad()
def anchor_step_(
    x: Tensor, z: Tensor, v: Tensor, lr: float | Tensor, pullback: float, momentum: float
) -> Tensor:
    """One sync point of Overlap-Local-SGD on flat vectors, in place; returns what to average next.

    In this order (arXiv 2002.09539; the order of the authors' reference implementation):

    1. pull back towards the anchor: ``x ← (1 − α)·x + α·z``;
    2. anchor momentum, from the pulled-back model: ``v ← β·v + (z − x)/γ``;
    3. this rank's contribution to the next anchor: ``z − γ·v`` (averaged over ranks in the
       background; the average is the anchor of the next sync point).

    ``x`` and ``v`` are this rank's; ``z`` is identical on every rank. ``v`` may be shorter than
    ``x``: the trailing elements (model buffers) then follow the rule without momentum, i.e.
    they contribute their pulled-back value. With ``β = 0`` the contribution is ``x`` itself.

    Args:
        x: this rank's model; pulled back in place.
        z: the anchor (the average finished since the previous sync point).
        v: the anchor momentum of the first ``v.numel()`` elements; updated in place.
        lr: the base learning rate ``γ`` of those elements (float or per-element vector).
        pullback: ``α``.
        momentum: ``β``.

    """
    x.mul_(1.0 - pullback).add_(z, alpha=pullback)  # 1.
    n = v.numel()
    v.mul_(momentum).add_(divide_by_lr(z[:n] - x[:n], lr))  # 2.
    send = x.clone()
    send[:n] = z[:n] - (v * lr if isinstance(lr, Tensor) else v * float(lr))  # 3.
    return send


def launch_allreduce(
    buffer: Tensor, group: dist.ProcessGroup | None, ledger: BitLedger | None, extra: int = 0
) -> dist.Work:
    """Start a non-blocking sum-allreduce of ``buffer`` (in place) and return its work handle.

    The bytes are recorded now, in the step that issues the collective. ``buffer`` must not be
    touched until ``work.wait()`` returns. Its last ``extra`` elements are not coordinates (flags):
    their bytes count, but not as coordinates.
    """
    if ledger is not None:
        nbytes = buffer.numel() * buffer.element_size()
        world = dist.get_world_size(group)
        ledger.record_coords(buffer.numel() - extra, nbytes, world)
        ledger.record(nbytes, allreduce_wire_bytes(nbytes, world))
    work = dist.all_reduce(buffer, group=group, async_op=True)
    assert work is not None
    return work


class OverlapLocalSGD(PeriodicAveraging):
    """Overlap-Local-SGD with anchor momentum (Wang, Liang, Joshi; arXiv 2002.09539).

    Local SGD whose model average never blocks: each rank keeps an *anchor* ``z`` (identical
    on every rank), and at every sync point, after every ``period``-th local step:

    1. wait for the anchor average launched at the previous sync point (it ran during the last
       ``period`` local steps; at the first sync point the anchor is the initial model);
    2. pull back: ``x ← (1 − α)·x + α·z``;
    3. anchor momentum: ``v ← β·v + (z − x)/γ`` (``γ`` = the base learning rate);
    4. launch a non-blocking allreduce (``async_op=True``) of ``z − γ·v``; divided by the world
       size when it completes, it is the next anchor.

    Non-finite values (``CompressedDDP(nonfinite=...)``, see :mod:`~lightning_compress.sync.averaging`):
    a local step with NaN/Inf gradients is skipped on its rank alone (``"skip"``). At a sync point,
    a rank whose model or optimizer state is non-finite restarts from the anchor (its optimizer
    state too) and sends zeros with a flag (one float more in the allreduce): the next anchor is
    the average of the other ranks. With ``"raise"``, every rank raises when that average
    completes, at the sync point after the next (or at the end of ``fit``).

    Only one average is outstanding at any time, and every rank issues it at the same optimizer
    step, in a process group of its own
    (:func:`~lightning_compress.comm.collectives.background_group`): on the default group,
    Lightning's per-step broadcast would wait behind it, and so would the step. Model buffers
    (BatchNorm statistics) travel in the same allreduce and follow the rule without momentum.
    The replicas are never identical (each is pulled towards the anchor, not replaced by it);
    the anchor is. :meth:`before_save` completes the pending average, so a resumed run continues
    exactly like an uninterrupted one.

    **Compressed anchor average.** With a fixed-size codec as the strategy's compressor
    (:class:`~lightning_compress.compressors.QSGD`), the parameters of at least
    ``min_compression_size`` elements send ``(z − γ·v) − z``, their contribution's difference
    from the current anchor (identical on every rank), through the communication engine
    (:class:`~lightning_compress.comm.engine.PipelinedExchange`): its chunks are encoded and
    all-gathered asynchronously at the sync point and decoded at the next one, so the compressed
    average stays in the background like the float32 one. Always one all-gather (never the
    two-phase exchange, whose second phase would have to wait at the next sync point). The
    small tensors, model buffers and the flag travel in the float32 allreduce. Stochastic
    rounding keeps the anchor unbiased. Other codecs (Top-K, sketches select over the whole
    vector and block) average in float32 and serve only the ``warmup_steps`` (a warning says so).
    The authors' code starts the schedule one step later (its first sync point follows step
    ``τ + 1``); here sync points follow steps ``τ, 2τ, ...`` of the local phase, as in LocalSGD.

    Args:
        period: local steps ``τ`` between sync points; the average has ``τ`` steps of compute
            to hide behind. Larger hides slower networks but lets replicas drift; paper: 2.
        pullback: ``α`` in (0, 1], how far each rank moves towards the anchor. Larger keeps the
            replicas closer together (1 replaces the model by the stale anchor); paper: 0.6.
        momentum: anchor momentum ``β`` in [0, 1); paper: 0.7. 0 makes the anchor the plain
            average of the pulled-back models.
        warmup_steps: synchronous optimizer steps before the local phase.
        compress_average: send the anchor average through the strategy's codec (see above).
            ``None`` (default): when the codec is a fixed-size one (QSGD); ``False``: always
            float32; ``True``: a codec that is not fixed-size is refused at setup.

    """

    def __init__(
        self,
        period: int = 2,
        pullback: float = 0.6,
        momentum: float = 0.7,
        warmup_steps: int = 0,
        compress_average: bool | None = None,
    ) -> None:
        super().__init__(period, warmup_steps)
        self.compress_average = check_optional_bool("compress_average", compress_average)
        self._compress = False
        self._n_large = 0  # elements of the compressed (leading) parameters in the flat layout
        self.rng = RankGenerator(offset=_SEED_OFFSET)
        self.pullback = check_number("pullback", pullback, 0.0, 1.0, low_open=True, high_open=False)
        self.momentum = check_number("momentum", momentum, 0.0, 1.0, low_open=False, high_open=True)
        self.z: Tensor | None = None  # anchor (params then float buffers)
        self.v: Tensor | None = None  # anchor momentum (params only)
        self._world = 1
        # the one pending allreduce: its work handle, its buffer, and (nonfinite mode, step it was
        # launched after) when the buffer ends with the left-out flag; bound to this process
        self._work: Any
        self._inflight: Tensor | None
        self._flagged: tuple[str, int] | None
        self._engine: PipelinedExchange | None  # the compressed part's chunks in flight
        #: the group the average runs in: one of its own (:func:`background_group`)
        self._group: dist.ProcessGroup | None
        for name in ("_work", "_inflight", "_flagged", "_engine", "_group"):
            self.add_transient(name)

    def setup(self, ctx: SyncContext) -> None:
        """Bind the model (see :class:`PeriodicAveraging`) and say what the compressor is used for."""
        self._work, self._inflight, self._flagged, self._engine = None, None, None, None
        super().setup(ctx)
        self._world = dist.get_world_size(ctx.comm.process_group)
        self._group = background_group(ctx.comm.process_group)
        if not self._compress and not isinstance(ctx.comm.compressor, NoCompression):
            log.warning(
                "OverlapLocalSGD averages models with an exact non-blocking float32 allreduce; the "
                f"compressor {ctx.comm.compressor!r} is used only for the {self.warmup_steps} "
                "warm-up steps"
            )

    def ranks_may_differ(self, steps_done: int) -> bool:
        return steps_done > self.warmup_steps

    def _uses_compression(self, ctx: SyncContext) -> bool:
        fixed_size = ctx.comm.compressor.exchange == "two_phase"
        if self.compress_average and not fixed_size:
            raise ValueError(
                f"OverlapLocalSGD(compress_average=True) needs a fixed-size codec (QSGD) as the strategy's "
                f"compressor, got {ctx.comm.compressor!r}: its exchange selects over the whole vector and "
                "cannot stay in flight; use compress_average=None or False"
            )
        return fixed_size if self.compress_average is None else self.compress_average

    def _order(self, named: list[tuple[str, Tensor]], ctx: SyncContext) -> list[tuple[str, Tensor]]:
        self._compress = self._uses_compression(ctx)
        if not self._compress:
            self._n_large = 0
            return named
        # the compressed tensors first, so they are one leading slice of every flat vector
        ordered, self._n_large, _ = compressed_first(named, ctx.comm.min_compression_size)
        return ordered

    def _init_state(self, ctx: SyncContext) -> None:
        self.complete()
        self.z = flatten(self._params + self._buffers).to(self._device)
        self.v = torch.zeros(sum(p.numel() for p in self._params), dtype=torch.float32, device=self._device)

    def complete(self) -> None:
        """Wait for the pending anchor average, if any, and make it the anchor."""
        if self._work is None and self._engine is None:
            return
        work, buf, flagged, engine = self._work, self._inflight, self._flagged, self._engine
        self._work, self._inflight, self._flagged, self._engine = None, None, None, None
        average = engine.finish()[0] if engine is not None else None  # decoded chunk by chunk
        if work is not None:
            work.wait()
        n_bad = 0
        if flagged is not None:
            assert buf is not None  # the flag rides the float32 allreduce
            n_bad = round(buf[-1].item())
            buf = buf[:-1]
            if n_bad:
                self._on_anchor_left_out(n_bad, *flagged)
        live = self._world - n_bad
        if average is None:
            assert buf is not None
            self.z = buf.div_(live)
            return
        # the codecs divide by the world size; left-out ranks sent zeros
        assert self.z is not None
        n = average.numel()
        z = torch.empty_like(self.z)
        torch.add(self.z[:n], average, alpha=self._world / live, out=z[:n])
        if buf is not None:
            torch.div(buf, live, out=z[n:])
        self.z = z

    def _on_anchor_left_out(self, n_bad: int, mode: str, step: int) -> None:
        name, world = type(self).__name__, self._world
        if mode == "raise":
            raise FloatingPointError(
                f"{name}: non-finite gradients or parameters (NaN/Inf) on {n_bad} of {world} ranks before "
                f"the sync point after step {step}; set nonfinite='skip' to skip such steps instead"
            )
        if n_bad == world:
            raise FloatingPointError(
                f"{name}: non-finite parameters or optimizer state (NaN/Inf) on every rank ({n_bad} of "
                f"{world} ranks) at the sync point after step {step}: there is no finite model to average"
            )
        log.warning("%s: the anchor average launched after step %d left out %d of %d ranks (non-finite "
                    "parameters or optimizer state); the anchor is the average of the other %d",
                    name, step, n_bad, world, world - n_bad)

    def _synchronize(self, ctx: SyncContext, optimizer: Optimizer, step: int) -> None:
        assert self.z is not None and self.v is not None
        log.debug(f"{type(self).__name__}: sync point after optimizer step {step}")
        self.complete()  # 1.
        tensors = self._params + self._buffers
        x = flatten(tensors).to(self.z.device)
        cs = ctx.comm
        optimizers = ctx.optimizers or [optimizer]
        check = cs.nonfinite != "ignore"
        # a local check (one read to the host); the others learn it from the flag in the allreduce
        bad = check and bool(self._contribution_flag(ctx, [x]).item())
        if not bad:
            lr = learning_rates(optimizers, self._params)
            send = anchor_step_(x, self.z, self.v, lr, self.pullback, self.momentum)  # 2.-3.
            write_flat_(tensors, x)
        else:
            send = torch.zeros_like(x)
            self._leave_out(ctx, optimizers, tensors, step)
        if self._compress:
            # 4. the large part's difference from the anchor through the engine: every chunk
            #    encoded and on the wire now, decoded at the next sync point (a left-out rank
            #    sends zeros)
            n = self._n_large
            delta = send[:n] - self.z[:n] if not bad else send.new_zeros(n)
            generator = self.rng.get(delta.device, cs.seed, cs.process_group)
            engine = self._engine = PipelinedExchange(
                cs.compressor, self._group, cs.ledger, generator, collective="allgather"
            )
            engine.start(delta)
            engine.issue_all()
            send = send[n:]
        if check:
            send = torch.cat([send, send.new_tensor([float(bad)])])
            self._flagged = (cs.nonfinite, step)
        if send.numel():  # (nothing left when every tensor is compressed and there is no flag)
            self._inflight = send
            self._work = launch_allreduce(send, self._group, cs.ledger, extra=int(check))  # 4.

    def _leave_out(self, ctx: SyncContext, optimizers: list[Optimizer], tensors: list[Tensor],
                  step: int) -> None:
        """This rank's model, optimizer state or a local step is non-finite: it sends zeros."""
        cs = ctx.comm
        rank = dist.get_rank(cs.process_group)
        if cs.nonfinite == "raise":
            log.error("%s: rank %d reports non-finite gradients or parameters at the sync point after step "
                      "%d; every rank raises FloatingPointError when this average completes",
                      type(self).__name__, rank, step)
            return
        assert self.z is not None
        write_flat_(tensors, self.z)  # restart from the anchor, finite and identical on every rank
        reset_optimizer_state(optimizers, self._params)
        cs.count_discarded()
        log.warning("%s: non-finite parameters or optimizer state (NaN/Inf) on rank %d at the sync point "
                    "after step %d: this rank restarts from the anchor with fresh optimizer state and is "
                    "left out of the next anchor average; the other ranks are unaffected",
                    type(self).__name__, rank, step)

    def on_train_end(self, ctx: SyncContext) -> None:
        """Complete the pending average: no collective outlives ``fit`` (the anchor is then current)."""
        self.complete()
        super().on_train_end(ctx)

    def before_save(self, ctx: SyncContext) -> None:
        """Complete the pending average (the uninterrupted run gets the same anchor later)."""
        self.complete()
        super().before_save(ctx)

    @property
    def anchor(self) -> Tensor | None:
        """The current anchor, flat (parameters in model order, then float buffers)."""
        return self.z

    def _state_tensors(self) -> dict[str, Tensor | None]:
        return {"z": self.z, "v": self.v}

    def _state_extra(self) -> dict[str, Any]:
        generator = self.rng.state()
        return {} if generator is None else {"generator": generator}

    def _load_tensors(self, state: dict[str, Any], device: torch.device) -> None:
        self._work, self._inflight, self._flagged, self._engine = None, None, None, None
        self.rng.load(state.get("generator"))
        z = state.get("z")
        self.z = z.to(device) if z is not None else flatten(self._params + self._buffers).to(device)
        n = sum(p.numel() for p in self._params)
        self.v = state["v"].to(device) if state.get("v") is not None else torch.zeros(n, device=device)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(period={self.period}, pullback={self.pullback}, "
                f"momentum={self.momentum}, warmup_steps={self.warmup_steps}, "
                f"compress_average={self.compress_average})")


__all__ = ["OverlapLocalSGD", "anchor_step_", "launch_allreduce"]
