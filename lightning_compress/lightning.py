"""The package for ``lightning.pytorch`` (``import lightning as L``).

``lightning`` and ``pytorch_lightning`` are two copies of the same trainer; each accepts only its
own strategies and callbacks. Take the package's classes from the namespace your ``Trainer``
comes from::

    import lightning as L
    from lightning_compress.lightning import CommunicationMonitor, CompressedDDP

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=CompressedDDP(compressor="qsgd"))

``import lightning_compress`` registers ``"ddp_compressed"`` and ``"ddp_compressed_spawn"`` with
both namespaces' strategy registries when ``lightning`` is installed, so
``L.Trainer(strategy="ddp_compressed")`` and ``LightningCLI``'s ``--trainer.strategy ddp_compressed``
work too. The classes behave exactly as :class:`lightning_compress.CompressedDDP` and
:class:`lightning_compress.CommunicationMonitor`.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

from lightning_compress._compat import multiprocessing_launcher
from lightning_compress.callback import CommunicationMonitorMixin
from lightning_compress.strategy import CompressedDDPMixin, ReturnsCompressionState

_MultiProcessingLauncher = multiprocessing_launcher("lightning.pytorch")


class _SpawnLauncher(ReturnsCompressionState, _MultiProcessingLauncher):
    pass


class CompressedDDP(CompressedDDPMixin, DDPStrategy):
    __doc__ = CompressedDDPMixin.__doc__
    _spawn_launcher = _SpawnLauncher


class CommunicationMonitor(CommunicationMonitorMixin, Callback):
    __doc__ = CommunicationMonitorMixin.__doc__


def register() -> None:
    """Register ``"ddp_compressed"`` and ``"ddp_compressed_spawn"`` with ``lightning.pytorch``'s registry."""
    CompressedDDP.register_strategies(StrategyRegistry)


register()

__all__ = ["CommunicationMonitor", "CompressedDDP", "register"]
