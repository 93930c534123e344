"""Small learnable models and a deterministic data set for the Trainer tests."""

from __future__ import annotations

import math

import torch
from lightning_ns import pl
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def teacher_dataset(n: int = 2048, dim: int = 16, classes: int = 4, seed: int = 0) -> TensorDataset:
    """Inputs from N(0, 1), labels from a fixed random linear teacher: learnable, deterministic."""
    w = torch.randn(dim, classes, generator=torch.Generator().manual_seed(1234))  # one teacher for all splits
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    y = (x @ w).argmax(dim=1)
    return TensorDataset(x, y)


class ToyClassifier(pl.LightningModule):
    def __init__(
        self,
        dim: int = 16,
        hidden: int = 128,
        classes: int = 4,
        lr: float = 0.1,
        momentum: float = 0.0,
        batch_size: int = 32,
        n: int = 2048,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, classes),
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)

    def train_dataloader(self):
        return DataLoader(
            teacher_dataset(self.hparams.n, self.hparams.dim, self.hparams.classes),
            shuffle=True,
            batch_size=self.hparams.batch_size,
        )

    @torch.no_grad()
    def accuracy(self) -> float:
        ds = teacher_dataset(1024, self.hparams.dim, self.hparams.classes, seed=1)
        x, y = ds.tensors
        return (self(x).argmax(1) == y).float().mean().item()


def flat_params(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


class BadLossAt(ToyClassifier):
    """Rank ``bad_rank``'s loss is multiplied by ``factor`` at optimizer step(s) ``bad_step``.

    ``factor=math.nan`` gives NaN gradients, ``math.inf`` the Inf of a float16 overflow.
    """

    def __init__(
        self, bad_step: int | tuple[int, ...] = 3, bad_rank: int = 1, factor: float = math.nan, **kw
    ):
        super().__init__(**kw)
        self.bad_steps = (bad_step,) if isinstance(bad_step, int) else tuple(bad_step)
        self.bad_rank, self.factor = bad_rank, factor

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.global_step in self.bad_steps and self.global_rank == self.bad_rank:
            loss = loss * self.factor
        return loss


def trainer_kwargs(world_size: int, **overrides):
    kw = dict(
        accelerator="cpu",
        devices=world_size,
        max_steps=20,
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    kw.update(overrides)
    return kw
