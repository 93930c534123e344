"""Every private Lightning/torch name the package touches (lightning_compress/_compat.py), pinned.

Each test first asserts the private name itself, with the shape the package relies on, so that a
Lightning or torch release that renames or reshapes it fails here, by name; then that the wrapper
does its job; then that the wrapper raises ``PrivateNameMissing`` naming it when it is gone.
Lightning names are checked in both namespaces (``pytorch_lightning`` and ``lightning.pytorch``).
"""

from __future__ import annotations

import importlib
import inspect
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from launch import init_process_group, run_distributed

from lightning_compress import _compat
from lightning_compress._compat import PrivateNameMissing

NAMESPACES = ("pytorch_lightning", "lightning.pytorch")


@pytest.fixture(params=NAMESPACES)
def ns(request):
    return importlib.import_module(request.param)


def _trainer(ns, **kwargs):
    kw = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    kw.update(kwargs)
    return ns.Trainer(**kw)


def _compressed_ddp(ns):
    if ns.__name__ == "pytorch_lightning":
        from lightning_compress import CompressedDDP
    else:
        from lightning_compress.lightning import CompressedDDP
    return CompressedDDP


def _loud(excinfo, name):
    """The error names the private name and the installed torch version."""
    message = str(excinfo.value)
    assert name in message and f"torch {torch.__version__}" in message, message


# -- Lightning's loops ----------------------------------------------------------------------------
def test_sigterm_broadcast_is_called_by_the_epoch_loop_and_replaced(ns):
    trainer = _trainer(ns)
    loop = trainer.fit_loop.epoch_loop
    method = type(loop)._broadcast_sigterm_tensor
    assert list(inspect.signature(method).parameters) == ["self"]
    # replacing it only helps while Lightning calls it before each batch
    assert "self._broadcast_sigterm_tensor()" in inspect.getsource(type(loop).advance)

    calls = []
    _compat.replace_sigterm_broadcast(trainer, lambda: calls.append(1))
    loop._broadcast_sigterm_tensor()
    assert calls == [1]
    assert type(loop)._broadcast_sigterm_tensor is method  # replaced on this loop only

    gone = SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace()))
    with pytest.raises(PrivateNameMissing) as excinfo:
        _compat.replace_sigterm_broadcast(gone, lambda: None)
    _loud(excinfo, "_broadcast_sigterm_tensor")

    class Renamed:  # a release that still broadcasts the flag, under another name
        def advance(self):
            self._broadcast_sigterm_flag()

    renamed = SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=Renamed()))
    with pytest.raises(PrivateNameMissing):
        _compat.replace_sigterm_broadcast(renamed, print)

    class Older:  # a release before the per-batch broadcast: nothing to replace
        def advance(self):
            self.batch_progress.increment_ready()

    older = SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=Older()))
    assert _compat.replace_sigterm_broadcast(older, print) is False


def test_closure_and_its_result_mark_a_step_skipped(ns):
    module = importlib.import_module(f"{ns.__name__}.loops.optimization.automatic")
    closure_type, result_type = _compat.closure_types(ns)
    assert (closure_type, result_type) == (module.Closure, module.ClosureResult)
    assert "closure_loss" in inspect.signature(result_type).parameters

    closure = closure_type(step_fn=lambda: pytest.fail("a skipped closure must not run"))
    assert "_result" in vars(closure)  # set by AbstractClosure.__init__, read by consume_result
    assert _compat.mark_closure_skipped(closure) is True
    result = closure.consume_result()  # what Lightning's loop does after optimizer.step
    assert isinstance(result, result_type) and result.loss is None and result.closure_loss is None

    assert _compat.mark_closure_skipped(lambda: None) is False  # manual optimization: not Lightning's
    with pytest.raises(PrivateNameMissing) as excinfo:
        _compat.closure_types("no_such_lightning")
    _loud(excinfo, "no_such_lightning.loops.optimization.automatic")


def test_logger_connector_says_whether_this_step_logs(ns):
    trainer = _trainer(ns, log_every_n_steps=50)
    connector = trainer._logger_connector
    assert isinstance(inspect.getattr_static(type(connector), "should_update_logs"), property)
    assert "trainer.log_every_n_steps" in inspect.getsource(type(connector).should_update_logs.fget)
    assert _compat.should_update_logs(trainer) is True  # no loop running: Lightning logs
    assert _compat.should_update_logs(_trainer(ns, log_every_n_steps=0)) is False  # logging off

    with pytest.raises(PrivateNameMissing) as excinfo:
        _compat.should_update_logs(SimpleNamespace())
    _loud(excinfo, "_logger_connector.should_update_logs")


# -- Lightning's strategies -----------------------------------------------------------------------
def test_ddp_strategy_keeps_its_comm_hook_arguments(ns):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    hook = default_hooks.fp16_compress_hook
    strategy = ns.strategies.DDPStrategy(ddp_comm_hook=hook)
    for name in _compat.DDP_COMM_OPTIONS:
        assert f"_{name}" in vars(strategy), name
        assert name in inspect.signature(ns.strategies.DDPStrategy).parameters, name
    options = _compat.ddp_comm_options(strategy)
    assert options == {
        "ddp_comm_hook": hook,
        "ddp_comm_state": None,
        "ddp_comm_wrapper": None,
        "model_averaging_period": None,
    }
    assert set(_compat.ddp_comm_options(ns.strategies.DDPStrategy()).values()) == {None}

    with pytest.raises(PrivateNameMissing) as excinfo:
        _compat.ddp_comm_options(object())
    _loud(excinfo, "object._ddp_comm_hook")


def test_strategy_launcher_and_start_method(ns):
    launcher_type = _compat.multiprocessing_launcher(ns)
    for name in ("ddp_spawn", "ddp_compressed_spawn"):
        trainer = ns.Trainer(accelerator="cpu", devices=2, strategy=name, logger=False)
        strategy = trainer.strategy
        assert "_launcher" in vars(strategy) and "_start_method" in vars(strategy)
        assert _compat.strategy_start_method(strategy) == "spawn"
        launcher = _compat.strategy_launcher(strategy)
        assert isinstance(launcher, launcher_type), type(launcher)
    # CompressedDDP swaps in its own launcher, which brings rank 0's counters back
    assert type(launcher) is _compressed_ddp(ns)._spawn_launcher
    replacement = object()
    _compat.set_strategy_launcher(strategy, replacement)
    assert _compat.strategy_launcher(strategy) is replacement

    for fn in (_compat.strategy_launcher, _compat.strategy_start_method):
        with pytest.raises(PrivateNameMissing) as excinfo:
            fn(object())
        _loud(excinfo, "object._")


def test_ddp_strategy_methods_compressed_ddp_overrides_are_called_by_lightning(ns):
    ddp = ns.strategies.DDPStrategy
    for name in _compat.STRATEGY_OVERRIDES:
        assert callable(vars(ddp).get(name)), name
        assert list(inspect.signature(getattr(ddp, name)).parameters) == ["self"], name
    assert "self._register_ddp_hooks()" in inspect.getsource(ddp)
    connector = importlib.import_module(f"{ns.__name__}.trainer.connectors.accelerator_connector")
    assert "self.strategy._configure_launcher()" in inspect.getsource(connector)
    _compat.check_strategy_overrides(_compressed_ddp(ns))

    with pytest.raises(PrivateNameMissing) as excinfo:
        _compat.check_strategy_overrides(ns.strategies.SingleDeviceStrategy)
    _loud(excinfo, f"{ns.__name__}.strategies.DDPStrategy._register_ddp_hooks")


def test_multiprocessing_launcher_returns_results_to_the_main_process(ns):
    module = importlib.import_module(f"{ns.__name__}.strategies.launchers.multiprocessing")
    launcher = _compat.multiprocessing_launcher(ns.__name__)
    assert launcher is module._MultiProcessingLauncher
    assert list(inspect.signature(launcher.__init__).parameters) == ["self", "strategy", "start_method"]
    assert list(inspect.signature(launcher.get_extra_results).parameters) == ["self", "trainer"]
    assert list(inspect.signature(launcher.update_main_process_results).parameters) == [
        "self",
        "trainer",
        "extra",
    ]
    assert issubclass(_compressed_ddp(ns)._spawn_launcher, launcher)

    with pytest.raises(PrivateNameMissing) as excinfo:
        _compat.multiprocessing_launcher("no_such_lightning")
    _loud(excinfo, "no_such_lightning.strategies.launchers.multiprocessing._MultiProcessingLauncher")


def test_reexported_private_imports(ns):
    from lightning_fabric.strategies.registry import _StrategyRegistry
    from lightning_fabric.utilities.types import _PATH

    assert _compat._StrategyRegistry is _StrategyRegistry and _compat._PATH is _PATH
    assert set(typing.get_args(_PATH)) == {str, Path}
    assert _compat._MultiProcessingLauncher is _compat.multiprocessing_launcher("pytorch_lightning")
    # each namespace's registry is its fabric's _StrategyRegistry: a dict with register(..., **init_params)
    registry = ns.strategies.StrategyRegistry
    assert type(registry).__name__ == "_StrategyRegistry" and isinstance(registry, dict)
    params = inspect.signature(type(registry).register).parameters
    assert list(params)[:4] == ["self", "name", "strategy", "description"]
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    assert "ddp_compressed" in registry and "ddp_compressed_spawn" in registry
    with pytest.raises(AttributeError):
        _compat._NoSuchName  # noqa: B018


# -- torch ----------------------------------------------------------------------------------------
def test_grad_scaler_scale_is_the_device_tensor(monkeypatch):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    assert scaler.is_enabled() and scaler._scale is None  # nothing scaled yet
    assert _compat.grad_scaler_scale(scaler) is None
    scaler.scale(torch.tensor(1.0))
    assert isinstance(scaler._scale, torch.Tensor) and scaler._scale.dtype == torch.float32
    assert _compat.grad_scaler_scale(scaler) is scaler._scale  # the tensor itself: no host sync
    assert float(_compat.grad_scaler_scale(scaler)) == scaler.get_scale() == 2.0**10
    assert _compat.grad_scaler_scale(torch.amp.GradScaler("cpu", enabled=False)) is None

    assert "_scale" in vars(torch.amp.GradScaler("cpu"))  # the pin: a rename fails here, loudly
    # a scaler without it (the user's own) is read through the public API (one host sync)
    public_only = SimpleNamespace(is_enabled=lambda: True, get_scale=lambda: 2.0**10)
    assert float(_compat.grad_scaler_scale(public_only)) == 2.0**10


def test_foreach_norm_matches_per_tensor_norms_and_keeps_nan_and_inf(monkeypatch):
    tensors = [
        torch.arange(5.0),
        torch.ones(2, 3),
        torch.tensor([float("nan")]),
        torch.tensor([float("inf")]),
    ]
    norms = torch._foreach_norm(tensors)
    assert len(norms) == len(tensors)
    found = _compat.foreach_norm(tensors)
    assert torch.equal(
        torch.stack(found[:2]), torch.stack([torch.linalg.vector_norm(t) for t in tensors[:2]])
    )
    assert found[2].isnan() and found[3].isinf()

    monkeypatch.delattr(torch, "_foreach_norm")
    with pytest.raises(PrivateNameMissing) as excinfo:
        _compat.foreach_norm(tensors)
    _loud(excinfo, "torch._foreach_norm")


def test_assert_async_raises_on_cpu_with_the_message(monkeypatch):
    torch._assert_async(torch.tensor(True), "the overload with a message")
    _compat.assert_async(torch.tensor(True), "never")
    with pytest.raises(RuntimeError, match="indices outside"):
        _compat.assert_async(torch.tensor(False), "indices outside [0, 10)")

    monkeypatch.delattr(torch, "_assert_async")
    with pytest.raises(PrivateNameMissing) as excinfo:
        _compat.assert_async(torch.tensor(True), "never")
    _loud(excinfo, "torch._assert_async")


def _store_and_gather(rank, world_size):
    init_process_group(rank, world_size)
    store = _compat.default_store()
    out = {"store_type": isinstance(store, dist.Store), "same": store is _compat.default_store()}
    if rank == 0:
        store.set("compat", "from rank 0")
    out["read"] = store.get("compat").decode()  # get waits for the key
    send = torch.full((3,), float(rank), dtype=torch.float32)
    gathered = torch.empty(3 * world_size)
    _compat.all_gather_single(gathered, send)
    out["gathered"] = gathered.tolist()
    dist.barrier()
    return out


@pytest.fixture(scope="module")
def two_ranks():
    return run_distributed(_store_and_gather, 2)


def test_default_store_is_the_process_group_s_store(two_ranks, monkeypatch):
    getter = dist.distributed_c10d._get_default_store
    assert list(inspect.signature(getter).parameters) == []
    for r in two_ranks:
        assert r["store_type"] and r["same"] and r["read"] == "from rank 0"

    monkeypatch.delattr(dist.distributed_c10d, "_get_default_store")
    with pytest.raises(PrivateNameMissing) as excinfo:
        _compat.default_store()
    _loud(excinfo, "_get_default_store")


def test_all_gather_single_gathers_in_rank_order(two_ranks, monkeypatch):
    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if version >= (2, 10):
        assert _compat._ALL_GATHER_SINGLE is dist.all_gather_single
    params = list(inspect.signature(_compat._ALL_GATHER_SINGLE).parameters)
    assert params[:3] == ["output_tensor", "input_tensor", "group"] and "async_op" in params
    for r in two_ranks:
        assert r["gathered"] == [0.0] * 3 + [1.0] * 3

    monkeypatch.setattr(_compat, "_ALL_GATHER_SINGLE", None)
    with pytest.raises(PrivateNameMissing) as excinfo:
        _compat.all_gather_single(torch.empty(2), torch.empty(1))
    _loud(excinfo, "all_gather_single")
