"""The offline default example: scikit-learn's digits."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sklearn")

from lightning_compress.examples import DigitsCNN, DigitsDataModule  # noqa: E402
from lightning_compress.examples.digits import load_digits_split  # noqa: E402


def test_split_is_deterministic_and_disjoint():
    train, val = load_digits_split("train"), load_digits_split("val")
    assert len(train) + len(val) == 1797 and len(val) == 359
    assert torch.equal(train.tensors[0], load_digits_split("train").tensors[0])
    rows = {tuple(x.flatten().tolist()) + (int(y),) for x, y in zip(*train.tensors, strict=True)}
    overlap = sum(tuple(x.flatten().tolist()) + (int(y),) in rows for x, y in zip(*val.tensors, strict=True))
    assert overlap < 5  # a handful of identical images exist in the data set itself
    assert train.tensors[0].min() >= 0 and train.tensors[0].max() <= 1
    other = load_digits_split("val", seed=1)
    assert not torch.equal(val.tensors[1], other.tensors[1])


def test_datamodule_batches():
    dm = DigitsDataModule(batch_size=16)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 8, 8) and y.shape == (16,)
    assert DigitsCNN()(x).shape == (16, 10)


def test_bad_arguments_name_the_parameter():
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataModule(val_fraction=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        DigitsDataModule(batch_size=0)
    with pytest.raises(ValueError, match="split"):
        load_digits_split("test")
    with pytest.raises(ValueError, match="lr"):
        DigitsCNN(lr=0)
    with pytest.raises(ValueError, match="momentum"):
        DigitsCNN(momentum=1.0)


def test_python_api_script_runs_on_two_processes(tmp_path):
    """``examples/digits.py``: the README's Python API, on stock DDP with the DQ policy."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "examples" / "digits.py"
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")}
    proc = subprocess.run(
        [sys.executable, str(script), "--devices", "2", "--stock-ddp", "--policy", "dq", "--epochs", "1",
         "--max-steps", "4", "--root-dir", str(tmp_path)],
        cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "compression ratio" in output  # the monitor's summary: stock DDP now sends QSGD codes
    assert "mean bit width" in output
