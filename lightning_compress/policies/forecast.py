"""The forecast both budget policies plan the rest of the run with: a falling-only trend of the log norm.

DQ-SGD (arXiv 2107.14575) and adaptive Top-K (after arXiv 2210.13532) both solve, at every
exchange, one multiplier for the whole run (DQ's ``t``, Top-K's ``λ``) such that the bits spent so
far plus the settings forecast for the exchanges left meet the budget. They need the norms still
to come; :class:`LogNormTrend` forecasts them from the ones seen.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Integral
from typing import Any


class LogNormTrend:
    """A local, falling-only trend of ``y = log ||g||`` (any fixed base), fitted online in O(1).

    A weighted least-squares line through ``(t, y_t)``, the weights decaying by ``1 − 1/W`` per
    observation with ``W = max(min_window, window_fraction·(t + 1))``: the last ``window_fraction``
    share of the run so far (a window that grows with the run, as training's trends slow down).
    From it, the forecast ``y(n + h) = ŷ_n + min(β̃, 0)·min(h, reach·(n + 1))``:

    - ``ŷ_n``, the line's value now (the level, not the mean of a longer past);
    - ``β̃``, the slope, set to 0 while it lies within one standard error of 0 (``T² <= 1``, ``T``
      its t-statistic with the effective number of observations): per-step noise must not pass for
      a trend, or the falling-only clamp below would turn noise into a bias towards spending early;
    - only a falling trend is extrapolated: gradients shrink over training, a forecast rise that
      does not come starves the large gradients of now, and rises (warm-up, spikes) are transient;
      a rise becomes the new level instead;
    - extrapolated over at most ``reach`` times the exchanges seen so far, then flat: no further
      ahead than the evidence.

    State: nine floats, identical on every rank when fed identical values. The sums are kept in
    the age ``n − t`` of each observation, so they stay of the order of the window whatever the
    run length.

    Args:
        window_fraction: the share of the run so far that the fit covers, in (0, 1].
        min_window: the fit's window, in observations, at least.
        reach: how far ahead a trend is extrapolated, in multiples of the exchanges seen.

    """

    __slots__ = (
        "count",
        "last",
        "min_window",
        "reach",
        "s0",
        "s00",
        "s1",
        "s2",
        "say",
        "sy",
        "syy",
        "window_fraction",
    )

    def __init__(self, window_fraction: float = 0.1, min_window: float = 20.0, reach: float = 2.0) -> None:
        self.window_fraction = float(window_fraction)
        self.min_window = float(min_window)
        self.reach = float(reach)
        self.count = 0
        self.last = 0.0
        self.s0 = self.s00 = self.s1 = self.s2 = self.sy = self.say = self.syy = 0.0

    def observe(self, t: float, y: float) -> None:
        """Add ``y`` observed at exchange ``t`` (after every earlier one)."""
        if self.count:
            gap = t - self.last  # age every observation by the exchanges since the last one
            self.s2 += 2.0 * gap * self.s1 + gap * gap * self.s0
            self.s1 += gap * self.s0
            self.say += gap * self.sy
            keep = 1.0 - 1.0 / max(1.0, self.min_window, self.window_fraction * (t + 1.0))
            self.s0 *= keep
            self.s1 *= keep
            self.s2 *= keep
            self.sy *= keep
            self.say *= keep
            self.syy *= keep
            self.s00 *= keep * keep
        self.s0 += 1.0
        self.s00 += 1.0
        self.sy += y
        self.syy += y * y
        self.count += 1
        self.last = float(t)

    def fit(self) -> tuple[float, float]:
        """``(ŷ_n, β̃)``: the line's value at the last observation, and its slope per exchange."""
        mean_y = self.sy / self.s0
        if self.count < 3:
            return mean_y, 0.0
        mean_a = self.s1 / self.s0
        caa = self.s2 - self.s1 * mean_a
        cay = self.say - self.s1 * mean_y
        cyy = self.syy - self.sy * mean_y
        if caa <= 0.0:
            return mean_y, 0.0
        beta = cay / caa  # per exchange of age: the slope in time is −beta
        rss = max(0.0, cyy - beta * cay)
        dof = self.s0 * self.s0 / self.s00 - 2.0  # effective observations, less the two fitted
        exact = rss <= 1e-24 * max(cyy, 1e-300)  # an exact line: nothing to test
        if not exact and (dof <= 0.0 or beta * beta * caa * dof <= rss):  # T² <= 1
            return mean_y, 0.0
        return mean_y - beta * mean_a, -beta

    def forecaster(self) -> Callable[[float], float]:
        """``h -> y(n + h)``, ``n`` the last observation (see the class docstring)."""
        level, slope = self.fit()
        fall = min(slope, 0.0)
        reach = self.reach * (self.last + 1.0)
        return lambda h: level + fall * min(h, reach)

    def state(self) -> list[float]:
        sums = [self.s0, self.s00, self.s1, self.s2, self.sy, self.say, self.syy]
        return [float(self.count), self.last, *sums]

    def load(self, state: Any) -> None:
        if not isinstance(state, (list, tuple)) or len(state) != 9:
            raise ValueError(f"a policy's 'trend' state must hold 9 numbers, got {state!r}")
        count, self.last, self.s0, self.s00, self.s1, self.s2, self.sy, self.say, self.syy = map(float, state)
        self.count = int(count)


def receding_end(n: int, total: float | None, fallback_horizon: int) -> float:
    """The exchange a budget runs to: ``total`` (``N``), or ``n + fallback_horizon`` once unknown/passed."""
    return total if total is not None and math.isfinite(total) and n < total else n + fallback_horizon


def check_fallback_horizon(value: Any) -> int:
    """Validate a policy's ``fallback_horizon`` (exchanges planned ahead when the run length is unknown)."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"fallback_horizon must be an integer >= 1 (exchanges), got {value!r}")
    return int(value)


__all__ = ["LogNormTrend", "check_fallback_horizon", "receding_end"]
