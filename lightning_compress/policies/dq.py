"""DQ-SGD: the bit width of each step from the gradient norm, under a mean-bits budget."""

from __future__ import annotations

import math
from numbers import Integral, Real

from lightning_compress.compressors.base import Compressor
from lightning_compress.policies.base import CompressionPolicy, round_half_up, usable_norm

_VARIANTS = ("nonconvex", "strongly_convex")


class DQPolicy(CompressionPolicy):
    """Dynamic bit width of QSGD (DQ-SGD; Yan, Huang, Lan, Song, arXiv 2107.14575).

    Before every compressed exchange the bit width is chosen from the norm of the previous
    step's averaged gradient ``||g_n||`` (identical on every rank, so every rank picks the same
    width without an extra collective):

    - ``variant="nonconvex"`` (the paper's rule for non-convex losses):
      ``B_n = log2(t·||g_n|| + 1) + 1``, i.e. ``s_n = t·||g_n||`` quantization levels: more bits
      when the gradient is large.
    - ``variant="strongly_convex"``: ``s_n = k·α^((N−n)/2)·||g_n||``, ``B_n = log2(s_n + 1) + 1``:
      the same, plus a factor that grows with the step ``n``, so late steps (whose noise the
      contraction of a strongly convex loss no longer averages away) get more bits.

    ``B_n`` is rounded half-up and clamped to ``[min_bits, max_bits]``. The paper derives ``t``
    (``k``) offline from a communication budget; here it is solved online (see
    :mod:`lightning_compress.policies.base`): each step ``t`` is set so that a step with the usual
    norm (a moving average of ``log2 ||g||``) gets the per-step budget ``D_n``, where ``D_n`` is
    ``mean_bits`` minus ``gain`` times the bits overspent so far. Steps with a larger norm than
    usual therefore get more bits, smaller ones fewer, and the mean over the run meets
    ``mean_bits``. For the strongly convex variant ``D_n`` follows the ramp that ``α^((N−n)/2)``
    produces, ``mean_bits + ½·log2(1/α)·(n − (N−1)/2)``, whose mean over the ``N`` steps is
    ``mean_bits``; the constant ``α^(N/2)`` is absorbed into the solved ``k``.

    What is budgeted: ``mean_bits`` is the mean *code* width ``B`` (QSGD's ``bits``) over the
    steps that exchange compressed gradients: the number to compare with a fixed ``QSGD(bits=B)``.
    The bits per coordinate on the wire (``comm/bits_per_coord``) add QSGD's scales
    (``32/bucket_size`` bits per compressed coordinate, 0.0625 at 512), the padding of the last
    shard, and 32 bits for every coordinate of the tensors sent dense (below
    ``min_compression_size``). Warm-up steps and local (non-communicating) steps are not counted.

    Before the first exchange there is no norm: the first step uses ``round(mean_bits)``.

    Args:
        mean_bits: the budget, mean bits per compressed coordinate over the run, within
            ``[min_bits, max_bits]``. Fewer bits send fewer bytes and add variance (about 4x per bit
            removed); 3-6 is the useful range, 4 (8x fewer bytes than float32) a common choice.
            Fractional budgets are met by alternating widths.
        min_bits: smallest width, >= 1 (1 is QSGD's scaled sign). Raise it if low-norm steps
            lose accuracy; default 2.
        max_bits: largest width, <= 8. Lower it to cap the bytes of large-gradient steps; default 8.
        variant: ``"nonconvex"`` (default; deep networks) or ``"strongly_convex"``.
        alpha: the strongly convex variant's contraction factor ``α`` in (0, 1): the per-step
            budget rises by ``½·log2(1/α)`` bits per step. Closer to 1 spreads bits more evenly.
            Keep ``N·½·log2(1/α)`` below ``max_bits − min_bits``, or the ends of the ramp are
            clamped. ``None`` (default) picks ``α`` so that the ramp spans half the room between
            ``mean_bits`` and the nearer bound, on either side.
        total_steps: ``N`` for the strongly convex variant; ``None`` takes the Trainer's
            ``estimated_stepping_batches``. Unused by the non-convex rule.
        gain: how fast overspent bits are paid back (per-step budget change per bit of excess).
            Larger holds the running mean closer to ``mean_bits`` at every moment, smaller lets
            the norm steer the width more; 0.05-0.3, default 0.1.
        norm_decay: decay of the moving average that defines the usual norm; default 0.9.

    Example::

        CommunicationMonitor(policy=DQPolicy(mean_bits=4.0, min_bits=2, max_bits=8))

    """

    setting = "bits"
    metric = "comm/bit_width"

    def __init__(
        self,
        mean_bits: float = 4.0,
        min_bits: int = 2,
        max_bits: int = 8,
        variant: str = "nonconvex",
        alpha: float | None = None,
        total_steps: int | None = None,
        gain: float = 0.1,
        norm_decay: float = 0.9,
    ) -> None:
        super().__init__(gain, norm_decay)
        for name, v in (("min_bits", min_bits), ("max_bits", max_bits)):
            if isinstance(v, bool) or not isinstance(v, Integral) or not 1 <= int(v) <= 8:
                raise ValueError(f"{name} must be an integer in 1..8, got {v!r}")
        if min_bits > max_bits:
            raise ValueError(f"min_bits must be <= max_bits, got min_bits={min_bits}, max_bits={max_bits}")
        number = not isinstance(mean_bits, bool) and isinstance(mean_bits, Real)
        if not number or not min_bits <= mean_bits <= max_bits:
            allowed = f"[min_bits, max_bits] = [{min_bits}, {max_bits}]"
            raise ValueError(f"mean_bits must be a number in {allowed}, got {mean_bits!r}")
        if variant not in _VARIANTS:
            raise ValueError(f"variant must be one of {_VARIANTS}, got {variant!r}")
        if alpha is not None and (
            isinstance(alpha, bool) or not isinstance(alpha, Real) or not 0.0 < float(alpha) < 1.0
        ):
            raise ValueError(f"alpha must be a float in (0, 1) or None (automatic), got {alpha!r}")
        if total_steps is not None and (
            isinstance(total_steps, bool) or not isinstance(total_steps, Integral) or total_steps < 1
        ):
            raise ValueError(f"total_steps must be an integer >= 1 or None (Trainer's), got {total_steps!r}")
        self.mean_bits = float(mean_bits)
        self.min_bits = int(min_bits)
        self.max_bits = int(max_bits)
        self.variant = variant
        self.alpha = None if alpha is None else float(alpha)
        self.total_steps = None if total_steps is None else int(total_steps)
        self._horizon: int | None = None
        self._rate = 0.0  # bits per step of the strongly convex ramp, ½·log2(1/α)

    def __repr__(self) -> str:
        return (
            f"DQPolicy(mean_bits={self.mean_bits}, min_bits={self.min_bits}, max_bits={self.max_bits}, "
            f"variant={self.variant!r})"
        )

    # -- wiring ------------------------------------------------------------------------------
    def default_compressor(self) -> Compressor:
        from lightning_compress.compressors import QSGD

        return QSGD(bits=self.clamp(round_half_up(self.mean_bits)))

    def check_compressor(self, compressor: Compressor) -> None:
        if not hasattr(compressor, "bits"):
            raise TypeError(
                f"DQPolicy sets a bit width, but the compressor {compressor!r} has none; use QSGD "
                "(e.g. CompressedDDP(compressor=QSGD(bits=4))) or AdaptiveTopKPolicy for Top-K"
            )

    @property
    def needs_total_steps(self) -> bool:
        return self.variant == "strongly_convex" and self.total_steps is None

    def setup(self, numel: int, total_steps: float | None = None) -> None:
        super().setup(numel, total_steps)
        if self.variant != "strongly_convex":
            return
        n = self.total_steps if self.total_steps is not None else total_steps
        if n is None or not math.isfinite(n) or n < 1:
            raise ValueError(
                "DQPolicy(variant='strongly_convex') needs the run length N: set max_steps or max_epochs "
                f"on the Trainer, or pass total_steps= (got {n!r})"
            )
        self._horizon = int(n)
        if self.alpha is None:
            half_span = min(self.mean_bits - self.min_bits, self.max_bits - self.mean_bits) / 2
            self._rate = 2 * half_span / self._horizon
        else:
            self._rate = 0.5 * math.log2(1.0 / self.alpha)

    @property
    def resolved_alpha(self) -> float | None:
        """The ``α`` in use (the automatic one once :meth:`setup` ran), ``None`` if not strongly convex."""
        if self.variant != "strongly_convex" or self._horizon is None:
            return None
        return self.alpha if self.alpha is not None else 2.0 ** (-2 * self._rate)

    # -- the rule ----------------------------------------------------------------------------
    def clamp(self, bits: int) -> int:
        return min(self.max_bits, max(self.min_bits, bits))

    def bits_for(self, grad_norm: float, t: float) -> int:
        """``clamp(round(log2(t·||g|| + 1) + 1))`` (arXiv 2107.14575): non-decreasing in the norm."""
        s = t * grad_norm  # quantization levels s_n
        raw = math.log2(s + 1.0) + 1.0 if math.isfinite(s) else math.inf
        return self.max_bits if raw == math.inf else self.clamp(round_half_up(raw))

    def target(self, step: int) -> float:
        """Return the per-step budget before correction: ``mean_bits``, or the strongly convex ramp."""
        if self.variant != "strongly_convex":
            return self.mean_bits
        if self._horizon is None:
            raise RuntimeError("DQPolicy(variant='strongly_convex'): call setup() before decide()")
        n = min(max(step, 0), self._horizon - 1)
        # log2 of α^((N−n)/2) grows by ½·log2(1/α) per step; centred so the ramp's mean is mean_bits
        return self.mean_bits + self._rate * (n - (self._horizon - 1) / 2)

    def decide(self, grad_norm: float | None, step: int = 0) -> int:
        budget = self.budget
        target = self.target(step)
        # the bits a step with the usual norm should get now: the budget minus what was overspent
        desired = min(max(target - budget.gain * budget.excess, 1.0), self.max_bits + 1.0)
        g = usable_norm(grad_norm)
        first = g is not None and budget.log2_ref is None
        if first:
            budget.observe_norm(g)
        if g is None or budget.log2_ref is None:
            self.t = None
            bits = self.clamp(round_half_up(desired))
        else:
            # t such that log2(t·ḡ + 1) + 1 = desired, ḡ = 2^log2_ref the usual norm
            self.t = (2.0 ** (desired - 1.0) - 1.0) / 2.0**budget.log2_ref
            bits = self.bits_for(g, self.t)
        budget.spend(bits, target)
        if not first:
            budget.observe_norm(g)
        self.value = bits
        return bits



__all__ = ["DQPolicy"]
