"""CIFAR-10 data module and ResNet-18 on tiny fixture files in the real format (pickled batches)."""

from __future__ import annotations

import hashlib
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from lightning_compress.examples import CIFAR10DataModule, DatasetUnavailableError, ResNet18
from lightning_compress.examples import cifar as cifar_module
from lightning_compress.examples.cifar import augment_batch, read_cifar_batch

PER_BATCH = 6


def _write_batch(path: Path, first_label: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(PER_BATCH, 3072), dtype=np.uint8)
    labels = [(first_label + i) % 10 for i in range(PER_BATCH)]
    # the same keys and layout as the files of cifar-10-python.tar.gz (bytes keys, rows of R, G, B planes)
    entry = {b"batch_label": b"fixture", b"labels": labels, b"data": data,
             b"filenames": [f"img{i}.png".encode() for i in range(PER_BATCH)]}
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)
    return data, labels


def make_cifar(root: Path) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for i, name in enumerate([*(f"data_batch_{j}" for j in range(1, 6)), "test_batch"]):
        written[name] = _write_batch(folder / name, i, seed=i)
    return written


def test_reads_the_pickled_batches(tmp_path):
    written = make_cifar(tmp_path)
    images, labels = read_cifar_batch(tmp_path / "cifar-10-batches-py" / "data_batch_2")
    data, want = written["data_batch_2"]
    assert images.dtype == torch.uint8 and images.shape == (PER_BATCH, 3, 32, 32)
    assert labels.tolist() == want
    # channel-major rows: the first 1024 bytes are the red plane, row by row
    assert images[0, 0].flatten().tolist() == data[0, :1024].tolist()
    assert images[0, 2, 31, 31].item() == data[0, 3071]

    dm = CIFAR10DataModule(data_dir=str(tmp_path), batch_size=4, download=False, num_workers=0)
    dm.prepare_data()  # files present: nothing to do, no network
    dm.setup("fit")
    assert len(dm.train_set) == 5 * PER_BATCH and len(dm.val_set) == PER_BATCH
    assert dm.val_set.tensors[1].tolist() == written["test_batch"][1]


def test_not_a_cifar_file_is_a_clear_error(tmp_path):
    path = tmp_path / "data_batch_1"
    with open(path, "wb") as f:
        pickle.dump({b"something": 1}, f)
    with pytest.raises(ValueError, match="not a CIFAR-10 batch file"):
        read_cifar_batch(path)


def test_missing_files_without_download_say_what_to_do(tmp_path):
    dm = CIFAR10DataModule(data_dir=str(tmp_path), download=False)
    with pytest.raises(DatasetUnavailableError, match="cifar-10-python.tar.gz") as err:
        dm.prepare_data()
    assert str(tmp_path) in str(err.value)


def test_offline_download_fails_loudly(tmp_path, monkeypatch):
    # nothing listens on port 9 of localhost: the same failure as a machine without internet
    monkeypatch.setattr(CIFAR10DataModule, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    dm = CIFAR10DataModule(data_dir=str(tmp_path), download=True)
    with pytest.raises(DatasetUnavailableError, match="downloading it from http://127.0.0.1:9"):
        dm.prepare_data()
    assert not list(tmp_path.rglob("*.part")), "a failed download must not leave partial files"


def _archive(tmp_path: Path) -> tuple[Path, str]:
    src = tmp_path / "src"
    make_cifar(src)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


def test_download_checks_md5_and_extracts(tmp_path, monkeypatch):
    archive, md5 = _archive(tmp_path)
    monkeypatch.setattr(CIFAR10DataModule, "url", archive.as_uri())
    data_dir = tmp_path / "data"

    monkeypatch.setattr(cifar_module, "ARCHIVE_MD5", "0" * 32)
    with pytest.raises(DatasetUnavailableError, match="MD5"):
        CIFAR10DataModule(data_dir=str(data_dir)).prepare_data()

    monkeypatch.setattr(cifar_module, "ARCHIVE_MD5", md5)
    dm = CIFAR10DataModule(data_dir=str(data_dir), num_workers=0)
    dm.prepare_data()
    assert (data_dir / "cifar-10-batches-py" / "test_batch").is_file()
    assert not (data_dir / "cifar-10-python.tar.gz").exists()
    dm.setup("fit")
    assert len(dm.train_set) == 5 * PER_BATCH


def test_augmentation_is_a_crop_of_the_padded_image_maybe_flipped():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 6, 6)
    out = augment_batch(x, padding=2)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):
        crops = [padded[i, :, dy : dy + 6, dx : dx + 6] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(-1)) for c in crops), i
    # without padding, only flips remain, and both happen
    many = x.repeat(8, 1, 1, 1)
    out = augment_batch(many, padding=0)
    flipped = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, many, strict=True)]
    kept = [torch.equal(o, xi) for o, xi in zip(out, many, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True)) and any(flipped) and any(kept)


def test_resnet18_trains_a_few_steps_on_the_fixture(tmp_path):
    make_cifar(tmp_path)
    pl.seed_everything(0)
    model = ResNet18(width=4, lr=0.05)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), batch_size=4, download=False, num_workers=0)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=3, limit_val_batches=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    assert 0.0 <= trainer.callback_metrics["val_acc"].item() <= 1.0


def test_standard_width_is_resnet18_size():
    n = sum(p.numel() for p in ResNet18().parameters())
    assert 11_000_000 < n < 11_300_000  # the CIFAR ResNet-18: 11.17M parameters
    with pytest.raises(ValueError, match="width"):
        ResNet18(width=0)


def test_cifar_config_trains_through_the_cli(tmp_path, monkeypatch):
    pytest.importorskip("jsonargparse")
    from lightning_compress.cli import main

    monkeypatch.setattr("sys.argv", ["cli"])
    make_cifar(tmp_path / "data")
    configs = Path(__file__).resolve().parents[2] / "examples" / "configs"
    cli = main([
        "fit", "--config", str(configs / "base.yaml"), "--config", str(configs / "cifar.yaml"),
        "--config", str(configs / "qsgd.yaml"),
        "--data.data_dir", str(tmp_path / "data"), "--data.download", "false", "--data.batch_size", "4",
        "--data.num_workers", "0", "--model.width", "4",
        # one process here: a single-device strategy (the QSGD settings of qsgd.yaml are replaced)
        "--trainer.strategy", "auto", "--trainer.devices", "1", "--trainer.accelerator", "cpu",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
    ])  # fmt: skip
    assert isinstance(cli.model, ResNet18) and cli.model.hparams.width == 4
    assert list(tmp_path.glob("lightning_logs/version_0/metrics.csv"))
