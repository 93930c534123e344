"""Adaptive Top-K: ``K`` of each exchange minimising the error bound of Top-K with error feedback.

After Ruan, Yan, Xiao, Song, Xu, "Adaptive Top-K in SGD for Communication-Efficient Distributed
Learning", arXiv 2210.13532. The paper's closed form was not available to us; the rule below is
our own solution of the problem the paper poses (minimise the convergence-error bound of Top-K
SGD with error compensation under a communication budget over the run). The derivation, its
assumptions and a measured trace are in ``docs/adaptive_topk.md``; the equation numbers below
(P), (1)-(5) refer to that document, not to the paper.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Real
from typing import Any

from lightning_compress.compressors.base import Compressor
from lightning_compress.policies.base import CompressionPolicy, round_half_up, usable_norm
from lightning_compress.policies.forecast import LogNormTrend, check_fallback_horizon, receding_end

#: future exchanges are summed exactly up to this many, beyond it in as many equal blocks
_FORECAST_NODES = 64
_SCHEDULES = ("constant", "cosine")


def _check_ratio(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name} must be a float in (0, 1], got {value!r}")
    return float(value)


def kkt_ratio(b: float) -> float:
    """Unclamped minimiser ``δ`` of ``a·(1−δ)/δ² + λ·δ`` for ``b = a/λ`` (docs eq. (3)).

    Stationarity ``a·(2−δ)/δ³ = λ`` is the cubic ``δ³ + b·δ − 2b = 0``, which has exactly one
    positive root, in ``(0, 2)``, increasing in ``b``. Cardano's formula in a cancellation-free
    form (``u·v = b/3`` for the two cube roots): ``δ = u − b/(3u)``, ``u = ∛(b + √(b² + b³/27))``.
    For small ``b`` it is ``(2b)^(1/3)``: ``K`` grows as the cube root of the error weight.
    """
    if not b > 0.0:
        return 0.0
    u = (b + math.sqrt(b * b + b * b * b / 27.0)) ** (1.0 / 3.0)
    return u - b / (3.0 * u)


def _kkt_slope(b: float, delta: float) -> float:
    """``dδ/db`` on the root of ``δ³ + bδ − 2b = 0``: ``(2 − δ)/(3δ² + b)`` (implicit derivative)."""
    return (2.0 - delta) / (3.0 * delta * delta + b)


def clamped_ratio(log_b: float, lo: float, hi: float) -> float:
    """``clip(kkt_ratio(b), lo, hi)`` from ``log b`` (the clamps tested in log space: no overflow)."""
    if log_b >= math.log(hi**3 / (2.0 - hi)):  # kkt_ratio(b) >= hi there (kkt_ratio increases)
        return hi
    if log_b <= math.log(lo**3 / (2.0 - lo)):
        return lo
    return min(hi, max(lo, kkt_ratio(math.exp(log_b))))


def solve_multiplier(
    log_weights: list[float], counts: list[float], budget: float, lo: float, hi: float
) -> float | None:
    """``log λ`` meeting ``Σ counts_i · clip(δ(a_i/λ), lo, hi) = budget`` (docs eq. (4)).

    Node ``i`` stands for ``counts_i`` exchanges of error weight ``a_i = exp(log_weights_i)``
    (``-inf``: weight 0, which keeps ``lo``). Returns ``None`` when no ``λ`` is needed: the budget
    is at or beyond what all-``lo`` or all-``hi`` spends (the caller then clamps), or every weight
    is 0 (nothing to trade).
    """
    total = sum(counts)
    active = [(lw, c) for lw, c in zip(log_weights, counts, strict=True) if lw > -math.inf]
    if budget <= total * lo or budget >= total * hi or not active:
        return None
    log_b_lo = math.log(lo**3 / (2.0 - lo))  # δ(b) = lo at b_lo, = hi at b_hi: outside, the node is clamped
    log_b_hi = math.log(hi**3 / (2.0 - hi))
    fixed = (total - sum(c for _, c in active)) * lo
    left = min(lw for lw, _ in active) - log_b_hi  # at or below: every node at hi
    right = max(lw for lw, _ in active) - log_b_lo  # at or above: every node at lo

    def excess(x: float) -> tuple[float, float]:
        spend, slope = fixed, 0.0
        for lw, c in active:
            log_b = lw - x
            if log_b >= log_b_hi:
                spend += c * hi
            elif log_b <= log_b_lo:
                spend += c * lo
            else:
                b = math.exp(log_b)
                delta = kkt_ratio(b)
                spend += c * delta
                slope -= c * b * _kkt_slope(b, delta)  # d spend / d log λ, < 0
        return spend - budget, slope

    # safeguarded Newton on log λ: spend is continuous and decreasing, so the bracket holds the root
    x = 0.5 * (left + right)
    for _ in range(100):
        f, df = excess(x)
        if f > 0.0:
            left = x
        else:
            right = x
        if abs(f) <= 1e-12 * budget or right - left <= 1e-13 * max(1.0, abs(x)):
            break
        step = x - f / df if df < 0.0 else math.nan
        x = step if left < step < right else 0.5 * (left + right)
    return x


class AdaptiveTopKPolicy(CompressionPolicy):
    """Adaptive ``K`` of Top-K with error feedback (after Ruan et al., arXiv 2210.13532).

    Per exchange ``n`` the kept fraction ``δ_n = K_n/d`` solves our problem (P) (docs, after the
    paper's: Top-K with error compensation, learning-rate weights, a budget over the run)::

        minimise  Σ_n η_n³·||g_n||²·(1 − δ_n)/δ_n²
        s.t.      Σ_n δ_n = mean_ratio·N,   min_ratio ≤ δ_n ≤ max_ratio

    The weight ``(1−δ)/δ²·η²·||g||²`` is the error-feedback memory's bound (Karimireddy et al.,
    arXiv 1901.09847, Lemma 3, from the Top-K contraction ``||x − top_K(x)||² ≤ (1 − K/d)·||x||²``),
    and ``η_n`` weights it in the non-convex bound on ``Σ η_n·||∇f(x_n)||²``. Its KKT solution is

        ``δ_n = clip(root of δ³ + b_n·δ − 2·b_n, min_ratio, max_ratio)``,  ``b_n = η_n³·||g_n||²/λ``

    (``≈ (2·b_n)^(1/3)``: ``K`` proportional to ``η_n·||g_n||^(2/3)`` while unclamped), with one
    multiplier ``λ`` for the whole run. The steps of :meth:`decide`:

    1. remaining budget ``R_n = mean_ratio·N − Σ_{m<n} δ_m`` over the ``N − n`` exchanges left;
    2. fold ``log ||g_n||`` into a local trend of the log norm, the forecast of the norms still to
       come (:class:`~lightning_compress.policies.forecast.LogNormTrend`: recent, falling-only,
       no trend while the slope is within one standard error of zero, extrapolated no further
       than twice the run so far);
    3. solve ``λ`` so that this exchange (actual norm) and the forecast ones spend exactly ``R_n``;
    4. ``K_n = clamp(round(δ_n·d), K_min, K_max)`` and record ``K_n/d`` against the budget.

    When the forecast is right, ``λ`` comes out the same at every exchange and the decisions are the
    offline optimum of (P); when it is wrong, step 1 absorbs the error in later exchanges, so the
    mean of ``K/d`` over the ``N`` exchanges meets ``mean_ratio`` either way (exactly, up to the
    last ``K``'s rounding, unless the clamps bind at the end). Early in a run the trend is not yet
    known and ``K`` stays near the budget; on a 100x norm decay over 2000 exchanges the first
    quarter kept 4.2x the last (the hindsight optimum of (P): 8.2x; docs/adaptive_topk.md).
    An exchange whose norm is unknown (``None``, ``inf``, ``nan``, 0) keeps the remaining per-step
    budget ``R_n/(N − n)``. ``K`` follows the gradient: a larger norm keeps more coordinates.

    ``d`` counts the coordinates that travel through Top-K (parameters with at least
    ``min_compression_size`` elements, fused into one vector). ``N`` is the Trainer's estimate of
    the optimizer steps, taken as the number of exchanges. When it is unknown (``inf``), or the run
    outlasts it, the horizon recedes: every exchange plans (P) for ``H = fallback_horizon`` more,
    i.e. step 1 uses ``R_n = mean_ratio·(n + H) − Σ_{m<n} δ_m`` over ``H`` exchanges. The excess
    ``Σ_{m<n} δ_m − mean_ratio·n`` then stays within ``[−H·(max_ratio − mean_ratio) − (mean_ratio −
    min_ratio), H·(mean_ratio − min_ratio) + (max_ratio − mean_ratio)]`` (up to rounding ``K``), so
    the mean over ``n`` exchanges meets ``mean_ratio`` within ``O(H/n)``; a falling norm makes it
    overspend toward the upper end (each plan expects the small gradients later).

    Args:
        mean_ratio: the budget, the mean fraction ``K/d`` kept over the run, in (0, 1]. Smaller sends
            fewer bytes (6-8 bytes per kept coordinate) and leans harder on error feedback;
            0.001-0.01 with error feedback is typical. Default 0.01.
        min_ratio: smallest fraction kept in an exchange, in (0, mean_ratio]; default
            ``mean_ratio / 4``. Lower lets late, small gradients give more of the budget to early,
            large ones (the bound asks ``K`` to fall as ``||g||^(2/3)``: 21x over a 100x decay).
        max_ratio: largest fraction kept, in [mean_ratio, 1]; default ``min(1, 4·mean_ratio)``.
            Raise it to let large-gradient exchanges keep more; it caps the bytes of one exchange.
        lr_schedule: the learning rate's shape, which weights each exchange's error by ``η_n³``:
            ``"constant"`` (default; the weights drop out), ``"cosine"`` (``½(1 + cos(π·n/N))``,
            needs ``N``: keeps more early, fewer as the rate decays), or a callable
            ``step -> learning rate`` (deterministic, the same on every rank, >= 0; only its shape
            matters). It receives the ``step`` passed to :meth:`decide`.
        fallback_horizon: exchanges to plan for when ``N`` is unknown or already passed, >= 1;
            default 1000. Longer follows a slow trend of the norm further but pays back
            overspending more slowly.

    Example::

        CommunicationMonitor(policy=AdaptiveTopKPolicy(mean_ratio=0.01, lr_schedule="cosine"))

    """

    setting = "k"
    metric = "comm/topk_k"

    def __init__(
        self,
        mean_ratio: float = 0.01,
        min_ratio: float | None = None,
        max_ratio: float | None = None,
        lr_schedule: str | Callable[[int], float] = "constant",
        fallback_horizon: int = 1000,
    ) -> None:
        super().__init__()
        self.mean_ratio = _check_ratio("mean_ratio", mean_ratio)
        self.min_ratio = _check_ratio("min_ratio", self.mean_ratio / 4 if min_ratio is None else min_ratio)
        default_max = min(1.0, 4 * self.mean_ratio)
        self.max_ratio = _check_ratio("max_ratio", default_max if max_ratio is None else max_ratio)
        if not self.min_ratio <= self.mean_ratio <= self.max_ratio:
            raise ValueError(
                "mean_ratio must lie in [min_ratio, max_ratio], got "
                f"min_ratio={self.min_ratio}, mean_ratio={self.mean_ratio}, max_ratio={self.max_ratio}"
            )
        if not (callable(lr_schedule) or (isinstance(lr_schedule, str) and lr_schedule in _SCHEDULES)):
            raise ValueError(
                "lr_schedule must be 'constant', 'cosine' or a callable step -> learning rate, "
                f"got {lr_schedule!r}"
            )
        self.lr_schedule = lr_schedule
        self.fallback_horizon = check_fallback_horizon(fallback_horizon)
        self.total_steps: int | None = None  # N; None when unknown
        #: ``log λ`` of the last decision (``None`` when it needed none: unknown norm, or clamped)
        self.multiplier: float | None = None
        self._count = 0  # exchanges decided so far
        self._spent = 0.0  # Σ K/d so far
        self._trend = LogNormTrend(window_fraction=0.1, min_window=20.0, reach=2.0)

    def __repr__(self) -> str:
        return (
            f"AdaptiveTopKPolicy(mean_ratio={self.mean_ratio}, min_ratio={self.min_ratio}, "
            f"max_ratio={self.max_ratio}, lr_schedule={self.lr_schedule!r}, "
            f"fallback_horizon={self.fallback_horizon})"
        )

    # -- wiring ------------------------------------------------------------------------------
    def default_compressor(self) -> Compressor:
        from lightning_compress.compressors import TopK

        return TopK(ratio=self.mean_ratio)

    def check_compressor(self, compressor: Compressor) -> None:
        from lightning_compress.compressors import TopK

        if not isinstance(compressor, TopK):
            raise TypeError(
                f"AdaptiveTopKPolicy sets Top-K's k, but the compressor is {compressor!r}; use TopK "
                "(e.g. CompressedDDP(compressor=TopK(ratio=0.01))) or DQPolicy for QSGD"
            )

    @property
    def needs_total_steps(self) -> bool:
        """True: the budget is over the run, so the policy needs its length ``N``."""
        return True

    def setup(self, numel: int, total_steps: float | None = None) -> None:
        """Learn ``d`` and the run length ``N`` (``None`` or ``inf``: unknown, see the class docs)."""
        super().setup(numel, total_steps)
        if total_steps is None or total_steps == math.inf:
            self.total_steps = None
        elif isinstance(total_steps, bool) or not isinstance(total_steps, Real) or not total_steps >= 1:
            raise ValueError(f"total_steps must be a number >= 1, math.inf or None, got {total_steps!r}")
        else:
            self.total_steps = math.ceil(total_steps)
        if self.lr_schedule == "cosine" and self.total_steps is None:
            raise ValueError(
                "AdaptiveTopKPolicy(lr_schedule='cosine') needs the run length, but the Trainer's is "
                "unknown; set Trainer(max_steps=...), or pass lr_schedule as a callable step -> lr"
            )

    # -- the rule ----------------------------------------------------------------------------
    def k_bounds(self) -> tuple[int, int]:
        """``(K_min, K_max)`` for the ``d`` coordinates set up."""
        d = self._d()
        lo = min(d, max(1, round_half_up(self.min_ratio * d)))
        hi = min(d, max(lo, round_half_up(self.max_ratio * d)))
        return lo, hi

    def _d(self) -> int:
        if self.numel is None:
            raise RuntimeError("AdaptiveTopKPolicy: call setup(numel, total_steps) before deciding")
        return max(1, self.numel)

    def learning_rate(self, step: int) -> float:
        """The learning rate's shape at ``step`` (its scale does not matter): ``η`` of the bound."""
        if self.lr_schedule == "constant":
            return 1.0
        if self.lr_schedule == "cosine":
            n = self.total_steps
            return 0.5 * (1.0 + math.cos(math.pi * min(step, n) / n))
        lr = self.lr_schedule(step)
        if isinstance(lr, bool) or not isinstance(lr, Real) or not 0.0 <= float(lr) < math.inf:
            raise ValueError(f"lr_schedule({step}) must return a finite learning rate >= 0, got {lr!r}")
        return float(lr)

    def _log_lr_weight(self, step: int) -> float:
        # the bound weighs an exchange's error by η³ (docs §2); -inf for a zero learning rate
        lr = self.learning_rate(step)
        return 3.0 * math.log(lr) if lr > 0.0 else -math.inf

    def decide(self, grad_norm: float | None, step: int = 0) -> int:
        """Choose ``K`` of this exchange from its gradient norm, and record it against the budget.

        Args:
            grad_norm: pre-compression L2 norm of this exchange's gradient, reduced across ranks
                (the same on every rank); ``None``, ``inf``, ``nan`` or 0 when unknown.
            step: the exchange counter (0-based), passed to a callable ``lr_schedule``.

        """
        d = self._d()
        n = self._count
        lo, hi = self.min_ratio, self.max_ratio
        # 1. the budget left (docs eq. (4)) over the exchanges left, this one included
        end = receding_end(n, self.total_steps, self.fallback_horizon)
        left = end - n
        budget = self.mean_ratio * end - self._spent
        g = usable_norm(grad_norm)
        self.multiplier = None
        if g is None:
            ratio = min(hi, max(lo, budget / left))
        else:
            # 2. the trend of log ||g||: the forecast of the norms to come (eq. (5))
            y = math.log(g)
            self._trend.observe(float(n), y)
            # error weights a = η³·||g||², in logs: norms near the float range must not overflow
            log_weights, counts = [self._log_lr_weight(step) + 2.0 * y], [1.0]
            future_weights, future_counts = self._forecast(n, step, left - 1)
            log_weights += future_weights
            counts += future_counts
            # 3. one multiplier λ for this exchange and the forecast ones, spending exactly the budget
            self.multiplier = solve_multiplier(log_weights, counts, budget, lo, hi)
            if self.multiplier is not None:
                # KKT of (P) (docs eq. (3)): a(2 − δ)/δ³ = λ, clamped to the box
                ratio = clamped_ratio(log_weights[0] - self.multiplier, lo, hi)
            elif all(lw == -math.inf for lw in log_weights):  # learning rate 0 throughout: nothing to trade
                ratio = min(hi, max(lo, budget / left))
            else:  # the budget is beyond what the box allows: clamped everywhere
                ratio = lo if budget <= sum(counts) * lo else hi
        # 4. whole coordinates; the rounding is paid back by step 1 of later exchanges
        k_lo, k_hi = self.k_bounds()
        k = min(k_hi, max(k_lo, round_half_up(ratio * d)))
        self._count += 1
        self._spent += k / d
        self.value = k
        return k

    def _forecast(self, n: int, step: int, ahead: int) -> tuple[list[float], list[float]]:
        """Log error weights ``log(η³) + 2·log ĝ`` of the ``ahead`` exchanges after ``n``, in <= 64 nodes."""
        if ahead <= 0:
            return [], []
        log_norm = self._trend.forecaster()
        nodes = min(ahead, _FORECAST_NODES)
        width = ahead / nodes
        weights, counts = [], []
        for i in range(nodes):
            # block midpoint, in exchanges after n (exactly 1 .. ahead when nodes == ahead)
            offset = 0.5 + (i + 0.5) * width
            weights.append(self._log_lr_weight(step + round_half_up(offset)) + 2.0 * log_norm(offset))
            counts.append(width)
        return weights, counts

    @property
    def mean(self) -> float | None:
        """Mean ``K/d`` of the decisions so far (``None`` before the first)."""
        return self._spent / self._count if self._count else None

    @property
    def mean_k(self) -> float | None:
        """Mean ``K`` of the decisions so far."""
        mean = self.mean
        return None if mean is None else mean * self._d()

    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`decide` depends on besides the settings: the same on every rank."""
        return {
            "count": self._count,
            "spent": self._spent,
            "trend": self._trend.state(),
            "value": self.value,
            "multiplier": self.multiplier,
            "numel": self.numel,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        missing = {"count", "spent", "trend"} - set(state)
        if missing:
            raise ValueError(
                f"AdaptiveTopKPolicy state is missing {sorted(missing)}; was it saved by this version "
                "of AdaptiveTopKPolicy?"
            )
        self._count = int(state["count"])
        self._spent = float(state["spent"])
        self._trend.load(state["trend"])
        self.value = state.get("value")
        self.multiplier = state.get("multiplier")


__all__ = ["AdaptiveTopKPolicy", "clamped_ratio", "kkt_ratio", "solve_multiplier"]
