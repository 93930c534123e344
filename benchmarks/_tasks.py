"""The benchmark's training tasks: a communication-heavy MLP and scikit-learn's digits.

Every task is a LightningModule with the same protocol:

- ``train_dataloader()``: the training stream (Lightning shards it over ranks);
- ``evaluate(state_dict) -> float``: held-out accuracy of a parameter snapshot, computed after
  training, so evaluation never pauses the ranks (a pause would let asynchronous methods finish
  their communication for free) and never communicates;
- ``momentum``: the optimizer's momentum (Sketched SGD keeps its own and sets this to 0).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

TEACHER_SEED = 1234


def teacher_data(n: int, seed: int, dim: int = 64, classes: int = 10) -> TensorDataset:
    """Gaussian inputs labelled by a fixed random linear teacher: learnable, deterministic, offline."""
    w = torch.randn(dim, classes, generator=torch.Generator().manual_seed(TEACHER_SEED))
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    return TensorDataset(x, (x @ w).argmax(dim=1))


class _Task(pl.LightningModule):
    def __init__(self, lr: float, momentum: float, batch_size: int) -> None:
        super().__init__()
        self.lr = lr
        self.momentum = momentum
        self.batch_size = batch_size
        self.net: nn.Module = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        # no self.log(sync_dist=True): logging would add collectives the methods do not need
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)

    def held_out(self) -> TensorDataset:
        raise NotImplementedError

    def final_set(self) -> TensorDataset:
        """The held-out set for the final accuracy (larger where data allows: less sampling noise)."""
        return self.held_out()

    @torch.no_grad()
    def evaluate(self, state: dict[str, Tensor], final: bool = False) -> float:
        was_training = self.training
        current = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        self.net.load_state_dict(state)
        self.eval()
        x, y = (self.final_set() if final else self.held_out()).tensors
        correct = sum(
            int((self(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(512), y.split(512), strict=True)
        )
        self.net.load_state_dict(current)
        self.train(was_training)
        return correct / len(y)


class TeacherMLP(_Task):
    """MLP 64→2048→2048→10 (4.35 M parameters) on a linear-teacher task: cheap compute, heavy traffic."""

    def __init__(
        self,
        lr: float = 0.02,
        momentum: float = 0.9,
        batch_size: int = 64,
        hidden: int = 2048,
        n_train: int = 65536,
    ) -> None:
        super().__init__(lr, momentum, batch_size)
        self.n_train = n_train
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            teacher_data(self.n_train, seed=0), batch_size=self.batch_size, shuffle=True, drop_last=True
        )

    def held_out(self) -> TensorDataset:
        return teacher_data(4096, seed=1)

    def final_set(self) -> TensorDataset:
        # 16k samples: a standard error of ~0.25 points at 88 % accuracy
        return teacher_data(16384, seed=2)


def _digits(split: str) -> TensorDataset:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(y))
    idx = perm[:cut] if split == "train" else perm[cut:]
    return TensorDataset(x[idx], torch.tensor(y)[idx])


def _digits_source() -> tuple[Any, Any, str]:
    """The package's digits example (CNN and split) when importable, else this module's copy."""
    try:
        from lightning_compress.examples.digits import DigitsCNN, load_digits_split

        return (lambda: DigitsCNN().net), load_digits_split, "lightning_compress.examples.digits"
    except ImportError:
        return None, _digits, "benchmarks/_tasks.py (the CNN of examples/digits.py)"


class Digits(_Task):
    """The examples' real task: scikit-learn's 8x8 digits (1,797 images, offline), a small CNN."""

    def __init__(self, lr: float = 0.05, momentum: float = 0.9, batch_size: int = 32) -> None:
        super().__init__(lr, momentum, batch_size)
        net, self._data, self.source = _digits_source()
        self.net = (
            net()
            if net is not None
            else nn.Sequential(
                nn.Conv2d(1, 32, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(32, 64, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(64 * 16, 128),
                nn.ReLU(),
                nn.Linear(128, 10),
            )
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self._data("train"), batch_size=self.batch_size, shuffle=True, drop_last=True)

    def held_out(self) -> TensorDataset:
        return self._data("val")


class TinyMLP(TeacherMLP):
    """The quick mode's model: the teacher task with a 64→256→256→10 MLP (85 k parameters)."""

    def __init__(self, lr: float = 0.05, momentum: float = 0.9, batch_size: int = 64) -> None:
        super().__init__(lr, momentum, batch_size, hidden=256, n_train=8192)


TASKS = {"mlp": TeacherMLP, "digits": Digits, "tiny": TinyMLP}
