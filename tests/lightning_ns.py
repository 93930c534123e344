"""The Lightning namespace the Trainer tests run under.

``LC_TEST_LIGHTNING=lightning`` runs them under ``lightning.pytorch`` (``import lightning as L``),
anything else (the default) under ``pytorch_lightning``. Spawned ranks inherit the variable, so
every rank of a multi-process test uses the same namespace. Tests that import from here are
marked ``namespaced`` (conftest.py); the README's test command runs them under both.
"""

import os

NAME = os.environ.get("LC_TEST_LIGHTNING", "pytorch_lightning")

if NAME in ("lightning", "lightning.pytorch"):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_compress.lightning import CommunicationMonitor, CompressedDDP
else:
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger
    from pytorch_lightning.strategies import DDPStrategy

    from lightning_compress import CommunicationMonitor, CompressedDDP

__all__ = ["NAME", "CSVLogger", "CommunicationMonitor", "CompressedDDP", "DDPStrategy", "pl"]
