"""AG-News topic classification: the text benchmark of the DQ-SGD paper (arXiv 2107.14575).

The data module reads the standard ``train.csv`` and ``test.csv`` (rows ``class,title,description``
with classes 1-4: World, Sports, Business, Sci/Tech; 120,000 training and 7,600 test rows) from
``data_dir`` and downloads them there when they are missing and the network allows.

Words (and word pairs) are hashed into a fixed number of buckets with CRC-32 (the fastText
"hashing trick"), so there is no vocabulary to build or ship, and every rank maps a word to the
same row of the embedding table without communicating.
"""

from __future__ import annotations

import csv
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_compress.examples.classifier import Classifier, check_at_least
from lightning_compress.examples.download import DatasetUnavailableError, download

__all__ = ["AGNewsClassifier", "AGNewsDataModule", "hash_tokens", "read_agnews_csv"]

BASE_URL = "https://raw.githubusercontent.com/mhjabreel/CharCnn_Keras/master/data/ag_news_csv/"
MD5 = {"train.csv": "b1a00f826fdfbd249f79597b59e1dc12", "test.csv": "d52ea96a97a2d943681189a97654912d"}
CLASSES = ("World", "Sports", "Business", "Sci/Tech")
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def read_agnews_csv(path: str | Path) -> tuple[list[str], Tensor]:
    """Texts (title and description joined) and 0-based labels of an AG-News CSV file."""
    texts, labels = [], []
    with open(path, newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if len(row) < 2 or not row[0].strip().isdigit():
                raise ValueError(
                    f"{path}:{lineno}: expected 'class,title,description' with class 1-4, got {row!r}"
                )
            label = int(row[0]) - 1
            if not 0 <= label < len(CLASSES):
                raise ValueError(f"{path}:{lineno}: class must be 1-4, got {row[0]!r}")
            # the files escape some characters with a backslash ("\$", "\\")
            texts.append(" ".join(row[1:]).replace("\\", " "))
            labels.append(label)
    return texts, torch.tensor(labels, dtype=torch.long)


def hash_tokens(text: str, num_buckets: int, ngrams: int = 2, max_tokens: int = 256) -> Tensor:
    """Lower-cased word n-grams (1..``ngrams``) hashed into ``1..num_buckets-1`` (0 pads).

    CRC-32 rather than Python's ``hash``, which is salted per process and would give every rank
    a different mapping.
    """
    words = _TOKEN.findall(text.lower())[:max_tokens]
    grams = list(words)
    for n in range(2, ngrams + 1):
        grams += [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
    ids = [zlib.crc32(g.encode()) % (num_buckets - 1) + 1 for g in grams]
    return torch.tensor(ids or [0], dtype=torch.int32)


class _HashedTexts(Dataset):
    def __init__(self, texts: Sequence[str], labels: Tensor, num_buckets: int, ngrams: int, max_tokens: int):
        self.ids = [hash_tokens(t, num_buckets, ngrams, max_tokens) for t in texts]
        self.labels = labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.ids[i], self.labels[i]


def _pad_collate(batch: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    ids = nn.utils.rnn.pad_sequence([b[0].long() for b in batch], batch_first=True, padding_value=0)
    return ids, torch.stack([b[1] for b in batch])


class AGNewsDataModule(pl.LightningDataModule):
    """AG-News from ``train.csv`` / ``test.csv``; the test set serves as validation set.

    Batches are ``(ids, labels)`` with ``ids`` a zero-padded ``(batch, length)`` tensor of hashed
    word n-grams.

    Args:
        data_dir: folder holding ``train.csv`` and ``test.csv`` (or where they are downloaded to).
        batch_size: texts per process and step.
        num_buckets: size of the hashed vocabulary; must equal the model's ``num_buckets``. More
            buckets mean fewer collisions and a larger embedding gradient to communicate.
        ngrams: longest word n-gram hashed (2 adds word pairs: about +1 point of accuracy for
            the bag-of-embeddings model, at twice the ids per text).
        max_tokens: words kept per text (AG-News texts average about 40).
        download: fetch the two files (30 MB) when missing; off (or offline), missing files
            raise :class:`DatasetUnavailableError` naming what to put where.
        num_workers: DataLoader worker processes.

    """

    base_url = BASE_URL

    def __init__(
        self,
        data_dir: str = "data/ag_news",
        batch_size: int = 64,
        num_buckets: int = 2**16,
        ngrams: int = 2,
        max_tokens: int = 256,
        download: bool = True,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_at_least("batch_size", batch_size, 1)
        check_at_least("num_buckets", num_buckets, 2)
        check_at_least("ngrams", ngrams, 1)
        check_at_least("max_tokens", max_tokens, 1)
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.num_buckets = num_buckets
        self.train_set: _HashedTexts | None = None
        self.val_set: _HashedTexts | None = None

    def _missing(self) -> list[str]:
        return [name for name in MD5 if not (self.data_dir / name).is_file()]

    def prepare_data(self) -> None:
        """Download ``train.csv`` and ``test.csv`` into ``data_dir`` if missing."""
        missing = self._missing()
        if missing and not self.hparams.download:
            raise DatasetUnavailableError(
                f"AG-News files {missing} are missing from {self.data_dir} and download=False; "
                f"download them from {self.base_url} into {self.data_dir}, or pass --data.download true"
            )
        for name in missing:
            download(self.base_url + name, self.data_dir / name, MD5[name], f"AG-News {name}")

    def setup(self, stage: str) -> None:
        missing = self._missing()
        if missing:
            raise DatasetUnavailableError(f"AG-News files {missing} are missing from {self.data_dir}")
        hp = self.hparams
        sets = [
            _HashedTexts(*read_agnews_csv(self.data_dir / name), hp.num_buckets, hp.ngrams, hp.max_tokens)
            for name in ("train.csv", "test.csv")
        ]
        self.train_set, self.val_set = sets

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        return DataLoader(
            self.train_set,
            batch_size=self.hparams.batch_size,
            shuffle=True,
            collate_fn=_pad_collate,
            num_workers=self.hparams.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None
        return DataLoader(
            self.val_set, batch_size=256, collate_fn=_pad_collate, num_workers=self.hparams.num_workers
        )


class AGNewsClassifier(Classifier):
    """Text classifier over hashed n-grams: a bag of embeddings (fastText) or a BiLSTM.

    ``encoder="bag"`` averages the n-gram embeddings (Joulin et al., arXiv 1607.01759): fast, and
    about 91% test accuracy. ``encoder="bilstm"`` runs a bidirectional LSTM over the word
    embeddings and max-pools its outputs (the DQ-SGD paper's model, arXiv 2107.14575): slower,
    more parameters outside the embedding. Use it with ``AGNewsDataModule(ngrams=1)``: word pairs
    are appended after the words, which means nothing to a sequence model.

    Args:
        num_buckets: rows of the embedding table; must equal the data module's ``num_buckets``.
        embed_dim: embedding width. The embedding (``num_buckets * embed_dim`` parameters) is
            most of the gradient: the part compression shrinks.
        encoder: ``"bag"`` or ``"bilstm"``.
        hidden: LSTM hidden size per direction (``bilstm`` only).
        lr: SGD learning rate.
        momentum: SGD momentum.
        weight_decay: L2 penalty.
        cosine: cosine learning-rate decay to 0 over ``max_epochs``.

    """

    def __init__(
        self,
        num_buckets: int = 2**16,
        embed_dim: int = 64,
        encoder: Literal["bag", "bilstm"] = "bag",
        hidden: int = 128,
        lr: float = 0.5,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        cosine: bool = True,
    ) -> None:
        super().__init__(
            num_classes=len(CLASSES), lr=lr, momentum=momentum, weight_decay=weight_decay, cosine=cosine
        )
        if encoder not in ("bag", "bilstm"):
            raise ValueError(f"encoder must be 'bag' or 'bilstm', got {encoder!r}")
        check_at_least("num_buckets", num_buckets, 2)
        if embed_dim < 1 or hidden < 1:
            raise ValueError(f"embed_dim and hidden must be >= 1, got {embed_dim} and {hidden}")
        self.save_hyperparameters()
        self.num_buckets = num_buckets
        self.encoder = encoder
        if encoder == "bag":
            self.embedding: nn.Module = nn.EmbeddingBag(num_buckets, embed_dim, mode="mean", padding_idx=0)
            self.lstm = None
            features = embed_dim
        else:
            self.embedding = nn.Embedding(num_buckets, embed_dim, padding_idx=0)
            self.lstm = nn.LSTM(embed_dim, hidden, batch_first=True, bidirectional=True)
            features = 2 * hidden
        self.net = nn.Linear(features, len(CLASSES))

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        theirs = getattr(datamodule, "num_buckets", None)
        if theirs is not None and theirs != self.num_buckets:
            raise ValueError(
                f"the model has num_buckets={self.num_buckets} but the data module hashes into {theirs}; "
                "set both to the same value (--model.num_buckets and --data.num_buckets)"
            )

    def forward(self, ids: Tensor) -> Tensor:
        if self.lstm is None:
            return self.net(self.embedding(ids))
        mask = ids != 0
        # packed, so that the backward direction starts at each text's last word, not in the padding
        lengths = mask.sum(dim=1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(
            self.embedding(ids), lengths, batch_first=True, enforce_sorted=False
        )
        out, _ = self.lstm(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])
        # max over real tokens only: padding must not win the max
        out = out.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)
        return self.net(torch.nan_to_num(out, neginf=0.0))
