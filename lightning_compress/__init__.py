"""lightning_compress: communication-efficient distributed training for PyTorch Lightning.

``strategy=CompressedDDP(...)`` exchanges compressed gradients (QSGD/DQ-SGD, Top-K, Count
Sketch) or runs local-step schedules (Local SGD, SlowMo, Overlap-Local-SGD, backup workers);
``CommunicationMonitor`` logs the bits every rank really sends and adapts the bit width.
"""

from lightning_compress.callback import CommunicationMonitor
from lightning_compress.strategy import CompressedDDP, register

register()

__version__ = "0.1.0"

__all__ = ["CommunicationMonitor", "CompressedDDP", "__version__"]
