"""The exchange core: one flat vector in, its average over ranks out, compressed.

Every path that averages something compressed goes through here: the DDP hook (gradients),
Local SGD / SlowMo / Overlap-Local-SGD at sync points (model deltas) and backup workers
(gradients all-gathered by a communication thread). Three parts:

- :class:`ExchangeConfig`: the frozen settings (error feedback, momentum, the dense/compressed
  split, warm-up, seed, the non-finite mode), validated once;
- :class:`ExchangeMemory`: the per-rank memories, flat over the fused vector for speed, kept per
  parameter name so they survive DDP's bucket rebuild, the end of warm-up and a resume;
- :func:`compressed_average`: ``x -> average over ranks`` with the memory's algorithm (momentum
  correction / Sketched SGD accumulation, error feedback, or none), and
  :func:`encode_with_feedback`, its twin for backup workers' first-N exchange.

Helpers every path shares live here too: :func:`split_by_size` (which tensors travel dense),
:class:`RankGenerator` (the seeded per-rank rounding stream, restored exactly on resume),
:func:`flatten` and :func:`on_nonfinite` (what a NaN/Inf step does).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_compress.comm.collectives import exchange
from lightning_compress.comm.ledger import BitLedger
from lightning_compress.comm.rng import seeded_generator
from lightning_compress.compressors.base import Compressor, Payload
from lightning_compress.feedback import ErrorFeedback

log = logging.getLogger(__name__)

#: the memory key of the compressed part of the fused vector
COMPRESSED = "compressed"
#: the memory key of the part sent dense (its momentum only)
DENSE = "dense"
NONFINITE_MODES = ("skip", "raise", "ignore")

Layout = tuple[tuple[str, int], ...]
T = TypeVar("T")


# -- settings ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExchangeConfig:
    """The exchange's settings, validated once (see :class:`~lightning_compress.hooks.CompressionState`).

    Attributes:
        error_feedback: keep what the codec dropped and add it back next step (arXiv 1901.09847).
        min_compression_size: tensors with fewer elements travel dense.
        warmup_steps: exchanges sent dense before compression starts.
        momentum: momentum ``m`` applied in the exchange (arXiv 1712.01887 / 1903.04488); 0: off.
        momentum_masking: zero ``u`` where ``v`` was sent (factor masking).
        seed: rounding seed; rank ``r`` draws from ``seed + r``.
        nonfinite: ``"skip"``, ``"raise"`` or ``"ignore"``.
        accumulates: the memory is Sketched SGD's / DGC's ``v ← v + u`` (a count sketch, or
            ``momentum > 0``), rather than plain error feedback.

    """

    error_feedback: bool
    min_compression_size: int = 1024
    warmup_steps: int = 0
    momentum: float = 0.0
    momentum_masking: bool = True
    seed: int = 0
    nonfinite: str = "skip"
    accumulates: bool = False

    @classmethod
    def resolve(
        cls,
        compressor: Compressor,
        error_feedback: bool | None = None,
        min_compression_size: int = 1024,
        warmup_steps: int = 0,
        momentum: Any = 0.0,
        momentum_masking: bool = True,
        seed: int = 0,
        nonfinite: str = "skip",
        sketch_momentum: Any = None,
    ) -> ExchangeConfig:
        """Validate user settings for ``compressor`` and fill in the automatic ones.

        Raises:
            TypeError / ValueError: naming the parameter and the allowed values.

        """
        if error_feedback is not None and not isinstance(error_feedback, bool):
            raise TypeError(f"error_feedback must be True, False or None (automatic), got {error_feedback!r}")
        if (
            isinstance(min_compression_size, bool)
            or not isinstance(min_compression_size, int)
            or min_compression_size < 0
        ):
            raise ValueError(f"min_compression_size must be an integer >= 0, got {min_compression_size!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be 'skip', 'raise' or 'ignore', got {nonfinite!r}")
        momentum = resolve_momentum(compressor, momentum, sketch_momentum)
        if not isinstance(momentum_masking, bool):
            raise TypeError(f"momentum_masking must be True or False, got {momentum_masking!r}")
        sketch = compressor.exchange == "sketch"
        if momentum > 0.0 and not sketch and error_feedback is False:
            raise ValueError(
                f"momentum={momentum} (momentum correction) accumulates what was not sent, which is error "
                "feedback; error_feedback=False contradicts it: leave error_feedback unset or set momentum=0"
            )
        return cls(
            error_feedback=(not compressor.unbiased) if error_feedback is None else error_feedback,
            min_compression_size=min_compression_size,
            warmup_steps=warmup_steps,
            momentum=momentum,
            momentum_masking=momentum_masking,
            seed=int(seed),
            nonfinite=nonfinite,
            accumulates=sketch or momentum > 0.0,
        )

    @property
    def keeps_memory(self) -> bool:
        """Whether the exchange keeps per-rank memory (error feedback, momentum, a sketch's ``v``)."""
        return self.error_feedback or self.accumulates

    @property
    def checks(self) -> bool:
        """Whether non-finite values are looked for (``nonfinite`` is not ``"ignore"``)."""
        return self.nonfinite != "ignore"


def resolve_momentum(compressor: Compressor, momentum: Any, sketch_momentum: Any = None) -> float:
    """Validate ``momentum`` (and its deprecated alias ``sketch_momentum``) for ``compressor``.

    Raises:
        ValueError: naming the parameter, for a value outside [0, 1), for both names with
            different values, for ``momentum > 0`` with a codec other than Top-K or a count
            sketch, and for ``sketch_momentum > 0`` with a codec other than a count sketch.

    """
    value = _check_momentum("momentum", momentum)
    sketch = compressor.exchange == "sketch"
    if sketch_momentum is not None:
        alias = _check_momentum("sketch_momentum", sketch_momentum)
        warnings.warn(
            "sketch_momentum is deprecated: pass momentum= instead (the same Sketched SGD momentum for a "
            "CountSketch, and momentum correction for TopK)",
            FutureWarning,
            stacklevel=4,
        )
        if value and alias != value:
            raise ValueError(
                f"momentum={value} and sketch_momentum={alias} disagree; pass momentum only "
                "(sketch_momentum is its deprecated alias)"
            )
        if alias and not sketch:
            raise ValueError(
                f"sketch_momentum={alias} applies to a CountSketch only, and the compressor is "
                f"{type(compressor).__name__}; for Top-K use momentum={alias} (momentum correction), "
                "otherwise keep the optimizer's momentum"
            )
        value = value or alias
    if value and not sketch and compressor.exchange != "allgather":
        raise ValueError(
            f"momentum={value} (momentum correction, applied in the exchange) works with TopK and "
            f"CountSketch only, not {type(compressor).__name__}; set momentum=0 and keep the "
            "optimizer's own momentum"
        )
    return value


def _check_momentum(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")
    return float(value)


# -- shared helpers ------------------------------------------------------------------------------
def split_by_size(
    items: Sequence[T], numel: Callable[[T], int], min_size: int, warm: bool
) -> tuple[list[T], list[T]]:
    """``(dense, compressed)``: what travels dense (below ``min_size``, or everything when ``warm``).

    Order is kept within each part. Compressing a bias of 64 floats saves nothing and costs
    kernel launches; during warm-up every tensor travels dense.
    """
    dense = [item for item in items if warm or numel(item) < min_size]
    large = [item for item in items if not (warm or numel(item) < min_size)]
    return dense, large


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate ``tensors`` into one new flat float32 vector (empty if there are none)."""
    if not tensors:
        return torch.empty(0, dtype=torch.float32)
    return torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors])


def on_nonfinite(nonfinite: str, message: str, what_is_kept: str) -> None:
    """What a non-finite step does, decided identically on every rank (``message`` says where).

    Raises:
        FloatingPointError: with ``nonfinite="raise"``.

    """
    if nonfinite == "raise":
        raise FloatingPointError(f"{message}; set nonfinite='skip' to skip such steps instead")
    log.warning("%s: step skipped on every rank, %s", message, what_is_kept)


class RankGenerator:
    """This rank's rounding stream: ``seed + offset + rank``, on the tensors' device, resumable.

    A saved state is set again at the first draw after a resume (the device is known then), so
    a resumed run draws exactly what the uninterrupted one would have.
    """

    def __init__(self, offset: int = 0) -> None:
        self.offset = offset
        self.generator: torch.Generator | None = None
        self.restored: Tensor | None = None

    def get(self, device: torch.device, seed: int, group: dist.ProcessGroup | None) -> torch.Generator:
        if self.generator is None or self.generator.device != device:
            rank_seed = seed + self.offset + dist.get_rank(group)
            self.generator = seeded_generator(device, rank_seed, self.restored)
            self.restored = None
        return self.generator

    def state(self) -> Tensor | None:
        """The state to save (the restored one if not drawn from yet), or ``None`` before any draw."""
        return self.generator.get_state() if self.generator is not None else self.restored

    def load(self, state: Tensor | None) -> None:
        self.generator = None
        self.restored = state

    def __getstate__(self) -> dict[str, Any]:  # a generator does not cross processes
        return {"offset": self.offset, "generator": None, "restored": self.restored}


# -- per-parameter memory ------------------------------------------------------------------------
class ExchangeMemory:
    """``v`` (error-feedback residual or accumulated ``v``) and ``u`` (momentum) of one exchange.

    Both are flat float32 tensors over the fused vector (key :data:`COMPRESSED`; ``u`` also over
    the dense part, key :data:`DENSE`), for speed. Per parameter name is how they move between
    layouts (DDP's bucket rebuild, the end of warm-up, a resume) and into checkpoints; a
    parameter in neither layout now keeps its memory aside and gets it back when it returns.
    """

    KINDS = ("residuals", "momentum")

    def __init__(self) -> None:
        self.v = ErrorFeedback()
        self.u = ErrorFeedback()
        self.layout: Layout = ()
        self.dense_layout: Layout = ()
        self.orphans: dict[str, dict[str, Tensor]] = {kind: {} for kind in self.KINDS}

    def _kinds(self) -> tuple[tuple[str, ErrorFeedback], ...]:
        return (("residuals", self.v), ("momentum", self.u))

    def by_name(self) -> dict[str, dict[str, Tensor]]:
        """Every memory by kind (``"residuals"``: v, ``"momentum"``: u) and parameter name (views)."""
        pools = {kind: dict(self.orphans.get(kind, {})) for kind in self.KINDS}
        for kind, memory in self._kinds():
            for key, layout in ((COMPRESSED, self.layout), (DENSE, self.dense_layout)):
                flat = memory.residuals.get(key)
                if flat is not None and layout:
                    pools[kind].update(
                        zip([n for n, _ in layout], flat.split([m for _, m in layout]), strict=True)
                    )
        return pools

    def relayout(
        self,
        compressed: Layout,
        dense: Layout,
        device: torch.device,
        pools: dict[str, dict[str, Tensor]] | None = None,
    ) -> None:
        """Lay the memories out over new layouts (from ``pools`` by name if given, else their own)."""
        if pools is None:
            if compressed == self.layout and dense == self.dense_layout:
                return
            pools = self.by_name()
        self.layout, self.dense_layout = compressed, dense
        self.orphans = {kind: {} for kind in self.KINDS}
        for kind, memory in self._kinds():
            memory.reset()
            pool = pools.get(kind, {})
            placed: set[str] = set()
            for key, layout in ((COMPRESSED, compressed), (DENSE, dense)):
                if kind == "residuals" and key == DENSE:
                    continue  # what travels dense is sent whole: it has no v
                flat = _join(pool, layout, device, kind)
                if flat is not None:
                    memory.residuals[key] = flat
                placed.update(name for name, _ in layout)
            self.orphans[kind] = {name: t for name, t in pool.items() if name not in placed}

    def reset(self) -> None:
        self.v.reset()
        self.u.reset()
        self.layout, self.dense_layout = (), ()
        self.orphans = {kind: {} for kind in self.KINDS}

    def dense_momentum(self, grad: Tensor, momentum: float) -> Tensor:
        """``u ← m·u + g`` for the tensors sent dense (new; :meth:`keep_dense_momentum` stores it)."""
        u = self.u.residuals.get(DENSE)
        if u is None:
            return grad
        return u.mul(momentum).add_(grad)

    def keep_dense_momentum(self, u: Tensor) -> None:
        self.u.residuals[DENSE] = u


def _join(pool: dict[str, Tensor], layout: Layout, device: torch.device, kind: str) -> Tensor | None:
    """One flat float32 tensor over ``layout`` from per-name tensors (None if none is held)."""
    if not any(name in pool for name, _ in layout):
        return None  # created lazily, like ErrorFeedback's
    parts = []
    for name, numel in layout:
        t = pool.get(name)
        if t is None or t.numel() != numel:
            if t is not None:
                log.warning("lightning_compress: dropping the saved %s of %r: its size changed", kind, name)
            t = torch.zeros(numel, dtype=torch.float32, device=device)
        parts.append(t.reshape(-1).to(device=device, dtype=torch.float32))
    return torch.cat(parts)


# -- the exchange --------------------------------------------------------------------------------
def compressed_average(
    x: Tensor,
    compressor: Compressor,
    config: ExchangeConfig,
    memory: ExchangeMemory,
    group: dist.ProcessGroup | None,
    ledger: BitLedger | None,
    generator: torch.Generator | None,
    *,
    contribute: bool = True,
) -> Tensor:
    """Average flat ``x`` over ranks with ``compressor``, keeping ``memory`` as ``config`` says.

    1. With :attr:`ExchangeConfig.accumulates`: momentum correction / Sketched SGD
       (:func:`_accumulated_average`).
    2. Else with error feedback (arXiv 1901.09847, Alg. 2): ``p = x + e``; send ``C(p)``;
       ``e ← p − C(p)``.
    3. Else ``C(x)`` alone.

    Args:
        x: this rank's flat float32 contribution (a gradient, or a model delta).
        compressor: the codec; its ``exchange`` names the collective.
        config: the settings.
        memory: this exchange's memory (read and updated).
        group: the process group.
        ledger: where every collective's bytes are recorded.
        generator: this rank's rounding generator.
        contribute: ``False`` for a rank left out of this average (non-finite): it takes part in
            the same collectives with ``x`` (zeros) and leaves its memory untouched.

    Returns:
        The average over ranks (divided by the world size), identical on every rank.

    """
    if not contribute:
        return exchange(compressor, x, group, ledger, generator).average
    if config.accumulates:
        return _accumulated_average(x, compressor, config, memory, group, ledger, generator)
    if config.error_feedback:
        p = memory.v.compensate(COMPRESSED, x)
        result = exchange(compressor, p, group, ledger, generator, want_local=True)
        assert result.local is not None
        memory.v.update(COMPRESSED, p, result.local)
        return result.average
    return exchange(compressor, x, group, ledger, generator).average


def _accumulated_average(
    grad: Tensor,
    compressor: Compressor,
    config: ExchangeConfig,
    memory: ExchangeMemory,
    group: dist.ProcessGroup | None,
    ledger: BitLedger | None,
    generator: torch.Generator | None,
) -> Tensor:
    """Momentum-corrected sparse exchange: DGC (arXiv 1712.01887) and Sketched SGD (arXiv 1903.04488).

    1. ``u ← m·u + g`` (momentum correction, arXiv 1712.01887 Eq. 5; Alg. 1 line 4 of
       arXiv 1903.04488). Computed as ``(m·u) + g``, the operations of ``torch.optim.SGD``,
       so that with ``k = d`` the result is bit for bit the optimizer's momentum buffer.
    2. ``v ← v + u`` (local accumulation, arXiv 1712.01887 Eq. 6; Alg. 1 line 5).
    3. Exchange the top ``k`` of ``v`` (Top-K of this rank's ``v`` gathered from every rank,
       or the count sketch's two rounds).
    4. ``v ← v - sent`` (zero at the sent coordinates; with float16 values the rounding
       error stays in ``v``, so ``sum(sent) + v == sum(u)`` holds exactly).
    5. Factor masking (arXiv 1712.01887 Sec. 3.2; Alg. 1 line 11): ``u ← 0`` at the sent
       coordinates, when ``momentum_masking``.
    """
    m = config.momentum
    # 1. u ← m·u + g; with momentum 0 (a count sketch without momentum) u is g itself
    u = memory.u.residuals.get(COMPRESSED)
    if m == 0.0:
        u = grad.to(torch.float32)
    elif u is None:
        u = grad.to(torch.float32, copy=True)  # m·0 + g
        memory.u.residuals[COMPRESSED] = u
    else:
        u.mul_(m).add_(grad)
    # 2. v ← v + u (a new tensor: u is kept apart)
    v = memory.v.compensate(COMPRESSED, u)
    # 3.-4. exchange the top k of v, then remove what was sent from v
    sent: Tensor
    if compressor.exchange == "sketch":
        result = exchange(compressor, v, group, ledger, generator)
        assert result.applied is not None
        sent = result.applied  # the k coordinates' indices
        v.index_fill_(0, sent, 0.0)
    else:
        result = exchange(compressor, v, group, ledger, generator, want_local=True)
        assert result.local is not None
        v.sub_(result.local)
        # a selected coordinate whose v is exactly 0 carries nothing; DGC's mask |v| > thr skips it too
        sent = result.local != 0
    memory.v.residuals[COMPRESSED] = v
    # 5. factor masking: the momentum of what was just sent must not be applied again
    if config.momentum_masking and m > 0.0:
        # masked_fill_/index_fill_, not u[sent] = 0: a boolean-mask assignment syncs with the host
        if sent.dtype == torch.bool:
            u.masked_fill_(sent, 0.0)
        else:
            u.index_fill_(0, sent, 0.0)
    return result.average


def encode_with_feedback(
    x: Tensor,
    compressor: Compressor,
    config: ExchangeConfig,
    memory: ExchangeMemory,
    generator: torch.Generator | None,
    shards: tuple[int, int] | None = None,
) -> tuple[list[Payload], Callable[[], None]]:
    """Compress ``x`` for a transport other than the DDP hook's (backup workers' first-N exchange).

    Error feedback as in :func:`compressed_average`, step 2, except that ``e ← p − C(p)`` is
    returned as a commit function: the caller applies it once the step is known to be applied
    (a dropped or skipped step leaves the memory untouched).

    Args:
        x: the flat gradient to send.
        compressor: the codec.
        config: the exchange's settings (whether error feedback is on).
        memory: the error-feedback memory ``e``, laid out over ``x``.
        generator: the rounding generator.
        shards: ``None``: one payload of all of ``p``. ``(count, numel)``: ``p`` is padded with
            zeros to ``count·numel`` elements (at least ``x``'s) and each of the ``count`` shards
            is compressed on its own, in order (the first phase of a two-phase exchange sends
            shard ``r`` to rank ``r``); the residual is taken against the shards' decodings,
            trimmed to ``x``'s length.

    Returns:
        ``(payloads, commit)``: one payload, or one per shard.

    """
    p = memory.v.compensate(COMPRESSED, x) if config.error_feedback else x
    if shards is None:
        payloads = [compressor.compress(p, generator)]
    else:
        count, numel = shards
        if count * numel < p.numel():
            raise ValueError(f"shards: {count} of {numel} elements do not hold {p.numel()}")
        padded = torch.nn.functional.pad(p, (0, count * numel - p.numel()))
        payloads = [compressor.compress(shard, generator) for shard in padded.split(numel)]

    def commit() -> None:
        if config.error_feedback:
            decoded = torch.cat([compressor.decompress(q).reshape(-1).float() for q in payloads])
            memory.v.update(COMPRESSED, p, decoded[: p.numel()])

    return payloads, commit


__all__ = [
    "COMPRESSED",
    "DENSE",
    "ExchangeConfig",
    "ExchangeMemory",
    "RankGenerator",
    "compressed_average",
    "encode_with_feedback",
    "flatten",
    "on_nonfinite",
    "resolve_momentum",
    "split_by_size",
]
