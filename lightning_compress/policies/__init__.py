"""Per-step compression policies: the bit width (DQ-SGD) or ``K`` (adaptive Top-K) of each step.

Every decision is a function of values identical on every rank (the policy's own state, the step
counter, and this step's pre-compression gradient norm reduced across ranks, one float riding the
dense allreduce that runs anyway), so no extra collective is needed. Used through
:class:`~lightning_compress.CommunicationMonitor`.
"""

from lightning_compress.policies.base import CompressionPolicy
from lightning_compress.policies.dq import DQPolicy
from lightning_compress.policies.topk import AdaptiveTopKPolicy

__all__ = ["AdaptiveTopKPolicy", "CompressionPolicy", "DQPolicy"]
