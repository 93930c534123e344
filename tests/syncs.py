"""Count host-device synchronizations: exact on CUDA, a proxy on CPU.

``with count_host_syncs(device) as syncs: ...`` counts what the block does that makes the host
wait for the device; ``syncs.count`` and ``syncs.events`` (one :class:`HostSync` each, with the op
and the innermost Python line that caused it) tell what was found; ``syncs.report()`` prints them.

On CUDA (``device="cuda"``) the count is CUDA's own: ``torch.cuda.set_sync_debug_mode("warn")``
makes every synchronizing CUDA call (a blocking device-to-host copy, a stream or device
synchronize) raise a ``UserWarning``, which is recorded (``warnings.catch_warnings(record=True)``,
every warning kept, not only the first per line). The previous mode is restored afterwards.
Warnings raised in the autograd engine's device threads (DDP comm hooks run there on CUDA) are
collected by the engine and re-raised in the thread that called ``backward()``, so they are seen.
The mode is process-wide: do not run two counters at once.

On CPU nothing synchronizes, so a proxy counts what *would* synchronize on CUDA: a
:class:`~torch.utils._python_dispatch.TorchDispatchMode` sees every aten op below autograd and
counts

* ``aten._local_scalar_dense``: ``.item()``, ``float(t)``, ``int(t)``, ``bool(t)``, ``if t:``;
* ``aten.nonzero`` (and ``argwhere``/``nonzero(as_tuple=True)``, which call it), and
  ``aten.masked_select``: their output size depends on the data;
* ``aten.index.Tensor`` and ``aten.index_put(_)`` when an index is a bool (or uint8) mask:
  ``x[mask]``, ``x[mask] = v``;
* every ``aten.unique*`` / ``aten._unique*`` op;
* ``aten.repeat_interleave.Tensor`` without ``output_size``;

plus every call to ``torch.Tensor.tolist`` (which reads the data without dispatching an op; the
method is wrapped for the duration of the block).

Limits of the proxy:

* It counts ops, not CUDA calls: it misses a sync that only a CUDA kernel makes (a CPU-to-CUDA
  copy from pageable memory, ``torch.cuda.synchronize()``, a ``non_blocking=False`` copy to the
  host of a tensor that is already on the host here), and it counts ops that torch may route to a
  non-synchronizing kernel on CUDA (a bool-mask ``index_put_`` with one scalar value). Use it to
  find and attribute syncs in package code, and the CUDA mode to measure them.
* Code that takes a CPU-only branch on purpose (Top-K's exact selection in
  ``compressors/topk.py`` reads ``int(keep.sum())`` and calls ``nonzero`` on CPU tensors only;
  CUDA runs ``torch.topk``) is counted as it runs; callers exclude it by location, with
  :meth:`HostSyncs.excluding`.
* A dispatch mode is thread-local state. torch copies it into the autograd engine's worker
  threads with the rest of the thread-local state, and CPU backward runs in the calling thread,
  so ops of a DDP comm hook are seen (``tests/test_host_syncs.py`` checks it); ops in threads
  that the block starts itself are not.
* Python scalars computed from tensors already read (``tolist()``'s output) are free, as they
  are on CUDA.
"""

from __future__ import annotations

import contextlib
import functools
import os
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_compress.compressors import QSGD, CountSketch, NoCompression, TopK
from lightning_compress.hooks import CompressionState

__all__ = ["HostSync", "HostSyncs", "count_host_syncs"]

_TORCH_DIR = os.path.dirname(torch.__file__)
_THIS_FILE = os.path.abspath(__file__)


@dataclass(frozen=True)
class HostSync:
    """One counted synchronization.

    Attributes:
        op: the aten op (``"aten._local_scalar_dense.default"``), ``"Tensor.tolist"``, or on
            CUDA the warning's message.
        frames: the Python frames that led to it, innermost last, as ``"path:line in function"``
            (torch's own frames and this module's left out).

    """

    op: str
    frames: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        """The innermost frame outside torch (the line that caused the sync), or ``"?"``."""
        return self.frames[-1] if self.frames else "?"

    def within(self, path_part: str, functions: tuple[str, ...] = ()) -> bool:
        """Whether a frame in a file whose path contains ``path_part`` (in one of ``functions``) led here."""
        for frame in self.frames:
            location, _, function = frame.rpartition(" in ")
            if path_part in location and (not functions or function in functions):
                return True
        return False


@dataclass
class HostSyncs:
    """What :func:`count_host_syncs` found: ``events`` in order, and their ``count``."""

    mode: str
    events: list[HostSync] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.events)

    def excluding(self, predicate: Callable[[HostSync], bool]) -> HostSyncs:
        """A copy without the events for which ``predicate`` is true."""
        return HostSyncs(self.mode, [e for e in self.events if not predicate(e)])

    def report(self) -> str:
        """One line per event: op and location."""
        lines = [f"{self.count} host sync(s) ({self.mode})"]
        lines += [f"  {e.op} at {e.where}" for e in self.events]
        return "\n".join(lines)


def _frames() -> tuple[str, ...]:
    keep = []
    for f in traceback.extract_stack()[:-1]:
        path = os.path.abspath(f.filename)
        if path == _THIS_FILE or path.startswith(_TORCH_DIR):
            continue
        keep.append(f"{f.filename}:{f.lineno} in {f.name}")
    return tuple(keep)


def _is_mask(index: Any) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


def _syncs_on_cuda(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether ``func`` (an aten OpOverload) makes the host wait for a CUDA device."""
    packet = func.overloadpacket.__name__
    if packet in ("_local_scalar_dense", "nonzero", "masked_select"):
        return True
    if packet in ("index", "index_put", "index_put_", "_index_put_impl_", "_unsafe_index_put"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(_is_mask(i) for i in indices or ())
    if packet.startswith(("unique", "_unique")):
        return True
    if packet == "repeat_interleave" and func._overloadname == "Tensor":
        return kwargs.get("output_size", args[1] if len(args) > 1 else None) is None
    return False


class _SyncProxyMode(TorchDispatchMode):
    def __init__(self, found: HostSyncs) -> None:
        super().__init__()
        self.found = found

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if _syncs_on_cuda(func, args, kwargs):
            self.found.events.append(HostSync(str(func), _frames()))
        return func(*args, **kwargs)


@contextlib.contextmanager
def _wrapped_tolist(found: HostSyncs) -> Iterator[None]:
    original = torch.Tensor.tolist

    @functools.wraps(original)
    def tolist(self: torch.Tensor) -> Any:
        found.events.append(HostSync("Tensor.tolist", _frames()))
        return original(self)

    torch.Tensor.tolist = tolist  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.tolist = original  # type: ignore[method-assign]


@contextlib.contextmanager
def _cuda_counter(found: HostSyncs) -> Iterator[None]:
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)
            for w in caught:
                message = str(w.message)
                if "synchroniz" in message.lower():
                    found.events.append(HostSync(message.splitlines()[0], (f"{w.filename}:{w.lineno}",)))


@contextlib.contextmanager
def count_host_syncs(device: str | torch.device | None = None) -> Iterator[HostSyncs]:
    """Count the host-device syncs of the block (see the module docstring for what is counted).

    Args:
        device: ``"cuda"`` counts real CUDA syncs with CUDA's sync debug mode; ``"cpu"`` counts
            with the op-level proxy. ``None``: CUDA when available, else the proxy.

    Yields:
        A :class:`HostSyncs`, filled when the block exits (the proxy fills it as it goes).

    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = torch.device(device).type
    if kind == "cuda":
        found = HostSyncs("cuda sync debug mode")
        with _cuda_counter(found):
            yield found
    elif kind == "cpu":
        found = HostSyncs("cpu proxy: ops that sync on cuda")
        with _wrapped_tolist(found), _SyncProxyMode(found):
            yield found
    else:
        raise ValueError(f"device must be a cuda or cpu device, got {device!r}")


# -- the training step the sync tests measure (tests/test_host_syncs.py, tests/gpu/) -----------
def hook_states() -> dict[str, CompressionState | None]:
    """One bare-hook ``CompressionState`` per codec setting, and ``None`` for stock DDP (no hook)."""
    return {
        "stock_ddp": None,
        "qsgd4": CompressionState(QSGD(bits=4)),
        "topk_ef": CompressionState(TopK(ratio=0.01), error_feedback=True),
        "topk_momentum": CompressionState(TopK(ratio=0.01), momentum=0.9),
        "sketch": CompressionState(CountSketch()),
        "none": CompressionState(NoCompression()),
    }


def hook_model() -> nn.Module:
    """The measured model: its 2048- and 4096-element weights go through the codec
    (``min_compression_size`` 1024), the rest travels dense."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    """One forward, backward (where DDP runs the comm hook) and optimizer step."""
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()
