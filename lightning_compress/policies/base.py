"""The base of per-step compression policies.

A policy picks one setting of the codec (QSGD's bit width, Top-K's ``K``) for every gradient
exchange that goes through the codec. Every rank must pick the same setting, or the ranks'
payload sizes disagree and the collectives fail; so a decision may only depend on values every
rank holds identically: the policy's own state (advanced identically on every rank), the
exchange counter, the configuration, and the gradient norm it is given.

That norm is the *pre-compression* L2 norm of this step's gradient (the part that goes through
the codec), reduced across ranks as ``sqrt(mean over ranks of ||g_r||²)``: one float riding the
dense allreduce that runs anyway, before the compressed exchange, so the decision of step ``n``
uses ``||g_n||`` itself (DQ-SGD's ``s_n = t·||g_n||``, arXiv 2107.14575), not last step's
decoded average (whose norm quantization noise inflates). The exchange calls :meth:`decide` on
every rank at every compressed exchange, whatever the schedule (a rank that skips its
forward/backward under backup workers still decides), so the policy's state stays identical.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from lightning_compress.compressors.base import Compressor


def round_half_up(x: float) -> int:
    """``floor(x + 0.5)``: deterministic rounding (Python's ``round`` rounds halves to even)."""
    return math.floor(x + 0.5)


def usable_norm(grad_norm: float | None) -> float | None:
    """Return the norm as a float when it carries information (finite and > 0), else ``None``.

    ``None`` when the exchange carried no norm; ``inf``/``nan`` after an overflowing step (fp16);
    0 for a gradient that vanished. None of these say how large the gradient is.
    """
    if grad_norm is None:
        return None
    g = float(grad_norm)
    return g if math.isfinite(g) and g > 0.0 else None


class CompressionPolicy(ABC):
    """A per-step rule for one codec setting; see the module docstring for the rules it must obey.

    The :class:`~lightning_compress.CommunicationMonitor` wires it: :meth:`check_compressor` and
    :meth:`setup` once the model is wrapped; then the exchange calls :meth:`decide` and
    :meth:`apply` on every rank before each compressed exchange.
    """

    #: the codec attribute the policy sets (``"bits"``, ``"k"``)
    setting: ClassVar[str] = ""
    #: the name under which the monitor logs the setting
    metric: ClassVar[str] = ""

    def __init__(self) -> None:
        #: the last decision (``None`` before the first)
        self.value: int | None = None
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
        """Choose the setting of this exchange (and advance the policy's state).

        Args:
            grad_norm: this step's pre-compression gradient norm, reduced across ranks (identical
                on every rank; see the module docstring), or ``None`` when unknown.
            step: the exchange about to run (0-based), identical on every rank.

        """

    def apply(self, compressor: Compressor, value: int) -> None:
        """Write ``value`` into the codec (the same on every rank)."""
        setattr(compressor, self.setting, value)

    @property
    @abstractmethod
    def mean(self) -> float | None:
        """Mean of the decisions so far in budget units (bits; for Top-K the fraction ``K/d``)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`decide` depends on: identical on every rank by construction."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


__all__ = ["CompressionPolicy", "round_half_up", "usable_norm"]
