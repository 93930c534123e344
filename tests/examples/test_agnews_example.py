"""AG-News data module and text classifiers on tiny fixture files in the real CSV format."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from lightning_compress.examples import AGNewsClassifier, AGNewsDataModule, DatasetUnavailableError
from lightning_compress.examples import agnews as agnews_module
from lightning_compress.examples.agnews import hash_tokens, read_agnews_csv

# the real files quote every field, escape with backslashes and contain commas inside fields
TRAIN = (
    '"3","Wall St. Bears Claw Back Into the Black (Reuters)",'
    '"Reuters - Short-sellers, Wall Street\'s dwindling\\band of ultra-cynics, are seeing green again."\n'
    '"4","Google IPO, \\$85 a share","Search engine sets its price, and ""more"" news."\n'
    '"2","Phelps wins gold","The swimmer won again in Athens."\n'
    '"1","Talks in Gaza","Leaders met on Monday to discuss a truce."\n'
)
TEST = '''"2","Sox win the pennant","Boston beat New York."
"4","New chip","Intel ships a faster processor."
'''


def make_agnews(root: Path, copies: int = 4) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.csv").write_text(TRAIN * copies, encoding="utf-8")
    (root / "test.csv").write_text(TEST, encoding="utf-8")


def test_reads_class_title_description(tmp_path):
    make_agnews(tmp_path, copies=1)
    texts, labels = read_agnews_csv(tmp_path / "train.csv")
    assert labels.tolist() == [2, 3, 1, 0]
    assert texts[1].startswith("Google IPO,  $85 a share Search engine sets its price, and \"more\" news.")
    assert "\\" not in "".join(texts)


def test_bad_class_names_the_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('"1","a","b"\n"7","c","d"\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"train.csv:2: class must be 1-4"):
        read_agnews_csv(path)


def test_hashing_is_in_range_with_bigrams():
    ids = hash_tokens("The cat sat. The cat!", num_buckets=100, ngrams=2)
    assert ids.dtype == torch.int32
    assert len(ids) == 5 + 4  # 5 words, 4 word pairs
    assert ids.min() >= 1 and ids.max() <= 99  # 0 is padding
    assert ids[0] == ids[3]  # "the" twice, same bucket
    assert hash_tokens("", 100).tolist() == [0]
    assert len(hash_tokens("a b c d e", 100, ngrams=1, max_tokens=3)) == 3


def test_hashing_is_identical_in_every_process():
    # CRC-32, not Python's per-process salted hash(): every rank must map a word to the same row.
    # Known answer computed once; a salted hash would not reproduce it in another process.
    want = [61181, 29594, 13183, 1005, 41107, 44760, 44274, 46035, 5939]
    assert hash_tokens("Stocks rally on Wall St", 65536).tolist() == want


def test_missing_files_without_download(tmp_path):
    with pytest.raises(DatasetUnavailableError, match="train.csv"):
        AGNewsDataModule(data_dir=str(tmp_path), download=False).prepare_data()


def test_offline_download_fails_loudly(tmp_path, monkeypatch):
    monkeypatch.setattr(AGNewsDataModule, "base_url", "http://127.0.0.1:9/")
    with pytest.raises(DatasetUnavailableError, match="downloading it from http://127.0.0.1:9/"):
        AGNewsDataModule(data_dir=str(tmp_path / "d")).prepare_data()


def test_download_checks_md5(tmp_path, monkeypatch):
    src = tmp_path / "src"
    make_agnews(src)
    monkeypatch.setattr(AGNewsDataModule, "base_url", src.as_uri() + "/")
    md5 = {name: hashlib.md5((src / name).read_bytes()).hexdigest() for name in ("train.csv", "test.csv")}
    monkeypatch.setattr(agnews_module, "MD5", {**md5, "test.csv": "0" * 32})
    dest = tmp_path / "dest"
    with pytest.raises(DatasetUnavailableError, match="MD5"):
        AGNewsDataModule(data_dir=str(dest)).prepare_data()
    monkeypatch.setattr(agnews_module, "MD5", md5)
    dm = AGNewsDataModule(data_dir=str(dest), batch_size=3)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == 16 and len(dm.val_set) == 2
    ids, labels = next(iter(dm.train_dataloader()))
    assert ids.dtype == torch.int64 and ids.shape[0] == 3 and labels.shape == (3,)


@pytest.mark.parametrize("encoder,ngrams", [("bag", 2), ("bilstm", 1)])
def test_classifier_trains_a_few_steps(tmp_path, encoder, ngrams):
    make_agnews(tmp_path)
    pl.seed_everything(0)
    dm = AGNewsDataModule(data_dir=str(tmp_path), batch_size=4, num_buckets=512, ngrams=ngrams,
                          download=False)
    model = AGNewsClassifier(num_buckets=512, embed_dim=8, hidden=8, encoder=encoder, lr=0.1)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    assert "val_acc" in trainer.callback_metrics


def test_padding_does_not_change_the_prediction():
    torch.manual_seed(0)
    for encoder in ("bag", "bilstm"):
        model = AGNewsClassifier(num_buckets=50, embed_dim=4, hidden=4, encoder=encoder).eval()
        short = torch.tensor([[5, 7, 9]])
        padded = torch.tensor([[5, 7, 9, 0, 0, 0]])
        torch.testing.assert_close(model(short), model(padded))


def test_bucket_mismatch_is_a_clear_error(tmp_path):
    make_agnews(tmp_path)
    dm = AGNewsDataModule(data_dir=str(tmp_path), num_buckets=256, download=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="num_buckets=512 but the data module hashes into 256"):
        trainer.fit(AGNewsClassifier(num_buckets=512), datamodule=dm)


def test_bad_arguments():
    with pytest.raises(ValueError, match="encoder"):
        AGNewsClassifier(encoder="cnn")
    with pytest.raises(ValueError, match="num_buckets"):
        AGNewsDataModule(num_buckets=1)


def test_agnews_config_trains_through_the_cli(tmp_path, monkeypatch):
    pytest.importorskip("jsonargparse")
    from lightning_compress.cli import main

    monkeypatch.setattr("sys.argv", ["cli"])
    make_agnews(tmp_path / "data")
    configs = Path(__file__).resolve().parents[2] / "examples" / "configs"
    cli = main([
        "fit", "--config", str(configs / "base.yaml"), "--config", str(configs / "agnews.yaml"),
        "--data.data_dir", str(tmp_path / "data"), "--data.download", "false",
        "--data.num_buckets", "1024", "--model.num_buckets", "1024",
        "--trainer.strategy", "auto", "--trainer.devices", "1", "--trainer.accelerator", "cpu",
        "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path),
    ])  # fmt: skip
    assert isinstance(cli.model, AGNewsClassifier) and cli.model.num_buckets == 1024
    assert list(tmp_path.glob("lightning_logs/version_0/metrics.csv"))
