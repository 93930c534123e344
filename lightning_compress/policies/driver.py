"""The policy driver: wires a :class:`CompressionPolicy` to the exchange it steers.

It checks that the codec has the setting the policy controls, sets the policy up once the model
is wrapped (the number of compressed coordinates, the run length), hands it to the hook state
(the exchange then calls ``decide``/``apply`` on every rank), and names the logged setting by the
policy's own :attr:`~CompressionPolicy.metric`.
"""

from __future__ import annotations

import math
from typing import Any

from lightning_utilities.core.rank_zero import rank_zero_warn

from lightning_compress.compressors.base import Compressor
from lightning_compress.metrics import codec_setting
from lightning_compress.policies.base import CompressionPolicy


def run_length(trainer: Any) -> float:
    """The Trainer's optimizer steps in this fit, ``inf`` when it cannot tell."""
    try:
        return float(trainer.estimated_stepping_batches)
    except Exception:  # e.g. an iterable dataset without max_steps
        return math.inf


class PolicyDriver:
    """Drive ``policy`` (or nothing, for ``None``) on a hook state.

    Args:
        policy: the per-step policy, or ``None`` (the codec keeps its setting).

    Raises:
        TypeError: ``policy`` is neither a :class:`CompressionPolicy` nor ``None``.

    """

    def __init__(self, policy: CompressionPolicy | None) -> None:
        if policy is not None and not isinstance(policy, CompressionPolicy):
            raise TypeError(
                "policy must be a lightning_compress.policies policy (DQPolicy, AdaptiveTopKPolicy) or None, "
                f"got {type(policy).__name__}"
            )
        self.policy = policy

    def check(self, compressor: Compressor) -> None:
        """Raise ``TypeError`` unless ``compressor`` has the setting the policy controls."""
        if self.policy is not None:
            self.policy.check_compressor(compressor)

    def setup(self, numel: int, trainer: Any, min_compression_size: int) -> None:
        """Set the policy up for ``numel`` compressed coordinates and the Trainer's run length."""
        policy = self.policy
        if policy is None:
            return
        if numel == 0:
            rank_zero_warn(
                f"CommunicationMonitor: no parameter has >= min_compression_size={min_compression_size} "
                "elements; "
                "everything travels dense and the policy has nothing to control"
            )
        # only when needed: estimating the run length may load the train dataloader early
        policy.setup(numel, run_length(trainer) if policy.needs_total_steps else None)

    def attach(self, state: Any) -> None:
        """Hand the policy to the hook state: the exchange decides on every rank, from the step's norm."""
        state.policy = self.policy

    def setting(self, compressor: Compressor | None, numel: int) -> tuple[str, float] | None:
        """``(metric name, value)`` of the codec's current setting; the name is the policy's ``metric``.

        Without a policy (or one that declares no metric), the codec names it (``comm/bit_width``,
        ``comm/topk_k``); ``None`` for a codec without a setting.
        """
        found = codec_setting(compressor, numel)
        if found is None or self.policy is None or not self.policy.metric:
            return found
        return self.policy.metric, found[1]

    def state_dict(self) -> dict[str, Any] | None:
        return None if self.policy is None else self.policy.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.policy is not None and state is not None:
            self.policy.load_state_dict(state)


__all__ = ["PolicyDriver", "run_length"]
