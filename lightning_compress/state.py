"""Declared per-rank state: each component lists its state once, and the rest follows.

In the spirit of torchmetrics' ``Metric.add_state``, a component declares every piece of state
it owns, once, in ``__init__``:

- :meth:`DeclaredState.add_state`: per-rank state that goes into checkpoints (error-feedback
  memories, counters, a schedule's reference model). :meth:`~DeclaredState.state_dict` returns
  it; :meth:`~DeclaredState.load_state_dict` *stashes* it, because Lightning loads a checkpoint
  before the model is wrapped in DDP; the owner applies it with
  :meth:`~DeclaredState.apply_restored` once it is ready (one "stash now, apply later" path for
  every component);
- :meth:`DeclaredState.add_transient`: state bound to this process (a process group, a
  generator, bound parameters, pending futures, forward hooks). Spawn pickles the strategy and
  its callbacks into the child processes; there every transient is back at its default.

So a new buffer is one line, and it is saved, restored, reset and pickled correctly without a
hand-written ``__getstate__`` or stash.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

_MISSING = object()


@dataclass(frozen=True)
class _Declared:
    default: Any
    factory: Callable[[], Any] | None
    persistent: bool
    transient: bool = False

    def fresh(self) -> Any:
        return self.factory() if self.factory is not None else copy.copy(self.default)


def detached_copy(obj: Any) -> Any:
    """``obj`` with every tensor in it replaced by a detached clone (containers are rebuilt)."""
    return apply_to_collection(obj, Tensor, lambda t: t.detach().clone())


class DeclaredState:
    """Base of every component that keeps per-rank state (see the module docstring).

    Subclasses call :meth:`add_state` / :meth:`add_transient` in ``__init__`` and override
    :meth:`_load_state` where restoring needs more than setting attributes (re-laying out memory
    for the current model, moving tensors to the model's device).
    """

    def _declarations(self) -> dict[str, _Declared]:
        found = self.__dict__.get("_declared")
        if found is None:
            found = {}
            object.__setattr__(self, "_declared", found)
        return found

    def add_state(
        self,
        name: str,
        default: Any = None,
        *,
        factory: Callable[[], Any] | None = None,
        persistent: bool = True,
    ) -> None:
        """Declare per-rank state ``name`` (set to its default now).

        Args:
            name: the attribute.
            default: its initial value, copied (shallow) for every reset.
            factory: builds the initial value instead (for containers: ``dict``, ``list``).
            persistent: saved by :meth:`state_dict` (``False``: kept across pickling, not saved).

        """
        decl = _Declared(default, factory, persistent)
        self._declarations()[name] = decl
        setattr(self, name, decl.fresh())

    def add_transient(
        self, name: str, default: Any = None, *, factory: Callable[[], Any] | None = None
    ) -> None:
        """Declare process-bound state ``name``: never saved, back at its default when pickled.

        The default is kept (and pickled) with the declaration: make it a plain value such as
        ``None``, and assign a process-bound object (a process group) after declaring.
        """
        decl = _Declared(default, factory, persistent=False, transient=True)
        self._declarations()[name] = decl
        setattr(self, name, decl.fresh())

    def reset_state(self, *names: str) -> None:
        """Put ``names`` (default: every declared name) back at their defaults."""
        declared = self._declarations()
        for name in names or tuple(declared):
            setattr(self, name, declared[name].fresh())

    # -- saving and restoring -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Every persistent declared value, tensors detached and cloned."""
        return {
            name: detached_copy(getattr(self, name))
            for name, decl in self._declarations().items()
            if decl.persistent
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Stash ``state``; :meth:`apply_restored` applies it once the owner is ready.

        Raises:
            TypeError: ``state`` is not a dict.

        """
        if not isinstance(state, dict):
            raise TypeError(f"{type(self).__name__} state must be a dict, got {type(state).__name__}")
        self._restored = dict(state) if state else None

    @property
    def pending_state(self) -> dict[str, Any] | None:
        """The loaded state that waits for :meth:`apply_restored` (``None``: none waits)."""
        return self.__dict__.get("_restored")

    @property
    def restore_pending(self) -> bool:
        """Whether a loaded state waits for :meth:`apply_restored`."""
        return self.pending_state is not None

    def apply_restored(self, *args: Any, **kwargs: Any) -> bool:
        """Apply the stashed state, if any (``args`` go to :meth:`_load_state`); whether there was one."""
        state = self.pending_state
        self._restored = None
        if state is None:
            return False
        self._load_state(state, *args, **kwargs)
        return True

    def _load_state(self, state: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        """Set every persistent declared name found in ``state`` (override to re-lay out or move)."""
        for name, decl in self._declarations().items():
            if decl.persistent and name in state:
                setattr(self, name, detached_copy(state[name]))

    # -- pickling for spawn -------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        for name, decl in self._declarations().items():
            if decl.transient:
                d[name] = decl.fresh()
        return d


__all__ = ["DeclaredState", "detached_copy"]
