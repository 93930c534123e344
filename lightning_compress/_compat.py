"""Every private Lightning or torch name the package touches, in one place.

Lightning and torch keep these names out of their public API, so a minor release may rename or
drop any of them. Each is reached through one small function here and nowhere else, and each is
pinned by a test in ``tests/test_compat.py`` (in both Lightning namespaces where it applies). A
name that is gone raises :class:`PrivateNameMissing` (a ``RuntimeError``) that names it and the
installed versions: never a silent default that would quietly switch a check or a feature off.

=========================================  ===================================================
function                                   private name
=========================================  ===================================================
:func:`replace_sigterm_broadcast`          ``trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor``
:func:`closure_types`,                     ``<ns>.loops.optimization.automatic.Closure`` /
:func:`mark_closure_skipped`               ``ClosureResult`` and ``Closure._result``
:func:`default_store`                      ``torch.distributed.distributed_c10d._get_default_store``
:func:`grad_scaler_scale`                  ``GradScaler._scale``
:func:`foreach_norm`                       ``torch._foreach_norm``
:func:`assert_async`                       ``torch._assert_async``
:func:`all_gather_single`                  ``dist.all_gather_single`` (torch >= 2.10), else
                                           ``dist.all_gather_into_tensor``
:func:`ddp_comm_options`                   ``DDPStrategy._ddp_comm_hook``, ``_ddp_comm_state``,
                                           ``_ddp_comm_wrapper``, ``_model_averaging_period``
:func:`should_update_logs`                 ``trainer._logger_connector.should_update_logs``
:func:`strategy_launcher`,                 ``Strategy._launcher``
:func:`set_strategy_launcher`
:func:`strategy_start_method`              ``DDPStrategy._start_method``
:func:`check_strategy_overrides`           ``DDPStrategy._register_ddp_hooks``,
                                           ``DDPStrategy._configure_launcher`` (overridden)
:func:`multiprocessing_launcher`           ``_MultiProcessingLauncher`` of
                                           ``<ns>.strategies.launchers.multiprocessing``
``_StrategyRegistry``, ``_PATH``           ``lightning_fabric``'s (re-exported, for annotations)
``_MultiProcessingLauncher``               ``pytorch_lightning``'s (re-exported)
=========================================  ===================================================

Nothing here imports a Lightning namespace the process has not loaded: the re-exports are
resolved on first access, the rest at call time.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_compress._lightning import namespace_of, namespace_of_type

#: the DDPStrategy arguments the package's hook cannot share the exchange with (stored as ``_<name>``)
DDP_COMM_OPTIONS = ("ddp_comm_hook", "ddp_comm_state", "ddp_comm_wrapper", "model_averaging_period")
#: the private ``DDPStrategy`` methods ``CompressedDDP`` overrides (Lightning calls them itself)
STRATEGY_OVERRIDES = ("_register_ddp_hooks", "_configure_launcher")


class PrivateNameMissing(RuntimeError):
    """A private Lightning or torch name the package relies on is gone from the installed version."""


def _versions(namespace: str | ModuleType | None) -> str:
    found = [f"torch {torch.__version__}"]
    if namespace is not None:
        name = namespace if isinstance(namespace, str) else namespace.__name__
        module = sys.modules.get(name)
        found.append(f"{name} {getattr(module, '__version__', 'not loaded')}")
    return ", ".join(found)


_CLOSURE = "backup workers skip a straggler's closure"


def _missing(name: str, needed_for: str, namespace: str | ModuleType | None = None) -> PrivateNameMissing:
    return PrivateNameMissing(
        f"lightning_compress relies on the private name {name} ({needed_for}), which the installed "
        f"{_versions(namespace)} does not have: this version is not supported yet; install the version "
        "the package was tested with (pyproject.toml) and report the change"
    )


# -- Lightning's loops ----------------------------------------------------------------------------
def replace_sigterm_broadcast(trainer: Any, fn: Callable[[], None]) -> bool:
    """Make the training epoch loop call ``fn()`` where it broadcasts Lightning's SIGTERM flag.

    Lightning's ``_TrainingEpochLoop.advance`` calls ``self._broadcast_sigterm_tensor()`` before
    every batch on more than one rank (a broadcast from rank 0 that every rank waits in). Backup
    workers replace it with a store flag, which does not wait for the slowest rank.

    Lightning releases from before that broadcast have no such call in
    ``advance``: there is nothing to replace, and this returns ``False``.

    Returns:
        Whether the broadcast was replaced.

    Raises:
        PrivateNameMissing: the loop has no ``_broadcast_sigterm_tensor`` but its ``advance``
            still speaks of SIGTERM (renamed), or the loop cannot be read.

    """
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    if loop is not None and not hasattr(type(loop), "_broadcast_sigterm_tensor"):
        try:
            source = inspect.getsource(type(loop).advance)
        except (AttributeError, OSError, TypeError):
            source = "sigterm"  # cannot tell: assume it is there under another name
        if "sigterm" not in source.lower():
            return False  # an older Lightning: no per-batch broadcast to replace
    if loop is None or not callable(getattr(type(loop), "_broadcast_sigterm_tensor", None)):
        owner = type(loop).__qualname__ if loop is not None else "trainer.fit_loop.epoch_loop"
        raise _missing(
            f"{owner}._broadcast_sigterm_tensor",
            "backup workers replace Lightning's per-batch SIGTERM broadcast",
            namespace_of(trainer),
        )
    loop._broadcast_sigterm_tensor = fn
    return True


def closure_types(namespace: str | ModuleType) -> tuple[type, type]:
    """``(Closure, ClosureResult)`` of ``namespace``'s automatic optimization.

    Raises:
        PrivateNameMissing: the module or either class is gone.

    """
    name = namespace if isinstance(namespace, str) else namespace.__name__
    module_name = f"{name}.loops.optimization.automatic"
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise _missing(module_name, _CLOSURE, name) from err
    closure, result = getattr(module, "Closure", None), getattr(module, "ClosureResult", None)
    if closure is None or result is None:
        raise _missing(f"{module_name}.Closure/ClosureResult", _CLOSURE, name)
    return closure, result


def mark_closure_skipped(closure: Any) -> bool:
    """Mark Lightning's automatic-optimization closure as run, without running it (a skipped step).

    Sets ``closure._result`` to what Lightning records when ``training_step`` returns ``None``:
    no loss, no outputs; Lightning's loop then consumes it as a skipped step.

    Returns:
        ``True`` if ``closure`` is Lightning's ``Closure`` (of its namespace) and was marked;
        ``False`` for anything else (manual optimization, a user's own ``optimizer_step``): the
        caller computes the closure and drops the result instead.

    Raises:
        PrivateNameMissing: Lightning's ``Closure``, ``ClosureResult`` or ``Closure._result`` is gone.

    """
    namespace = namespace_of(closure)
    closure_type, result_type = closure_types(namespace)
    if not isinstance(closure, closure_type):
        return False
    if "_result" not in vars(closure):
        raise _missing(f"{closure_type.__module__}.Closure._result", _CLOSURE, namespace)
    closure._result = result_type(closure_loss=None)
    return True


def logs_with_sync(trainer: Any) -> bool:
    """Whether the running loop holds a value logged with ``self.log(..., sync_dist=True)``.

    Reads Lightning's ``trainer._results`` (a ``_ResultCollection``: each entry's
    ``meta.sync._should``). An entry whose metadata cannot be read counts as synced, and so does
    a trainer without ``_results``: the caller (backup workers) then assumes a collective and
    stops skipping steps, the safe side.
    """
    if not hasattr(trainer, "_results"):
        return True
    results = trainer._results
    if results is None:
        return False
    for entry in results.values():
        sync = getattr(getattr(entry, "meta", None), "sync", None)
        if sync is None or getattr(sync, "_should", True):
            return True
    return False


def should_update_logs(trainer: Any) -> bool:
    """Whether Lightning writes this step's logged values (every ``log_every_n_steps``, the last step).

    Raises:
        PrivateNameMissing: the trainer has no ``_logger_connector.should_update_logs``.

    """
    connector = getattr(trainer, "_logger_connector", None)
    if connector is None or not hasattr(type(connector), "should_update_logs"):
        raise _missing(
            "trainer._logger_connector.should_update_logs",
            "CommunicationMonitor builds metrics only on steps Lightning logs",
            namespace_of(trainer),
        )
    return bool(connector.should_update_logs)


# -- Lightning's strategies -----------------------------------------------------------------------
def ddp_comm_options(strategy: Any) -> dict[str, Any]:
    """``DDPStrategy``'s communication-hook arguments (:data:`DDP_COMM_OPTIONS`) as the strategy holds them.

    Raises:
        PrivateNameMissing: the strategy stores one of them under another name.

    """
    options = {}
    for name in DDP_COMM_OPTIONS:
        if not hasattr(strategy, f"_{name}"):
            raise _missing(
                f"{type(strategy).__qualname__}._{name}",
                "CommunicationMonitor refuses a DDPStrategy that already has a communication hook",
                namespace_of(strategy),
            )
        options[name] = getattr(strategy, f"_{name}")
    return options


def strategy_launcher(strategy: Any) -> Any:
    """The strategy's launcher (``Strategy._launcher``; ``None`` where it launches nothing).

    Raises:
        PrivateNameMissing: the strategy has no ``_launcher``.

    """
    return _strategy_attribute(strategy, "_launcher", "CompressedDDP brings rank 0's counters back")


def set_strategy_launcher(strategy: Any, launcher: Any) -> None:
    """Replace the strategy's launcher (``Strategy._launcher``; see :func:`strategy_launcher`)."""
    strategy_launcher(strategy)  # raises if the name is gone
    strategy._launcher = launcher


def strategy_start_method(strategy: Any) -> str:
    """``DDPStrategy._start_method``: ``"popen"``, ``"spawn"``, ``"fork"`` or ``"forkserver"``.

    Raises:
        PrivateNameMissing: the strategy has no ``_start_method``.

    """
    return _strategy_attribute(strategy, "_start_method", "CompressedDDP starts its spawn launcher with it")


def _strategy_attribute(strategy: Any, name: str, needed_for: str) -> Any:
    if not hasattr(strategy, name):
        raise _missing(f"{type(strategy).__qualname__}.{name}", needed_for, namespace_of(strategy))
    return getattr(strategy, name)


def check_strategy_overrides(strategy_type: type) -> None:
    """Check that Lightning still defines the private methods ``CompressedDDP`` overrides.

    An override of a method Lightning renamed is never called: the hook would silently not be
    registered. Call this with the concrete strategy class (``CompressedDDP`` of either namespace).

    Raises:
        PrivateNameMissing: a name of :data:`STRATEGY_OVERRIDES` is not defined by a Lightning base.

    """
    namespace = namespace_of_type(strategy_type)
    prefix = namespace.__name__ + "."
    lightning_bases = [cls for cls in strategy_type.__mro__ if cls.__module__.startswith(prefix)]
    for name in STRATEGY_OVERRIDES:
        if not any(name in vars(cls) for cls in lightning_bases):
            raise _missing(
                f"{namespace.__name__}.strategies.DDPStrategy.{name}",
                f"{strategy_type.__name__} overrides it to install the compression hook",
                namespace,
            )


def multiprocessing_launcher(namespace: str | ModuleType = "pytorch_lightning") -> type:
    """``namespace``'s ``_MultiProcessingLauncher`` (the spawn launcher ``CompressedDDP`` extends).

    Raises:
        PrivateNameMissing: the class is gone, or lacks ``get_extra_results`` /
            ``update_main_process_results`` (how rank 0's counters come back).

    """
    name = namespace if isinstance(namespace, str) else namespace.__name__
    module_name = f"{name}.strategies.launchers.multiprocessing"
    why = "CompressedDDP's spawn launcher brings rank 0's counters back"
    try:
        launcher = importlib.import_module(module_name)._MultiProcessingLauncher
    except (ImportError, AttributeError) as err:
        raise _missing(f"{module_name}._MultiProcessingLauncher", why, name) from err
    for method in ("get_extra_results", "update_main_process_results"):
        if not callable(getattr(launcher, method, None)):
            raise _missing(f"{module_name}._MultiProcessingLauncher.{method}", why, name)
    return launcher


# -- torch ----------------------------------------------------------------------------------------
def default_store() -> dist.Store:
    """The default process group's store (``distributed_c10d._get_default_store()``).

    Raises:
        PrivateNameMissing: torch has no ``_get_default_store``.
        ValueError: (torch's) no default process group is initialized.

    """
    getter = getattr(dist.distributed_c10d, "_get_default_store", None)
    if getter is None:
        raise _missing(
            "torch.distributed.distributed_c10d._get_default_store",
            "backup workers meet through the process group's store",
        )
    return getter()


def grad_scaler_scale(scaler: Any) -> Tensor | None:
    """The loss scale of an enabled ``torch.amp.GradScaler`` as its device tensor (no host sync).

    Read from ``GradScaler._scale``: the public ``get_scale()`` returns a Python float, a device
    sync per step.

    A scaler without ``_scale`` (another torch, or a scaler of the user's own with the public
    API only) is read through ``get_scale()``: correct, at one host sync per step (the public API
    is a fallback, not a silent switch-off; ``tests/test_compat.py`` pins ``_scale`` itself).

    Returns:
        The scale tensor (float32; on the scaler's device, or the CPU when read through
        ``get_scale()``), or ``None`` for a disabled scaler or before the first
        ``scaler.scale(loss)``.

    """
    if not scaler.is_enabled():
        return None
    if not hasattr(scaler, "_scale"):
        return torch.tensor(float(scaler.get_scale()), dtype=torch.float32)
    scale = scaler._scale
    return scale if isinstance(scale, Tensor) else None


def foreach_norm(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The 2-norm of each tensor in one fused pass (``torch._foreach_norm``); NaN and Inf propagate.

    Raises:
        PrivateNameMissing: torch has no ``_foreach_norm``.

    """
    fn = getattr(torch, "_foreach_norm", None)
    if fn is None:
        raise _missing("torch._foreach_norm", "one fused pass checks the gradients for NaN/Inf")
    return list(fn(list(tensors)))


def assert_async(condition: Tensor, message: str) -> None:
    """Fail if the one-element ``condition`` is false, in stream order, without a host sync.

    ``torch._assert_async``: on CPU it raises ``RuntimeError(message)`` at once; on CUDA a
    device-side assert fails the context at the next synchronizing call.

    Raises:
        PrivateNameMissing: torch has no ``_assert_async``.

    """
    fn = getattr(torch, "_assert_async", None)
    if fn is None:
        raise _missing("torch._assert_async", "received Top-K indices are checked without a host sync")
    fn(condition, message)


_ALL_GATHER_SINGLE = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)


def all_gather_single(output: Tensor, input: Tensor, group: Any = None, async_op: bool = False) -> Any:
    """Gather ``input`` of every rank into ``output`` (``world × input.numel()``), in rank order.

    torch >= 2.10 names it ``all_gather_single`` and deprecates ``all_gather_into_tensor``; this
    calls whichever the installed torch has.

    Raises:
        PrivateNameMissing: torch has neither.

    """
    if _ALL_GATHER_SINGLE is None:
        raise _missing(
            "torch.distributed.all_gather_single/all_gather_into_tensor", "compressed payloads are gathered"
        )
    return _ALL_GATHER_SINGLE(output, input, group=group, async_op=async_op)


# -- re-exported private imports (resolved on first access) ---------------------------------------
_REEXPORTS = {
    "_StrategyRegistry": ("lightning_fabric.strategies.registry", "_StrategyRegistry"),
    "_PATH": ("lightning_fabric.utilities.types", "_PATH"),
}


def __getattr__(name: str) -> Any:
    if name == "_MultiProcessingLauncher":
        return multiprocessing_launcher("pytorch_lightning")
    if name in _REEXPORTS:
        module_name, attr = _REEXPORTS[name]
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            why = "CompressedDDP's annotations"
            raise _missing(f"{module_name}.{attr}", why, "pytorch_lightning") from err
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DDP_COMM_OPTIONS",
    "STRATEGY_OVERRIDES",
    "PrivateNameMissing",
    "all_gather_single",
    "assert_async",
    "check_strategy_overrides",
    "closure_types",
    "ddp_comm_options",
    "default_store",
    "foreach_norm",
    "grad_scaler_scale",
    "mark_closure_skipped",
    "multiprocessing_launcher",
    "replace_sigterm_broadcast",
    "set_strategy_launcher",
    "should_update_logs",
    "strategy_launcher",
    "strategy_start_method",
]
