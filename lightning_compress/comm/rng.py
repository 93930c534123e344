"""The rounding generators: seeded per rank, on the tensors' device, restored exactly on resume."""

from __future__ import annotations

import logging

import torch
from torch import Tensor

log = logging.getLogger(__name__)


def seeded_generator(device: torch.device, seed: int, state: Tensor | None = None) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``, then set to a saved ``state`` if it fits.

    Any device's generator state can be saved (``get_state()``: 5056 bytes on CPU, 16 on CUDA,
    the Philox seed and offset) and set again, so a resumed run draws exactly what the
    uninterrupted one would have. A state saved on another kind of device has another size and
    cannot be set: the generator then keeps ``seed`` and a warning says that the rounding draws
    differ from the uninterrupted run's (unbiasedness is unaffected).

    Args:
        device: where the tensors the generator draws for live.
        seed: the seed used when there is no state to restore.
        state: a state saved by :meth:`torch.Generator.get_state`, or ``None``.

    """
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    if state is not None:
        if state.numel() == generator.get_state().numel():
            generator.set_state(state)
        else:
            log.warning(
                "lightning_compress: the saved rounding-generator state (%d bytes) was saved on another kind "
                "of device than %s; rounding restarts from the seed",
                state.numel(),
                device,
            )
    return generator


__all__ = ["seeded_generator"]
