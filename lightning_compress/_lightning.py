"""Both Lightning namespaces from one install: ``pytorch_lightning`` and ``lightning.pytorch``.

The two are separate copies of the same code: a ``lightning.pytorch.Trainer`` accepts only
``lightning.pytorch`` strategies and callbacks, and its loops raise ``lightning.pytorch``'s
exceptions. The package's classes are written once, namespace-free, and given a Lightning base
class per namespace (``lightning_compress`` for ``pytorch_lightning``,
``lightning_compress.lightning`` for ``lightning.pytorch``). Code that must name a Lightning class
at run time asks here for the one of the namespace in use, and never imports a namespace the user
did not load.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

#: the importable names of Lightning's trainer package, the package's dependency first
NAMESPACES = ("pytorch_lightning", "lightning.pytorch")


def loaded_namespaces() -> list[ModuleType]:
    """The Lightning namespaces imported in this process (a trainer can only come from one of them)."""
    return [sys.modules[name] for name in NAMESPACES if name in sys.modules]


def namespace_of(obj: Any) -> ModuleType:
    """The Lightning namespace ``obj``'s class comes from (``pytorch_lightning`` if none)."""
    return namespace_of_type(type(obj))


def namespace_of_type(cls: type) -> ModuleType:
    """The Lightning namespace ``cls`` or one of its bases comes from (``pytorch_lightning`` if none)."""
    for base in cls.__mro__:
        for name in reversed(NAMESPACES):
            if base.__module__ == name or base.__module__.startswith(name + "."):
                return sys.modules[name]
    import pytorch_lightning

    return pytorch_lightning


def ddp_strategy_types() -> tuple[type, ...]:
    """``DDPStrategy`` of every loaded namespace, for ``isinstance`` checks."""
    return tuple(ns.strategies.DDPStrategy for ns in loaded_namespaces())
