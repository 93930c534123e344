"""Command line: Lightning's ``LightningCLI`` with this package's strategy, codecs, schedules and monitor.

Train the default example (scikit-learn's digits, offline) on two processes with 8-bit QSGD::

    python -m lightning_compress.cli fit --trainer.devices 2

Everything is configurable from YAML files (several ``--config`` merge left to right) or flags::

    python -m lightning_compress.cli fit --config examples/configs/base.yaml --config examples/configs/dq.yaml
    python -m lightning_compress.cli fit --trainer.devices 2 --trainer.strategy.compressor TopK
    python -m lightning_compress.cli fit --print_config          # the full resolved configuration
    python -m lightning_compress.cli fit --help                  # every option, with docstrings
    python -m lightning_compress.cli fit --trainer.strategy.help CompressedDDP

What this adds to a plain ``LightningCLI``:

- defaults: model ``DigitsCNN``, data ``DigitsDataModule``, strategy ``CompressedDDP`` (8-bit
  QSGD), ``seed_everything: 0``, ``max_epochs: 10``, ``log_every_n_steps: 5``;
- ``--monitor.*``: the :class:`~lightning_compress.callback.CommunicationMonitor` callback is
  always on (it logs ``comm/*`` metrics and prints the communication summary at the end of fit);
  ``--monitor.policy`` takes ``DQPolicy`` or ``AdaptiveTopKPolicy``;
- a rich progress bar, and a CSV logger (plus TensorBoard when ``tensorboard`` is installed) under
  ``default_root_dir/lightning_logs/version_N/`` when ``--trainer.logger`` is not given;
- short class names: ``QSGD``, ``TopK``, ``CountSketch``, ``LocalSGD``, ``SlowMo``, ... resolve
  without their module path, because this module imports them.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterable
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ProgressBar, RichProgressBar
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger

# Imported for their side effect too: jsonargparse lists (in --help) and resolves (from short
# names such as "QSGD") only the subclasses that have been imported.
import lightning_compress.compressors  # noqa: F401
import lightning_compress.examples  # noqa: F401
import lightning_compress.policies  # noqa: F401
import lightning_compress.sync  # noqa: F401
from lightning_compress.callback import CommunicationMonitor
from lightning_compress.strategy import CompressedDDP

__all__ = ["CompressionCLI", "main"]

DEFAULT_MODEL = "lightning_compress.examples.DigitsCNN"
DEFAULT_DATA = "lightning_compress.examples.DigitsDataModule"


class CompressionCLI(LightningCLI):
    """``LightningCLI`` with this package's defaults (see the module docstring).

    Args:
        args: arguments to parse instead of ``sys.argv[1:]`` (a list of strings, or a dict).
        run: run the subcommand (``fit``, ``validate``, ...); ``False`` only builds the objects
            (``cli.trainer``, ``cli.model``, ``cli.datamodule``) and takes no subcommand.
        **kwargs: any other :class:`~pytorch_lightning.cli.LightningCLI` argument.

    """

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", pl.LightningModule)
        kwargs.setdefault("datamodule_class", pl.LightningDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("seed_everything_default", 0)
        # Lightning's own default is 1000 epochs; the default example trains in 10
        kwargs.setdefault("trainer_defaults", {"max_epochs": 10, "log_every_n_steps": 5})
        # a rerun into an existing log directory must not fail on the saved config.yaml
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(args=args, run=run, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(CommunicationMonitor, "monitor")
        parser.set_defaults(
            {
                "model": {"class_path": DEFAULT_MODEL},
                "data": {"class_path": DEFAULT_DATA},
                "trainer.strategy": {"class_path": f"{CompressedDDP.__module__}.{CompressedDDP.__name__}"},
            }
        )

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as exc:
            # jsonargparse reports a constructor's error nested inside a page of union type
            # mismatches; the user must read the reason first, not sixty lines below
            reason = _constructor_error(exc)
            if reason is None:
                raise
            print(f"error: {reason}\n\n(where: {exc})", file=sys.stderr)
            raise SystemExit(2) from None

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        config = self._get(self.config_init, "trainer", default={})
        if "logger" not in kwargs and config.get("logger") in (None, True):
            kwargs["logger"] = default_loggers(config.get("default_root_dir"))
        callbacks = config.get("callbacks")
        if callbacks is None:
            callbacks = []
        callbacks = list(callbacks) if isinstance(callbacks, Iterable) else [callbacks]
        if config.get("enable_progress_bar", True) is not False and not any(
            isinstance(c, ProgressBar) for c in callbacks
        ):
            kwargs.setdefault("callbacks", [*callbacks, RichProgressBar()])
        return super().instantiate_trainer(**kwargs)


def _constructor_error(exc: BaseException) -> str | None:
    """The innermost reason in jsonargparse's nested "Does not validate" message, if any.

    Each level lists why every alternative type failed; the alternatives that merely have another
    type ("Expected a <class 'str'>") are noise, the last remaining line is the constructor's own
    ``ValueError``/``TypeError`` message.
    """
    reasons = [line.strip()[2:] for line in str(exc).splitlines() if line.strip().startswith("- ")]
    reasons = [r for r in reasons if not r.startswith(("Expected a ", "Does not validate"))]
    return reasons[-1] if reasons else None


def default_loggers(root_dir: str | None = None) -> list[Logger]:
    """Build a CSV logger, and a TensorBoard logger writing to the same version folder when installed.

    Both write under ``root_dir/lightning_logs/version_N/`` (``root_dir`` defaults to the working
    directory, like Lightning's own default logger): ``metrics.csv`` and the event files side by side.
    """
    root = root_dir if root_dir is not None else os.getcwd()
    csv = CSVLogger(root, name="lightning_logs")
    if not _tensorboard_available():
        return [csv]
    return [csv, TensorBoardLogger(root, name="lightning_logs", version=csv.version, default_hp_metric=False)]


def _tensorboard_available() -> bool:
    return any(importlib.util.find_spec(name) is not None for name in ("tensorboard", "tensorboardX"))


def main(args: Any = None, run: bool = True) -> CompressionCLI:
    """Entry point of ``python -m lightning_compress.cli``."""
    if importlib.util.find_spec("jsonargparse") is None:
        raise SystemExit(
            "lightning_compress.cli needs jsonargparse: pip install 'lightning-compress[cli]' "
            "(or pip install 'jsonargparse[signatures]')"
        )
    return CompressionCLI(args=args, run=run)


if __name__ == "__main__":
    main()
