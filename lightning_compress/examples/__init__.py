"""Example models and data modules, importable so that LightningCLI configs can name them.

- :mod:`~lightning_compress.examples.digits`: scikit-learn's handwritten digits (offline, the
  default of ``python -m lightning_compress.cli``) with a small CNN.
- :mod:`~lightning_compress.examples.cifar`: CIFAR-10 with a ResNet-18 (downloads 170 MB).
- :mod:`~lightning_compress.examples.agnews`: AG-News with a bag-of-embeddings or BiLSTM text
  classifier (downloads 30 MB).

Nothing here imports scikit-learn or touches the network until a data module's
``prepare_data`` / ``setup`` runs.
"""

from lightning_compress.examples.agnews import AGNewsClassifier, AGNewsDataModule
from lightning_compress.examples.cifar import CIFAR10DataModule, ResNet18
from lightning_compress.examples.classifier import Classifier
from lightning_compress.examples.digits import DigitsCNN, DigitsDataModule
from lightning_compress.examples.download import DatasetUnavailableError

__all__ = [
    "AGNewsClassifier",
    "AGNewsDataModule",
    "CIFAR10DataModule",
    "Classifier",
    "DatasetUnavailableError",
    "DigitsCNN",
    "DigitsDataModule",
    "ResNet18",
]
