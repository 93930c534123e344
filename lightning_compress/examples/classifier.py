"""The training loop the example models share: cross-entropy, accuracy, SGD with momentum."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

__all__ = ["Classifier", "check_at_least"]


def check_at_least(name: str, value: float, low: float) -> None:
    """Raise ``ValueError`` naming ``name`` and its bound unless ``value >= low``."""
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


class Classifier(pl.LightningModule):
    """A classifier trained with SGD; subclasses build ``self.net`` (inputs to logits).

    Logs ``train_loss`` every step and ``val_loss`` / ``val_acc`` (torchmetrics, averaged over
    every rank's validation shard) every epoch.

    Args:
        num_classes: number of classes.
        lr: SGD learning rate (per step, not scaled with the number of processes).
        momentum: SGD momentum. Set it to 0 with Sketched SGD, which keeps its own momentum
            inside the exchange (``CompressedDDP(momentum=0.9)``), as does momentum-corrected Top-K.
        weight_decay: L2 penalty added by the optimizer.
        cosine: anneal the learning rate to 0 over ``trainer.max_epochs`` (cosine schedule);
            off keeps it constant.

    """

    def __init__(
        self,
        num_classes: int,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        cosine: bool = False,
    ) -> None:
        super().__init__()
        check_at_least("num_classes", num_classes, 2)
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        check_at_least("weight_decay", weight_decay, 0)
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.cosine = cosine
        self.net: nn.Module = nn.Identity()
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: Any) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Any, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Any, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        # the metric object syncs its counts across ranks at epoch end; the loss needs sync_dist
        self.log("val_loss", nn.functional.cross_entropy(logits, y), sync_dist=True)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(
            self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )
        if not self.cosine:
            return optimizer
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
