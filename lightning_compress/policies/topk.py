"""Adaptive Top-K: the number of kept coordinates of each step from the gradient norm, under a budget."""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

from lightning_compress.compressors.base import Compressor
from lightning_compress.policies.base import CompressionPolicy, round_half_up, usable_norm


def _check_ratio(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name} must be a float in (0, 1], got {value!r}")
    return float(value)


class AdaptiveTopKPolicy(CompressionPolicy):
    """Adaptive sparsity of Top-K (after Ruan, Yan, Xiao, Song, Xu, arXiv 2210.13532).

    Ruan et al. choose ``K`` per step by trading the convergence error against a budget of
    coordinates: steps whose gradient is large keep more coordinates. This policy implements a
    budget-tracking rule of the same form as :class:`~lightning_compress.policies.DQPolicy`:

    ``K_n = clamp(round(t_n·||g_n||^p), K_min, K_max)``

    where ``||g_n||`` is the norm of the previous step's averaged gradient (identical on every
    rank), and ``t_n`` is solved online so that a step with the usual norm (a moving average of
    ``log2 ||g||``) keeps ``D_n·d`` coordinates, ``d`` being the number of compressed coordinates
    and ``D_n = mean_ratio·2^(−gain·E_n)`` the per-step budget corrected by the excess ``E_n``
    (coordinates kept beyond the budget so far, in steps' worth). The mean of ``K/d`` over the run
    therefore meets ``mean_ratio``. Use it with error feedback (on by default for Top-K), which
    returns what the sparse steps dropped.

    ``d`` counts the coordinates that travel through Top-K: parameters with at least
    ``min_compression_size`` elements, fused into one vector (the smaller ones travel dense).
    Before the first exchange there is no norm: the first step keeps ``round(mean_ratio·d)``.

    Args:
        mean_ratio: the budget, the mean fraction ``K/d`` of coordinates kept, in (0, 1]. Smaller
            sends fewer bytes (6-8 bytes per kept coordinate) and leans harder on error feedback;
            0.001-0.01 with error feedback is typical. Default 0.01.
        min_ratio: smallest fraction kept in a step; default ``mean_ratio / 4``.
        max_ratio: largest fraction kept in a step; default ``min(1, 4·mean_ratio)``.
        norm_power: ``p``, how strongly ``K`` follows the norm: 1 (default) makes ``K``
            proportional to it; 0 keeps ``K`` constant; 2 reacts to the squared norm (the
            gradient's energy).
        gain: how fast overspending is paid back; 0.05-0.3, default 0.1.
        norm_decay: decay of the moving average that defines the usual norm; default 0.9.

    Example::

        CommunicationMonitor(policy=AdaptiveTopKPolicy(mean_ratio=0.01))

    """

    setting = "k"
    metric = "comm/topk_k"

    def __init__(
        self,
        mean_ratio: float = 0.01,
        min_ratio: float | None = None,
        max_ratio: float | None = None,
        norm_power: float = 1.0,
        gain: float = 0.1,
        norm_decay: float = 0.9,
    ) -> None:
        super().__init__(gain, norm_decay)
        self.mean_ratio = _check_ratio("mean_ratio", mean_ratio)
        self.min_ratio = _check_ratio("min_ratio", self.mean_ratio / 4 if min_ratio is None else min_ratio)
        default_max = min(1.0, 4 * self.mean_ratio)
        self.max_ratio = _check_ratio("max_ratio", default_max if max_ratio is None else max_ratio)
        if not self.min_ratio <= self.mean_ratio <= self.max_ratio:
            raise ValueError(
                "mean_ratio must lie in [min_ratio, max_ratio], got "
                f"min_ratio={self.min_ratio}, mean_ratio={self.mean_ratio}, max_ratio={self.max_ratio}"
            )
        if isinstance(norm_power, bool) or not isinstance(norm_power, Real) or not 0.0 <= norm_power <= 4.0:
            raise ValueError(f"norm_power must be a number in [0, 4], got {norm_power!r}")
        self.norm_power = float(norm_power)

    def __repr__(self) -> str:
        return (
            f"AdaptiveTopKPolicy(mean_ratio={self.mean_ratio}, min_ratio={self.min_ratio}, "
            f"max_ratio={self.max_ratio}, norm_power={self.norm_power})"
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

    # -- the rule ----------------------------------------------------------------------------
    def k_bounds(self) -> tuple[int, int]:
        """``(K_min, K_max)`` for the ``d`` coordinates set up."""
        d = self._d()
        lo = min(d, max(1, round_half_up(self.min_ratio * d)))
        hi = min(d, max(lo, round_half_up(self.max_ratio * d)))
        return lo, hi

    def k_for(self, grad_norm: float, t: float) -> int:
        """``clamp(round(t·||g||^p), K_min, K_max)``: non-decreasing in the norm."""
        lo, hi = self.k_bounds()
        k = t * grad_norm**self.norm_power
        return hi if not math.isfinite(k) else min(hi, max(lo, round_half_up(k)))

    def _d(self) -> int:
        if self.numel is None:
            raise RuntimeError("AdaptiveTopKPolicy: call setup(numel) before deciding")
        return max(1, self.numel)

    def decide(self, grad_norm: float | None, step: int = 0) -> int:
        budget = self.budget
        d = self._d()
        # the fraction a step with the usual norm should keep: the budget, shrunk by what was overspent
        desired = self.mean_ratio * 2.0 ** (-budget.gain * budget.excess)
        desired = min(max(desired, self.min_ratio / 2), min(1.0, 2 * self.max_ratio))
        g = usable_norm(grad_norm)
        first = g is not None and budget.log2_ref is None
        if first:
            budget.observe_norm(g)
        if g is None or budget.log2_ref is None:
            self.t = None
            lo, hi = self.k_bounds()
            k = min(hi, max(lo, round_half_up(desired * d)))
        else:
            # t such that t·ḡ^p = desired·d, ḡ = 2^log2_ref the usual norm
            self.t = desired * d / 2.0 ** (self.norm_power * budget.log2_ref)
            k = self.k_for(g, self.t)
        budget.spend(k / d, self.mean_ratio, unit=self.mean_ratio)
        if not first:
            budget.observe_norm(g)
        self.value = k
        return k

    @property
    def mean_k(self) -> float | None:
        """Mean ``K`` of the decisions so far."""
        mean = self.budget.mean
        return None if mean is None else mean * self._d()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "numel": self.numel}


__all__ = ["AdaptiveTopKPolicy"]
