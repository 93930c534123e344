"""Both Lightning namespaces from one install, and the errors a new user meets first."""

import warnings

import lightning.pytorch as L
import pytest
import pytorch_lightning as pl
import torch
from launch import run_distributed

import lightning_compress
import lightning_compress.lightning as lcl
from lightning_compress.compressors import QSGD


@pytest.mark.parametrize(
    "namespace, strategy_type, callback_type",
    [
        (pl, lightning_compress.CompressedDDP, lightning_compress.CommunicationMonitor),
        (L, lcl.CompressedDDP, lcl.CommunicationMonitor),
    ],
)
def test_each_namespace_gets_its_own_classes_and_registry_names(namespace, strategy_type, callback_type):
    assert issubclass(strategy_type, namespace.strategies.DDPStrategy)
    assert issubclass(callback_type, namespace.Callback)
    for name, start_method in (("ddp_compressed", "popen"), ("ddp_compressed_spawn", "spawn")):
        trainer = namespace.Trainer(accelerator="cpu", devices=2, strategy=name, logger=False)
        assert type(trainer.strategy) is strategy_type
        assert trainer.strategy._start_method == start_method
    strategy = strategy_type(compressor=QSGD(bits=4))
    trainer = namespace.Trainer(accelerator="cpu", devices=2, strategy=strategy, callbacks=[callback_type()])
    assert trainer.strategy.compressor.bits == 4


def test_the_other_namespace_s_strategy_is_refused_by_lightning():
    with pytest.raises(ValueError, match="lightning.pytorch.strategies.Strategy"):
        L.Trainer(accelerator="cpu", devices=2, strategy=lightning_compress.CompressedDDP())


def test_lightning_cli_of_lightning_pytorch_takes_the_package_by_name_and_class_path(tmp_path):
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

    for strategy in ("--trainer.strategy=ddp_compressed",
                     "--trainer.strategy.class_path=lightning_compress.lightning.CompressedDDP"):
        args = [
            "--trainer.accelerator=cpu", "--trainer.devices=2", strategy,
            "--trainer.callbacks+=lightning_compress.lightning.CommunicationMonitor",
            f"--trainer.default_root_dir={tmp_path}",
        ]
        cli = LightningCLI(BoringModel, BoringDataModule, args=args, run=False)
        assert type(cli.trainer.strategy) is lcl.CompressedDDP
        assert any(type(c) is lcl.CommunicationMonitor for c in cli.trainer.callbacks)


@pytest.mark.parametrize("typo, suggestion", [("compresor", "compressor"), ("bucket_cap", "bucket_cap_mb"),
                                               ("find_unused_parameter", "find_unused_parameters")])
def test_unknown_argument_names_the_closest_valid_one(typo, suggestion):
    for strategy_type in (lightning_compress.CompressedDDP, lcl.CompressedDDP):
        with pytest.raises(TypeError, match=f"'{typo}'; did you mean '{suggestion}'"):
            strategy_type(**{typo: 1})
    # every DDPStrategy and DistributedDataParallel argument is still accepted
    strategy = lightning_compress.CompressedDDP(bucket_cap_mb=5, find_unused_parameters=True)
    assert strategy._ddp_kwargs["bucket_cap_mb"] == 5


# -- one process: nothing to exchange -------------------------------------------------------------
def test_single_process_skips_the_codec_and_says_so(tmp_path):
    import lightning_ns  # the namespace of this run's Trainer tests, as models.ToyClassifier
    from models import ToyClassifier

    strategy = lightning_ns.CompressedDDP(compressor=QSGD(bits=2))
    trainer = lightning_ns.pl.Trainer(
        accelerator="cpu", devices=1, strategy=strategy, max_steps=3, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with pytest.warns(UserWarning, match="single process.*codec.*skipped"):
        trainer.fit(ToyClassifier())
    assert strategy.comm_state.ledger.steps == 0  # no hook: nothing quantized, nothing counted


# -- spawn: the main process gets rank 0's counters back ------------------------------------------
def _spawn_fit(rank, world_size):
    del rank  # this process is the "main" process of its own two-process spawn launch
    import os

    from pytorch_lightning.demos.boring_classes import BoringModel

    os.environ.pop("LOCAL_RANK", None)  # let Lightning's spawn launcher start the ranks itself
    os.environ.pop("WORLD_SIZE", None)
    strategy = lightning_compress.CompressedDDP(compressor=QSGD(bits=4), start_method="spawn")
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=5, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(BoringModel())
    ledger = strategy.comm_state.ledger
    steps = strategy.optimizer_steps
    return {"steps": ledger.steps, "bytes": ledger.total.payload_bytes, "optimizer_steps": steps}


def test_spawn_brings_the_ledger_back_to_the_main_process():
    (result,) = run_distributed(_spawn_fit, 1, timeout=180)
    assert result["steps"] == 5 and result["optimizer_steps"] == 5
    assert result["bytes"] > 0


def test_spawn_launcher_of_lightning_pytorch_returns_the_ledger_too():
    # the same launcher body on lightning.pytorch's spawn launcher (a full spawned fit under
    # lightning.pytorch once died at interpreter exit, SIGABRT in a gloo worker, after fit ended)
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    from lightning_compress.strategy import ReturnsCompressionState

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=lcl.CompressedDDP(start_method="spawn"))
    launcher = trainer.strategy.launcher
    assert isinstance(launcher, ReturnsCompressionState) and isinstance(launcher, _MultiProcessingLauncher)


def test_registry_of_lightning_is_filled_at_import():
    from lightning.pytorch.strategies import StrategyRegistry

    assert StrategyRegistry["ddp_compressed"]["strategy"] is lcl.CompressedDDP
    assert torch.distributed.is_available()
