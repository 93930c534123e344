"""DQ-SGD: the bit width of each step from the gradient norm (Yan, Huang, Lan, Song, arXiv 2107.14575)."""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

from lightning_compress.compressors.base import Compressor
from lightning_compress.policies.base import CompressionPolicy, round_half_up, usable_norm
from lightning_compress.policies.forecast import LogNormTrend, check_fallback_horizon, receding_end

_VARIANTS = ("nonconvex", "strongly_convex")
_SAMPLES = 32  # points at which the rest of the run is forecast


def _width(log2_s: float, lo: float, hi: float) -> float:
    """Continuous width ``log2(s + 1) + 1`` of ``s = 2**log2_s`` levels, clamped to ``[lo, hi]``."""
    if log2_s > 60:
        return hi
    return min(hi, max(lo, math.log2(2.0**log2_s + 1.0) + 1.0))


class DQPolicy(CompressionPolicy):
    """Dynamic bit width of QSGD (DQ-SGD; Yan, Huang, Lan, Song, arXiv 2107.14575).

    DQ-SGD minimises communication under a bound on the convergence error. For non-convex
    losses the optimal number of quantization levels of step ``n`` is proportional to that step's
    gradient norm, with **one constant** ``t`` for the whole run:
    ``s_n = t·||g_n||``, ``B_n = log2(s_n + 1) + 1`` bits. Each step then adds the same
    quantization variance (QSGD, arXiv 1610.02132, Lemma 3.1: ``E||Q(g)-g||² <= b/s²·||g||²`` for
    buckets of ``b`` entries, so ``b/t²`` whatever the norm), and the width **falls as the
    gradient shrinks** during training (many bits early, few late) and rises when it grows. For
    strongly convex losses, ``s_n = k·α^((N-n)/2)·||g_n||``: later steps weigh more.

    ``||g_n||`` is this step's pre-quantization gradient norm reduced across ranks (see
    :mod:`lightning_compress.policies.base`): every rank computes the same width. The width is
    rounded half-up and clamped to ``[min_bits, max_bits]``.

    Two ways to fix ``t``:

    - **Error bound** (``max_variance=ε``, the paper's constraint form): ``t = sqrt(b/ε)``, the
      fewest levels whose added variance per step is at most ``ε`` (in squared gradient units),
      constant for the run. No budget: the run spends what the bound needs.
    - **Communication budget** (``mean_bits=m``, default 4): the paper sets ``t`` offline so the
      run's bits meet the budget. Online the rest of the run is unknown, so every step ``t`` is
      re-solved such that the bits spent so far plus the widths forecast for the remaining
      ``N - n`` steps at that ``t`` add up to ``m·N`` (``N``: the run length). The forecast of
      ``log2 ||g||`` is a straight line fitted over the last ``trend_window`` share of the run
      (weighted least squares; flat while the slope is within one standard error of 0), never
      rising: gradients shrink over training, and a rise is followed as a new level instead of
      being extrapolated (:class:`~lightning_compress.policies.forecast.LogNormTrend`, shared
      with adaptive Top-K). While the forecast holds, ``t`` stays
      constant (the paper's rule); when it errs, ``t`` moves by what the *whole rest of the run*
      needs, not what one step needs. Re-solving ``t`` against a short moving average of the norm
      instead, as this package did before, cancels the trend and degenerates into fixed-width
      QSGD (measured on digits: 4.05 / 3.89 / 4.02 / 4.02 bits by quarter while the loss fell
      100x).

    What is budgeted: ``mean_bits`` is the mean *code* width ``B`` (QSGD's ``bits``) over the
    exchanges that go through the codec (warm-up and local steps are not counted): the number to
    compare with a fixed ``QSGD(bits=B)``. ``comm/bits_per_coord`` adds QSGD's scales and the
    tensors sent dense.

    Args:
        mean_bits: the budget form's mean width over the run, within ``[min_bits, max_bits]``.
            Fewer bits send fewer bytes and add variance (about 4x per bit removed); 3-6 is the
            useful range. ``None`` (default): 4.0, unless ``max_variance`` is given.
        min_bits: smallest width, >= 1 (1 is QSGD's scaled sign). Raise it if late, low-norm steps
            lose accuracy; default 2.
        max_bits: largest width, <= 8; default 8.
        variant: ``"nonconvex"`` (default; deep networks) or ``"strongly_convex"`` (budget form).
        alpha: the strongly convex contraction ``α`` in (0, 1): ``log2 s`` rises by
            ``½·log2(1/α)`` per step. ``None`` (default) picks ``α`` so that the ramp spans half
            the room between ``mean_bits`` and the nearer bound.
        total_steps: the run length ``N`` in optimizer steps; ``None`` takes the Trainer's
            ``estimated_stepping_batches``.
        max_variance: the error-bound form's ``ε`` > 0: the quantization variance added per step
            (``t = sqrt(bucket_size/ε)``). Smaller is more accurate and costs more bits.
            Exclusive with ``mean_bits``; non-convex only.
        trend_window: the share of the run (so far) over which the norm's trend is fitted, in
            (0, 1]; default 0.25. Smaller follows changes of regime sooner and is noisier.
        fallback_horizon: exchanges the budget form plans ahead when the run length is unknown
            (``inf``: an iterable dataset without ``max_steps``) or already passed, >= 1; the
            budget then holds over windows of about that length. Default 1000.

    Example::

        CommunicationMonitor(policy=DQPolicy(mean_bits=4.0, min_bits=2, max_bits=8))

    """

    setting = "bits"
    metric = "comm/bit_width"

    def __init__(
        self,
        mean_bits: float | None = None,
        min_bits: int = 2,
        max_bits: int = 8,
        variant: str = "nonconvex",
        alpha: float | None = None,
        total_steps: int | None = None,
        max_variance: float | None = None,
        trend_window: float = 0.25,
        fallback_horizon: int = 1000,
    ) -> None:
        super().__init__()
        for name, v in (("min_bits", min_bits), ("max_bits", max_bits)):
            if isinstance(v, bool) or not isinstance(v, Integral) or not 1 <= int(v) <= 8:
                raise ValueError(f"{name} must be an integer in 1..8, got {v!r}")
        if min_bits > max_bits:
            raise ValueError(f"min_bits must be <= max_bits, got min_bits={min_bits}, max_bits={max_bits}")
        if max_variance is not None:
            if isinstance(max_variance, bool) or not isinstance(max_variance, Real) or not max_variance > 0:
                raise ValueError(f"max_variance must be a number > 0 or None, got {max_variance!r}")
            if mean_bits is not None:
                raise ValueError(
                    "DQPolicy takes mean_bits (a budget) or max_variance (an error bound), not both; got "
                    f"mean_bits={mean_bits!r}, max_variance={max_variance!r}"
                )
            if variant != "nonconvex":
                raise ValueError("max_variance is the non-convex error-bound form; use variant='nonconvex'")
        elif mean_bits is None:
            mean_bits = 4.0
        number = not isinstance(mean_bits, bool) and isinstance(mean_bits, Real)
        if mean_bits is not None and (not number or not min_bits <= mean_bits <= max_bits):
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
        window_ok = not isinstance(trend_window, bool) and isinstance(trend_window, Real)
        if not window_ok or not 0.0 < float(trend_window) <= 1.0:
            raise ValueError(f"trend_window must be a float in (0, 1], got {trend_window!r}")
        self.mean_bits = None if mean_bits is None else float(mean_bits)
        self.min_bits = int(min_bits)
        self.max_bits = int(max_bits)
        self.variant = variant
        self.alpha = None if alpha is None else float(alpha)
        self.total_steps = None if total_steps is None else int(total_steps)
        self.max_variance = None if max_variance is None else float(max_variance)
        self.trend_window = float(trend_window)
        self.fallback_horizon = check_fallback_horizon(fallback_horizon)
        self._horizon: float = math.inf  # N, set by setup()
        self._rate = 0.0  # strongly convex: log2 s rises by this many bits per step, ½·log2(1/α)
        self._bucket_size: int | None = None
        #: the scale ``t`` of the last decision (``None`` when it had no usable norm)
        self.t: float | None = None
        self.count = 0  # decisions so far
        self.spent = 0.0  # bits decided so far
        # the whole rest of the run: the paper's t is one constant, set by all the norms to come
        self._trend = LogNormTrend(window_fraction=self.trend_window, min_window=4.0, reach=math.inf)

    def __repr__(self) -> str:
        form = f"max_variance={self.max_variance}"
        if self.mean_bits is not None:
            form = f"mean_bits={self.mean_bits}"
        bounds = f"min_bits={self.min_bits}, max_bits={self.max_bits}"
        return f"DQPolicy({form}, {bounds}, variant={self.variant!r})"

    # -- wiring ------------------------------------------------------------------------------
    def default_compressor(self) -> Compressor:
        from lightning_compress.compressors import QSGD

        bits = self.mean_bits if self.mean_bits is not None else self.max_bits
        return QSGD(bits=self.clamp(round_half_up(bits)))

    def check_compressor(self, compressor: Compressor) -> None:
        if not hasattr(compressor, "bits"):
            raise TypeError(
                f"DQPolicy sets a bit width, but the compressor {compressor!r} has none; use QSGD "
                "(e.g. CompressedDDP(compressor=QSGD(bits=4))) or AdaptiveTopKPolicy for Top-K"
            )
        # the error-bound form's t = sqrt(b/ε) needs the codec's bucket length b
        self._bucket_size = int(getattr(compressor, "bucket_size", 0) or 0) or None

    @property
    def needs_total_steps(self) -> bool:
        return self.mean_bits is not None and self.total_steps is None

    def setup(self, numel: int, total_steps: float | None = None) -> None:
        super().setup(numel, total_steps)
        n = self.total_steps if self.total_steps is not None else total_steps
        self._horizon = float(n) if n is not None and math.isfinite(n) and n >= 1 else math.inf
        if self.variant != "strongly_convex":
            return
        if not math.isfinite(self._horizon):
            raise ValueError(
                "DQPolicy(variant='strongly_convex') needs the run length N: set max_steps or max_epochs "
                f"on the Trainer, or pass total_steps= (got {n!r})"
            )
        if self.alpha is None:
            assert self.mean_bits is not None
            half_span = min(self.mean_bits - self.min_bits, self.max_bits - self.mean_bits) / 2
            self._rate = 2 * half_span / self._horizon
        else:
            self._rate = 0.5 * math.log2(1.0 / self.alpha)

    @property
    def resolved_alpha(self) -> float | None:
        """The ``α`` in use (the automatic one once :meth:`setup` ran), ``None`` if not strongly convex."""
        if self.variant != "strongly_convex" or not math.isfinite(self._horizon):
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

    def _ramp(self, step: float) -> float:
        """``log2 α^((N-n)/2)`` of the strongly convex rule, relative to the last step (0 otherwise)."""
        if self.variant != "strongly_convex":
            return 0.0
        return -self._rate * (self._horizon - 1 - min(max(step, 0.0), self._horizon - 1))

    def error_bound_t(self) -> float:
        """``t = sqrt(b/ε)`` of the error-bound form (``b``: the codec's bucket length)."""
        if self.max_variance is None:
            raise RuntimeError("error_bound_t() is for DQPolicy(max_variance=...)")
        if self._bucket_size is None:
            raise RuntimeError("DQPolicy(max_variance=...) needs the codec's bucket_size: wire it to a QSGD")
        return math.sqrt(self._bucket_size / self.max_variance)

    def decide(self, grad_norm: float | None, step: int = 0) -> int:
        g = usable_norm(grad_norm)
        if self.mean_bits is None:  # error-bound form: one t for the run
            self.t = self.error_bound_t()
            # rounded up: the fewest levels s >= t·||g|| whose variance meets the bound
            bits = self.max_bits if g is None else self.clamp(math.ceil(math.log2(self.t * g + 1.0) + 1.0))
        else:
            bits = self._budget_decision(g, step)
        self.count += 1
        self.spent += bits
        self.value = bits
        return bits

    def _budget_decision(self, g: float | None, step: int) -> int:
        assert self.mean_bits is not None
        # exchanges after this one: to the end of the run, or a receding horizon once it is unknown
        remaining = receding_end(step, self._horizon, self.fallback_horizon) - 1 - step
        # bits left for this step and the rest, so that the run's mean is mean_bits
        target = self.mean_bits * (self.count + 1 + remaining) - self.spent
        if g is None:
            self.t = None
            return self.clamp(round_half_up(target / (1 + remaining)))
        log2_g = math.log2(g)
        self._trend.observe(float(step), log2_g)
        forecast = self._trend.forecaster()  # log2 ||g|| ahead: falling-only (see the class docstring)
        lo, hi = float(self.min_bits), float(self.max_bits)
        # forecast log2 ||g_j|| (plus the strongly convex ramp) at sample points of the rest of the run
        samples = min(_SAMPLES, math.ceil(remaining))
        weight = remaining / samples if samples else 0.0
        future = [
            forecast(ahead) + self._ramp(step + ahead)
            for ahead in ((i + 0.5) * weight for i in range(samples))
        ]
        now = log2_g + self._ramp(step)

        def spend(log2_t: float) -> float:
            return _width(log2_t + now, lo, hi) + weight * sum(_width(log2_t + f, lo, hi) for f in future)

        # the constant t of the paper's rule that spends exactly the budget left (monotone: bisect)
        a, b = -80.0, 80.0
        if spend(a) >= target:
            b = a
        elif spend(b) <= target:
            a = b
        for _ in range(40):
            if b - a < 1e-3:
                break
            mid = 0.5 * (a + b)
            if spend(mid) < target:
                a = mid
            else:
                b = mid
        log2_t = 0.5 * (a + b)
        self.t = 2.0**log2_t
        return self.bits_for(2.0**now, self.t)

    @property
    def mean(self) -> float | None:
        return self.spent / self.count if self.count else None

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 2,
            "count": self.count,
            "spent": self.spent,
            "trend": self._trend.state(),
            "value": self.value,
            "t": self.t,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"count", "spent", "trend"} - set(state)
        if missing:
            raise ValueError(f"DQPolicy state is missing {sorted(missing)}; was it saved by this version?")
        self.count = int(state["count"])
        self.spent = float(state["spent"])
        self._trend.load(state["trend"])
        self.value = state.get("value")
        self.t = state.get("t")


__all__ = ["DQPolicy"]
