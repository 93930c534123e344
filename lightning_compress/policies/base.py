"""The base of per-step compression policies, and the budget tracking they share.

A policy picks one setting of the codec (QSGD's bit width, Top-K's ``K``) for every optimizer
step that exchanges compressed gradients. Every rank must pick the same setting, or the ranks'
payload sizes disagree and the collectives fail; so a decision may only depend on values every
rank holds identically: the policy's own state (advanced identically on every rank), the step
counter, the configuration, and ``CompressionState.last_grad_norm``, the norm of the previous
step's *averaged, decoded* gradient, which every rank decoded from the same bytes.

Both policies of this package follow one pattern (DQ-SGD, arXiv 2107.14575; Adaptive Top-K,
arXiv 2210.13532): the setting grows with the gradient norm through a scale factor ``t``
(``B = log2(t·||g|| + 1) + 1``; ``K = t·||g||``), and ``t`` is solved online so that the mean
setting over the run meets the user's budget. Solving ``t`` needs two running quantities, kept in
:class:`BudgetTracker`:

- a reference norm ``ḡ`` (an exponential moving average of ``log2 ||g||``): ``t`` is chosen so
  that a step whose norm equals ``ḡ`` spends the per-step budget ``D``, so a larger norm than
  usual gets more than its share and a smaller one less;
- the *excess* ``E``, the budget spent so far beyond the target (in steps' worth of budget); the
  per-step budget is lowered by ``gain·E`` (in the setting's own units), so ``E`` stays bounded
  and the mean over ``n`` steps meets the target within ``O(1/n)``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from lightning_compress.compressors.base import Compressor


def round_half_up(x: float) -> int:
    """``floor(x + 0.5)``: deterministic rounding (Python's ``round`` rounds halves to even)."""
    return math.floor(x + 0.5)


def check_gain(gain: Any) -> float:
    if isinstance(gain, bool) or not isinstance(gain, (int, float)) or not 0.0 < float(gain) <= 1.0:
        raise ValueError(f"gain must be a float in (0, 1], got {gain!r}")
    return float(gain)


def check_norm_decay(norm_decay: Any) -> float:
    if isinstance(norm_decay, bool) or not isinstance(norm_decay, (int, float)) or not 0 <= norm_decay < 1:
        raise ValueError(f"norm_decay must be a float in [0, 1), got {norm_decay!r}")
    return float(norm_decay)


def usable_norm(grad_norm: float | None) -> float | None:
    """Return the norm as a float when it carries information (finite and > 0), else ``None``.

    ``None`` before the first exchange; ``inf``/``nan`` after an overflowing step (fp16); 0 for a
    gradient that vanished. None of these say how large the next gradient will be.
    """
    if grad_norm is None:
        return None
    g = float(grad_norm)
    return g if math.isfinite(g) and g > 0.0 else None


class BudgetTracker:
    """Reference norm and budget excess of a policy (see the module docstring).

    Args:
        gain: how fast overspending is paid back: the per-step budget moves by ``gain`` units of
            the setting per unit of excess. Larger values hold the running mean closer to the
            target at every moment but leave less room for the norm to steer the setting; smaller
            values let the setting follow the norm more freely and meet the budget over a longer
            horizon (about ``1/gain`` steps). 0.05-0.3 is sensible; default 0.1.
        norm_decay: decay of the moving average of ``log2 ||g||`` that defines a "usual" norm.
            Closer to 1 remembers longer, so a slow drift of the norm (training progress) moves
            the setting more; 0.9 (about 10 steps) is the default.

    """

    def __init__(self, gain: float = 0.1, norm_decay: float = 0.9) -> None:
        self.gain = check_gain(gain)
        self.norm_decay = check_norm_decay(norm_decay)
        self.log2_ref: float | None = None
        self.excess = 0.0
        self.count = 0
        self.total = 0.0

    def observe_norm(self, norm: float | None) -> None:
        """Fold a usable norm into the reference (after the decision that used the old one)."""
        if norm is None:
            return
        x = math.log2(norm)
        old = self.log2_ref
        self.log2_ref = x if old is None else self.norm_decay * old + (1 - self.norm_decay) * x

    def spend(self, chosen: float, target: float, unit: float = 1.0) -> None:
        """Record a decision ``chosen`` against this step's ``target`` (``unit``: one step's budget)."""
        self.excess += (chosen - target) / unit
        self.count += 1
        self.total += chosen

    @property
    def mean(self) -> float | None:
        """Mean of the decisions so far."""
        return self.total / self.count if self.count else None

    def state_dict(self) -> dict[str, Any]:
        return {"log2_ref": self.log2_ref, "excess": self.excess, "count": self.count, "total": self.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log2_ref = None if state["log2_ref"] is None else float(state["log2_ref"])
        self.excess = float(state["excess"])
        self.count = int(state["count"])
        self.total = float(state["total"])


class CompressionPolicy(ABC):
    """A per-step rule for one codec setting; see the module docstring for the rules it must obey.

    The :class:`~lightning_compress.CommunicationMonitor` drives it: :meth:`setup` once the model
    is wrapped, then :meth:`decide` once before every optimizer step whose gradients travel
    compressed, then :meth:`apply` to write the decision into the codec.
    """

    #: the codec attribute the policy sets (``"bits"``, ``"k"``)
    setting: ClassVar[str] = ""
    #: the name under which the monitor logs the setting
    metric: ClassVar[str] = ""

    def __init__(self, gain: float = 0.1, norm_decay: float = 0.9) -> None:
        self.budget = BudgetTracker(gain, norm_decay)
        #: the last decision (``None`` before the first)
        self.value: int | None = None
        #: the scale ``t`` of the last decision (``None`` when it had no usable norm)
        self.t: float | None = None
        #: gradient coordinates that travel through the codec (set by :meth:`setup`)
        self.numel: int | None = None

    @abstractmethod
    def default_compressor(self) -> Compressor:
        """Return the codec to install when the monitor runs on stock DDP and none was given."""

    @abstractmethod
    def check_compressor(self, compressor: Compressor) -> None:
        """Raise ``TypeError`` unless ``compressor`` has the setting this policy controls."""

    @property
    def needs_total_steps(self) -> bool:
        """Whether :meth:`setup` needs the run length (the monitor then asks the Trainer for it)."""
        return False

    def setup(self, numel: int, total_steps: float | None = None) -> None:
        """Learn the number of compressed coordinates and the run length (``inf`` when unknown)."""
        if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
            raise ValueError(f"numel must be an integer >= 0, got {numel!r}")
        self.numel = numel

    @abstractmethod
    def decide(self, grad_norm: float | None, step: int = 0) -> int:
        """Choose the setting of the next exchange and record it against the budget.

        Args:
            grad_norm: L2 norm of the previous step's averaged gradient (identical on every rank),
                or ``None`` before the first exchange.
            step: the optimizer step about to run (0-based), identical on every rank.

        """

    def apply(self, compressor: Compressor, value: int) -> None:
        """Write ``value`` into the codec (the same on every rank)."""
        setattr(compressor, self.setting, value)

    @property
    def mean(self) -> float | None:
        """Mean of the decisions so far in budget units (bits; for Top-K the fraction ``K/d``)."""
        return self.budget.mean

    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`decide` depends on: identical on every rank by construction."""
        return {"budget": self.budget.state_dict(), "value": self.value, "t": self.t}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        if "budget" not in state:
            raise ValueError(f"{type(self).__name__} state is missing 'budget'; was it saved by this policy?")
        self.budget.load_state_dict(state["budget"])
        self.value = state.get("value")
        self.t = state.get("t")


__all__ = ["BudgetTracker", "CompressionPolicy", "round_half_up", "usable_norm"]
