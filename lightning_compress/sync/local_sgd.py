"""Local SGD: local steps without communication, and a model average every ``period`` steps."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_compress.compressors.base import NoCompression
from lightning_compress.exchange import (
    COMPRESSED,
    ExchangeMemory,
    RankGenerator,
    compressed_average,
    flatten,
)
from lightning_compress.sync.averaging import (
    PeriodicAveraging,
    allreduce_average_,
    allreduce_average_checked_,
    check_optional_bool,
    compressed_first,
    reset_optimizer_state,
    write_flat_,
)

if TYPE_CHECKING:
    from torch.optim import Optimizer

    from lightning_compress.hooks import CompressionState
    from lightning_compress.sync.base import SyncContext

log = logging.getLogger(__name__)

# the averaging draws its stochastic rounding from its own stream, apart from the hook's
_SEED_OFFSET = 1_000_003


class LocalSGD(PeriodicAveraging):
    """Local SGD (periodic model averaging; Stich, arXiv 1805.09767; Wang et al., arXiv 1910.00643).

    Each rank takes ``period`` optimizer steps on its own gradients, with no gradient exchange,
    then the ranks average their models:

    1. ``warmup_steps`` steps of ordinary synchronous training (gradients exchanged, compressed
       if the strategy compresses).
    2. Local steps: the DDP hook skips the exchange; zero bytes are sent.
    3. After every ``period``-th local step, a sync point:

       3.1 exact (no compression): one fused float32 allreduce of all trainable parameters and
           floating buffers (BatchNorm statistics), divided by the world size;
       3.2 compressed: the *model delta* ``Δ = x − x₀`` since the last sync point (``x₀`` is
           identical on every rank) is averaged with the strategy's compressor, with error
           feedback if the strategy uses it (its residual lives here, per rank), and
           ``x ← x₀ + avg(Δ)``; tensors smaller than the strategy's ``min_compression_size`` and
           the buffers are averaged exactly in one dense allreduce; then ``x₀ ← x``.

    Non-finite values (``CompressedDDP(nonfinite=...)``, see :mod:`~lightning_compress.sync.averaging`):
    a local step with NaN/Inf gradients is skipped on its rank alone (``"skip"``), with no
    collective; at a sync point one float more in the (dense) allreduce says which ranks hold a
    non-finite model, delta or optimizer state; they are left out of the average (their delta is
    sent as zeros and their error-feedback residual kept) and take the others' average.

    After a sync point every rank holds bit-identical parameters. Integer buffers (e.g.
    ``num_batches_tracked``) are left alone, and DDP's per-forward buffer broadcast is turned
    off (it would communicate on every local step). The base optimizer's state (momentum
    buffers) stays local, as in the Local SGD papers.

    Bytes: a local step records nothing; a sync point records the averaging collectives; every
    optimizer step closes one ledger step, so over a run the ledger shows the model's bytes
    divided by ``period`` per step.

    When to use it: near-IID data across ranks and a slow network. With heterogeneous (non-IID)
    data, minibatch SGD (every-step exchange, compressed if need be) has the better guarantees
    (Woodworth, Patel, Srebro, arXiv 2006.04735); see ``docs/sync.md``.

    Args:
        period: local steps ``τ`` between averages. Larger sends ``τ`` times fewer bytes but lets
            the replicas drift further apart (higher error at convergence on non-IID data);
            typical 4-16 (SlowMo's experiments use 12 for Local SGD).
        warmup_steps: synchronous optimizer steps before the local phase; a few hundred to a few
            thousand help accuracy early in training (post-local SGD, Lin et al., arXiv 1808.07217).
        compress_average: average model deltas with the strategy's compressor. ``None``
            (default): yes iff the strategy's compressor is not ``NoCompression``. ``False``:
            exact averaging whatever the compressor (the compressor then serves the warm-up only).

    Example::

        CompressedDDP(compressor="none", sync=LocalSGD(period=8))            # exact averages
        CompressedDDP(compressor=QSGD(bits=8), sync=LocalSGD(period=8))      # 8-bit deltas

    """

    def __init__(self, period: int = 8, warmup_steps: int = 0, compress_average: bool | None = None) -> None:
        super().__init__(period, warmup_steps)
        self.compress_average = check_optional_bool("compress_average", compress_average)
        self._compress = False
        self._n_large = 0  # elements of the compressed (leading) parameters in the flat layout
        self._k_large = 0  # how many parameters that is
        self.x0: Tensor | None = None
        #: the delta's error-feedback residual (or a sketch's accumulated ``v``), per rank
        self.memory = ExchangeMemory()
        self.rng = RankGenerator(offset=_SEED_OFFSET)
        self._n_left_out = 0  # ranks left out of the last average (non-finite), identical on every rank
        self._left_out = False  # whether this rank was one of them

    # -- what is averaged, and how -----------------------------------------------------------
    def _uses_compression(self, ctx: SyncContext) -> bool:
        if self.compress_average is None:
            return not isinstance(ctx.comm.compressor, NoCompression)
        return self.compress_average

    def _keeps_reference(self) -> bool:
        """Whether ``x₀`` (the model at the last sync point) is kept."""
        return self._compress

    def _order(self, named: list[tuple[str, Tensor]], ctx: SyncContext) -> list[tuple[str, Tensor]]:
        self._compress = self._uses_compression(ctx)
        if not self._compress:
            self._n_large = 0
            return named
        # the compressed tensors first, so they are one leading slice of every flat vector
        ordered, self._n_large, self._k_large = compressed_first(named, ctx.comm.min_compression_size)
        return ordered

    def _init_state(self, ctx: SyncContext) -> None:
        self.x0 = flatten(self._params).to(self._device) if self._keeps_reference() else None
        self.memory.reset()  # a fresh local phase: nothing owed from a previous one

    def _synchronize(self, ctx: SyncContext, optimizer: Optimizer, step: int) -> None:
        log.debug(f"{type(self).__name__}: sync point after optimizer step {step}")
        left_out = self._left_out = self._average(ctx, step)
        if left_out and not self._averages_optimizer_state():
            reset_optimizer_state(ctx.optimizers or [optimizer], self._params)
        self._outer_update(ctx, optimizer)

    def _averages_optimizer_state(self) -> bool:
        """Whether :meth:`_outer_update` gives a left-out rank the others' optimizer state."""
        return False

    @torch.no_grad()
    def _average(self, ctx: SyncContext, step: int) -> bool:
        """Replace every rank's model by the (exact or compressed) average over ranks.

        Returns whether this rank was left out of it (non-finite, see the class docstring).
        """
        cs = ctx.comm
        check = cs.nonfinite != "ignore"
        self._n_left_out = 0
        if not self._compress:
            # 3.1: one collective for every parameter and buffer
            tensors = self._params + self._buffers
            if not check:
                allreduce_average_(tensors, cs.process_group, cs.ledger)
                return False
            n_bad, mine = allreduce_average_checked_(
                tensors, cs.process_group, cs.ledger, self._device, self._contribution_flag(ctx)
            )
            self._on_left_out(ctx, step, n_bad, mine)
            self._n_left_out = n_bad
            return mine
        large, dense = self._params[: self._k_large], self._params[self._k_large :] + self._buffers
        # 3.2: small tensors and buffers dense, then the large tensors' delta compressed; the same
        # two calls in the same order on every rank
        x0 = self.x0[: self._n_large] if self.x0 is not None else None
        delta = flatten(large).to(x0.device) - x0 if large and x0 is not None else None
        n_bad, mine = 0, False
        if check:
            # the flag rides the dense allreduce, so every rank knows before the compressed exchange
            flag = self._contribution_flag(ctx, [delta] if delta is not None else [])
            n_bad, mine = allreduce_average_checked_(dense, cs.process_group, cs.ledger, self._device, flag)
            self._on_left_out(ctx, step, n_bad, mine)
        else:
            allreduce_average_(dense, cs.process_group, cs.ledger)
        self._n_left_out = n_bad
        if large:
            assert x0 is not None and delta is not None
            if mine:
                delta.zero_()  # a left-out rank sends nothing and keeps its residual
            average = self._exchange_delta(cs, delta, keep_residual=mine)
            if n_bad:
                average.mul_(cs.world_size / (cs.world_size - n_bad))  # the codecs divide by the world
            write_flat_(large, x0 + average)
        return mine

    def _exchange_delta(self, cs: CompressionState, delta: Tensor, keep_residual: bool = False) -> Tensor:
        """3.2: the delta's compressed average; error feedback / a sketch's ``v`` as the exchange keeps it.

        ``keep_residual``: this rank is left out of the average (the same collectives, with
        zeros, and its residual untouched).
        """
        generator = self.rng.get(delta.device, cs.seed, cs.process_group)
        return compressed_average(
            delta, cs.compressor, cs.config, self.memory, cs.process_group, cs.ledger, generator,
            contribute=not keep_residual,
        )

    def _outer_update(self, ctx: SyncContext, optimizer: Optimizer) -> None:
        """After the average: Local SGD just starts the next period from it (``x₀ ← x̄``)."""
        if self.x0 is not None:
            self.x0.copy_(flatten(self._params))

    @property
    def residual(self) -> Tensor | None:
        """The delta's error-feedback residual (a sketch's ``v``), flat over the compressed slice."""
        return self.memory.v.residuals.get(COMPRESSED)

    # -- state -------------------------------------------------------------------------------
    def _state_tensors(self) -> dict[str, Tensor | None]:
        return {"x0": self.x0, "residual": self.residual}

    def _state_extra(self) -> dict[str, Any]:
        generator = self.rng.state()
        return {} if generator is None else {"generator": generator}

    def _load_tensors(self, state: dict[str, Any], device: torch.device) -> None:
        self.x0 = state["x0"].to(device) if state.get("x0") is not None else None
        if self._keeps_reference() and self.x0 is None:
            self.x0 = flatten(self._params).to(device)
        self.memory.reset()
        if state.get("residual") is not None:
            self.memory.v.residuals[COMPRESSED] = state["residual"].to(device=device, dtype=torch.float32)
        self.rng.load(state.get("generator"))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(period={self.period}, warmup_steps={self.warmup_steps}, "
                f"compress_average={self.compress_average})")


__all__ = ["LocalSGD"]
