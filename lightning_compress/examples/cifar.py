"""CIFAR-10 with a ResNet-18, the image benchmark of DQ-SGD and SlowMo.

DQ-SGD (arXiv 2107.14575) and SlowMo (arXiv 1910.00643) both report CIFAR-10 results.

The data module reads the standard "python version" files (``cifar-10-batches-py/data_batch_1``
.. ``data_batch_5`` and ``test_batch``, pickled dicts of ``uint8`` rows) from ``data_dir`` and
downloads them there when they are missing and the network allows. No torchvision needed:
augmentation (random crop with 4-pixel padding, horizontal flip) runs on whole batches on the
training device.
"""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress.examples.classifier import Classifier, check_at_least
from lightning_compress.examples.download import DatasetUnavailableError, download

__all__ = ["CIFAR10DataModule", "ResNet18", "augment_batch", "read_cifar_batch"]

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
# per-channel statistics of the CIFAR-10 training set
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def read_cifar_batch(path: str | Path) -> tuple[Tensor, Tensor]:
    """One pickled CIFAR-10 batch file as ``(uint8 images (N, 3, 32, 32), int64 labels (N,))``."""
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    data = entry.get(b"data", entry.get("data"))
    labels = entry.get(b"labels", entry.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path} is not a CIFAR-10 batch file: it has no 'data' and 'labels' entries")
    images = torch.as_tensor(data, dtype=torch.uint8).reshape(-1, 3, 32, 32)
    return images, torch.as_tensor(labels, dtype=torch.long)


def augment_batch(x: Tensor, padding: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """Random crop after zero padding and random horizontal flip, per image, on ``x``'s device."""
    n, _, h, w = x.shape
    padded = nn.functional.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n, 1, 1), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (n, 1, 1), generator=generator).to(x.device)
    rows = (torch.arange(h, device=x.device).view(1, h, 1) + dy).expand(n, h, w)
    cols = (torch.arange(w, device=x.device).view(1, 1, w) + dx).expand(n, h, w)
    flip = torch.rand(n, generator=generator).to(x.device) < 0.5
    cols = torch.where(flip.view(n, 1, 1), cols.flip(-1), cols)
    batch = torch.arange(n, device=x.device).view(n, 1, 1).expand(n, h, w)
    # (n, h, w, c) gathered, then back to channels-first
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


class CIFAR10DataModule(pl.LightningDataModule):
    """CIFAR-10 from the standard pickle batches; the 10,000 test images serve as validation set.

    Args:
        data_dir: folder holding ``cifar-10-batches-py/`` (or where it is downloaded to).
        batch_size: images per process and step (the papers use 32-128 per worker).
        download: fetch the 170 MB archive when the files are missing. Off (or offline), a
            missing folder raises :class:`DatasetUnavailableError` naming what to put where.
        augment: random crops and flips on the training batches (standard for CIFAR-10; about
            +5 points of accuracy for a ResNet-18).
        num_workers: DataLoader worker processes.

    """

    url = URL

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        download: bool = True,
        augment: bool = True,
        num_workers: int = 2,
    ) -> None:
        super().__init__()
        check_at_least("batch_size", batch_size, 1)
        check_at_least("num_workers", num_workers, 0)
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self._stats = (torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1))

    @property
    def folder(self) -> Path:
        return self.data_dir / FOLDER

    def _missing(self) -> list[str]:
        return [name for name in (*TRAIN_FILES, TEST_FILE) if not (self.folder / name).is_file()]

    def prepare_data(self) -> None:
        """Download and extract the archive into ``data_dir`` if any batch file is missing."""
        missing = self._missing()
        if not missing:
            return
        if not self.hparams.download:
            raise DatasetUnavailableError(
                f"CIFAR-10 files {missing} are missing from {self.folder} and download=False; "
                f"download {self.url}, extract it into {self.data_dir}, or pass --data.download true"
            )
        archive = download(self.url, self.data_dir / "cifar-10-python.tar.gz", ARCHIVE_MD5, "CIFAR-10")
        _extract(archive, self.data_dir)
        archive.unlink()

    def setup(self, stage: str) -> None:
        missing = self._missing()
        if missing:
            raise DatasetUnavailableError(f"CIFAR-10 files {missing} are missing from {self.folder}")
        parts = [read_cifar_batch(self.folder / name) for name in TRAIN_FILES]
        self.train_set = TensorDataset(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        self.val_set = TensorDataset(*read_cifar_batch(self.folder / TEST_FILE))

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        return DataLoader(
            self.train_set,
            batch_size=self.hparams.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None
        return DataLoader(self.val_set, batch_size=512, num_workers=self.hparams.num_workers)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # uint8 travels to the device (4x fewer bytes than float); normalize and augment there
        images, labels = batch
        mean, std = (t.to(images.device) for t in self._stats)
        x = (images.float() / 255.0 - mean) / std
        if self.hparams.augment and self.trainer is not None and self.trainer.training:
            x = augment_batch(x)
        return x, labels


def _extract(archive: Path, dest: Path) -> None:
    with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
        for m in members:  # never write outside dest, whatever the archive says
            if m.name.startswith(("/", "..")) or ".." in Path(m.name).parts or not (m.isfile() or m.isdir()):
                raise ValueError(f"refusing to extract suspicious archive member {m.name!r} from {archive}")
        tar.extractall(dest, members=members)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(Classifier):
    """ResNet-18 for 32x32 images (3x3 stem, no max-pool; He et al., arXiv 1512.03385).

    At ``width=64`` this is the standard CIFAR ResNet-18 (11.2M parameters, 45 MB of float32
    gradients per step: the setting of the DQ-SGD paper). Smaller widths train faster on CPU;
    parameters grow with ``width**2``.

    Args:
        width: channels of the first stage (the stages use 1x, 2x, 4x, 8x).
        num_classes: output classes.
        lr: SGD learning rate (0.1 with batch 128 is the usual CIFAR recipe).
        momentum: SGD momentum.
        weight_decay: L2 penalty (5e-4 is the usual CIFAR recipe).
        cosine: cosine learning-rate decay to 0 over ``max_epochs``.

    """

    def __init__(
        self,
        width: int = 64,
        num_classes: int = 10,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        cosine: bool = True,
    ) -> None:
        super().__init__(
            num_classes=num_classes, lr=lr, momentum=momentum, weight_decay=weight_decay, cosine=cosine
        )
        check_at_least("width", width, 1)
        self.save_hyperparameters()
        widths = [width, 2 * width, 4 * width, 8 * width]
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        cin = width
        for i, cout in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
            cin = cout
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
        self.net = nn.Sequential(*layers)
