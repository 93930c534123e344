"""Handwritten digits (scikit-learn's 8x8 images): the offline default example.

The data set ships inside scikit-learn (1,797 images, 10 classes), so this example trains on a
machine without internet access. It is small enough to train in under a minute on two CPU
processes, and its CNN is large enough (about 150k parameters) for compression to matter.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress.examples.classifier import Classifier, check_at_least

__all__ = ["DigitsCNN", "DigitsDataModule", "load_digits_split"]


def load_digits_split(split: str, val_fraction: float = 0.2, seed: int = 0) -> TensorDataset:
    """Return the ``"train"`` or ``"val"`` part of scikit-learn's digits as ``(N, 1, 8, 8)`` floats in [0, 1].

    The split is a fixed permutation drawn from ``seed``: identical on every rank and every run.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits example needs scikit-learn: pip install 'lightning-compress[examples]'"
        ) from err
    x, y = load_digits(return_X_y=True)
    images = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    labels = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = len(labels) - int(round(val_fraction * len(labels)))
    idx = perm[:cut] if split == "train" else perm[cut:]
    return TensorDataset(images[idx], labels[idx])


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's handwritten digits with a deterministic train/validation split.

    Args:
        batch_size: samples per process and step (the global batch is ``batch_size`` times the
            number of processes).
        val_fraction: share of the 1,797 images held out for validation, in (0, 1).
        seed: seed of the split's permutation (not of the training order, which
            ``seed_everything`` controls).
        num_workers: DataLoader worker processes; 0 is fastest for this tiny in-memory set.

    """

    def __init__(
        self, batch_size: int = 32, val_fraction: float = 0.2, seed: int = 0, num_workers: int = 0
    ) -> None:
        super().__init__()
        check_at_least("batch_size", batch_size, 1)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        check_at_least("num_workers", num_workers, 0)
        self.save_hyperparameters()
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str) -> None:
        self.train_set = load_digits_split("train", self.hparams.val_fraction, self.hparams.seed)
        self.val_set = load_digits_split("val", self.hparams.val_fraction, self.hparams.seed)

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        hp = self.hparams
        return DataLoader(self.train_set, batch_size=hp.batch_size, shuffle=True, num_workers=hp.num_workers)

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None
        return DataLoader(self.val_set, batch_size=256, num_workers=self.hparams.num_workers)


class DigitsCNN(Classifier):
    """A two-layer CNN for 8x8 digits: conv 32, conv 64, max-pool, dense ``hidden``, dense 10.

    About 150k parameters at the defaults, almost all in the first dense layer: the tensor
    that compression shrinks.

    Args:
        hidden: width of the hidden dense layer (parameters grow linearly with it).
        lr: SGD learning rate.
        momentum: SGD momentum (0 with Sketched SGD, which has its own).
        weight_decay: L2 penalty.
        cosine: cosine learning-rate decay to 0 over ``max_epochs``.

    """

    def __init__(
        self,
        hidden: int = 128,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        cosine: bool = True,
    ) -> None:
        super().__init__(num_classes=10, lr=lr, momentum=momentum, weight_decay=weight_decay, cosine=cosine)
        check_at_least("hidden", hidden, 1)
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 10),
        )
