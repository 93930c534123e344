"""Local SGD: local steps without communication, and a model average every ``period`` steps."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_compress.comm.collectives import exchange
from lightning_compress.comm.rng import seeded_generator
from lightning_compress.compressors.base import NoCompression
from lightning_compress.sync.averaging import (
    PeriodicAveraging,
    allreduce_average_,
    allreduce_average_checked_,
    flatten,
    reset_optimizer_state,
    write_flat_,
)

if TYPE_CHECKING:
    from torch.optim import Optimizer

    from lightning_compress.hooks import CompressionState
    from lightning_compress.strategy import CompressedDDP

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
        if compress_average is not None and not isinstance(compress_average, bool):
            raise TypeError(
                f"compress_average must be True, False or None (automatic), got {compress_average!r}"
            )
        self.compress_average = compress_average
        self._compress = False
        self._n_large = 0  # elements of the compressed (leading) parameters in the flat layout
        self._k_large = 0  # how many parameters that is
        self.x0: Tensor | None = None
        self.residual: Tensor | None = None
        self._generator: torch.Generator | None = None
        self._generator_state: Tensor | None = None
        self._n_left_out = 0  # ranks left out of the last average (non-finite), identical on every rank
        self._left_out = False  # whether this rank was one of them

    # -- what is averaged, and how -----------------------------------------------------------
    def _uses_compression(self, strategy: CompressedDDP) -> bool:
        if self.compress_average is None:
            return not isinstance(strategy.comm_state.compressor, NoCompression)
        return self.compress_average

    def _keeps_reference(self) -> bool:
        """Whether ``x₀`` (the model at the last sync point) is kept."""
        return self._compress

    def _order(self, named: list[tuple[str, Tensor]], strategy: CompressedDDP) -> list[tuple[str, Tensor]]:
        self._compress = self._uses_compression(strategy)
        if not self._compress:
            self._n_large = 0
            return named
        # the compressed tensors first, so they are one leading slice of every flat vector
        limit = strategy.comm_state.min_compression_size
        large = [(n, p) for n, p in named if p.numel() >= limit]
        small = [(n, p) for n, p in named if p.numel() < limit]
        self._n_large = sum(p.numel() for _, p in large)
        self._k_large = len(large)
        return large + small

    def _init_state(self, strategy: CompressedDDP) -> None:
        self.x0 = flatten(self._params).to(self._device) if self._keeps_reference() else None
        self.residual = None  # a fresh local phase: nothing owed from a previous one

    def _synchronize(self, strategy: CompressedDDP, optimizer: Optimizer, step: int) -> None:
        log.debug(f"{type(self).__name__}: sync point after optimizer step {step}")
        left_out = self._left_out = self._average(strategy, step)
        if left_out and not self._averages_optimizer_state():
            reset_optimizer_state(strategy.optimizers or [optimizer], self._params)
        self._outer_update(strategy, optimizer)

    def _averages_optimizer_state(self) -> bool:
        """Whether :meth:`_outer_update` gives a left-out rank the others' optimizer state."""
        return False

    @torch.no_grad()
    def _average(self, strategy: CompressedDDP, step: int) -> bool:
        """Replace every rank's model by the (exact or compressed) average over ranks.

        Returns whether this rank was left out of it (non-finite, see the class docstring).
        """
        cs = strategy.comm_state
        check = cs.nonfinite != "ignore"
        self._n_left_out = 0
        if not self._compress:
            # 3.1: one collective for every parameter and buffer
            tensors = self._params + self._buffers
            if not check:
                allreduce_average_(tensors, cs.process_group, cs.ledger)
                return False
            n_bad, mine = allreduce_average_checked_(
                tensors, cs.process_group, cs.ledger, self._device, self._contribution_flag(strategy)
            )
            self._on_left_out(strategy, step, n_bad, mine)
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
            flag = self._contribution_flag(strategy, [delta] if delta is not None else [])
            n_bad, mine = allreduce_average_checked_(dense, cs.process_group, cs.ledger, self._device, flag)
            self._on_left_out(strategy, step, n_bad, mine)
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
        generator = self._rng(cs, delta.device)
        if keep_residual:
            # left out of this average: the same collectives, with zeros, and the residual untouched
            return exchange(cs.compressor, delta, cs.process_group, cs.ledger, generator).average
        if cs.uses_sketch:
            # Sketched SGD (arXiv 1903.04488) keeps what was not applied, whatever error_feedback says
            p = delta if self.residual is None else delta + self.residual
            result = exchange(cs.compressor, p, cs.process_group, cs.ledger, generator)
            p[result.applied] = 0.0
            self.residual = p
            return result.average
        if cs.error_feedback:
            # error feedback (arXiv 1901.09847): p = Δ + e; send C(p); e ← p − C(p)
            p = delta if self.residual is None else delta + self.residual
            result = exchange(cs.compressor, p, cs.process_group, cs.ledger, generator, want_local=True)
            assert result.local is not None
            self.residual = p - result.local
            return result.average
        return exchange(cs.compressor, delta, cs.process_group, cs.ledger, generator).average

    def _outer_update(self, strategy: CompressedDDP, optimizer: Optimizer) -> None:
        """After the average: Local SGD just starts the next period from it (``x₀ ← x̄``)."""
        if self.x0 is not None:
            self.x0.copy_(flatten(self._params))

    def _rng(self, cs: CompressionState, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            seed = cs.seed + _SEED_OFFSET + dist.get_rank(cs.process_group)
            self._generator = seeded_generator(device, seed, self._generator_state)
            self._generator_state = None
        return self._generator

    # -- state -------------------------------------------------------------------------------
    def _state_tensors(self) -> dict[str, Tensor | None]:
        return {"x0": self.x0, "residual": self.residual}

    def _state_extra(self) -> dict[str, Any]:
        if self._generator is not None:
            return {"generator": self._generator.get_state()}
        if self._generator_state is not None:  # restored, not drawn from yet
            return {"generator": self._generator_state}
        return {}

    def _load_tensors(self, state: dict[str, Any], device: torch.device) -> None:
        self.x0 = state["x0"].to(device) if state.get("x0") is not None else None
        if self._keeps_reference() and self.x0 is None:
            self.x0 = flatten(self._params).to(device)
        self.residual = state["residual"].to(device) if state.get("residual") is not None else None
        self._generator = None
        self._generator_state = state.get("generator")

    def __getstate__(self) -> dict[str, Any]:
        d = super().__getstate__()
        d["_generator"] = None
        return d

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(period={self.period}, warmup_steps={self.warmup_steps}, "
                f"compress_average={self.compress_average})")


__all__ = ["LocalSGD"]
