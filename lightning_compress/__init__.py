"""lightning_compress: communication-efficient distributed training for PyTorch Lightning.

``strategy=CompressedDDP(...)`` exchanges compressed gradients (QSGD/DQ-SGD, Top-K, Count
Sketch) or runs local-step schedules (Local SGD, SlowMo, Overlap-Local-SGD, backup workers);
``CommunicationMonitor`` logs the bits every rank really sends and adapts the bit width.
These names are for ``pytorch_lightning``; :mod:`lightning_compress.lightning` has the same for
``lightning.pytorch``.
"""

from importlib.util import find_spec

from lightning_compress.callback import CommunicationMonitor
from lightning_compress.strategy import CompressedDDP, register

register()
if find_spec("lightning") is not None:  # `import lightning as L` users: the same names, their registry
    import lightning_compress.lightning  # noqa: F401

__version__ = "0.1.0"

__all__ = ["CommunicationMonitor", "CompressedDDP", "__version__"]
