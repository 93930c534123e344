"""Error-feedback memory (Karimireddy et al., arXiv 1901.09847, Alg. 2).

A biased compressor ``C`` (Top-K, sketches) drops part of every gradient. Error feedback keeps
what was dropped and adds it back before the next compression::

    p = g + e          # compensate
    Δ = C(p)           # what is actually sent (decoded)
    e ← p − Δ          # update: the part of p that was not sent

so ``Δ + e_new == g + e_old``: nothing is lost, only delayed. This restores the convergence rate
of uncompressed SGD for any compressor that keeps a constant fraction of the vector's energy.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


class ErrorFeedback:
    """Residual memory, one tensor per key (a bucket, or the flattened compressed gradient).

    The memory is created lazily, on the device and with the shape of the first gradient seen
    for a key, and is kept in float32 whatever the gradient's dtype so that small residuals of
    bfloat16/float16 gradients are not rounded away.
    """

    def __init__(self) -> None:
        self.residuals: dict[str, Tensor] = {}

    def compensate(self, key: str, grad: Tensor) -> Tensor:
        """Return ``p = g + e`` for ``key`` (``g`` in float32 if there is no residual yet)."""
        residual = self.residuals.get(key)
        grad32 = grad.to(torch.float32)
        if residual is None:
            return grad32.clone() if grad32.data_ptr() == grad.data_ptr() else grad32
        if residual.shape != grad.shape:
            raise ValueError(
                f"error-feedback residual for {key!r} has shape {tuple(residual.shape)} but the gradient has "
                f"shape {tuple(grad.shape)}; the model changed: call reset() first"
            )
        return grad32 + residual

    def update(self, key: str, compensated: Tensor, sent: Tensor) -> None:
        """Store ``e = p − Δ`` (``compensated`` is ``p``, ``sent`` the decoded ``Δ``)."""
        residual = self.residuals.get(key)
        if residual is None or residual.shape != compensated.shape:
            self.residuals[key] = compensated.to(torch.float32) - sent.to(torch.float32)
        else:
            torch.sub(compensated, sent, out=residual)

    def reset(self, key: str | None = None) -> None:
        """Forget the residual of ``key``, or all residuals."""
        if key is None:
            self.residuals.clear()
        else:
            self.residuals.pop(key, None)

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.residuals.items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        for key, value in state.items():
            if not isinstance(value, Tensor):
                raise TypeError(
                    f"error-feedback state for {key!r} must be a tensor, got {type(value).__name__}"
                )
        self.residuals = {k: v.detach().clone().to(torch.float32) for k, v in state.items()}
