"""Acceptance tests of the command line and the example configs.

Every algorithm config in ``examples/configs`` is parsed in-process (classes and settings), and
trained end-to-end for a few steps on 2 CPU ranks. To keep the suite fast, one pair of processes
trains all configs one after the other (``all_runs``), then a test per config checks its CSV log;
one more test launches ``python -m lightning_compress.cli`` itself (Lightning's popen launcher
starts rank 1), as a user would.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
from launch import run_distributed

pytest.importorskip("jsonargparse")
pytest.importorskip("sklearn")

from lightning_compress import CompressedDDP  # noqa: E402
from lightning_compress.callback import CommunicationMonitor  # noqa: E402
from lightning_compress.compressors import QSGD, CountSketch, NoCompression, TopK  # noqa: E402
from lightning_compress.examples import DigitsCNN, DigitsDataModule  # noqa: E402
from lightning_compress.policies import AdaptiveTopKPolicy, DQPolicy  # noqa: E402
from lightning_compress.sync import BackupWorkers, LocalSGD, OverlapLocalSGD, SlowMo, SyncSchedule  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
BASE = CONFIGS / "base.yaml"
#: configs that choose a model and data set, layered between base.yaml and an algorithm config
DATA_CONFIGS = {"cifar.yaml", "agnews.yaml"}


# config -> (strategy class, compressor class, sync class, policy class, extra flags for the fast run)
# The local-step schedules get a short period so that 4 steps include sync points.
EXPECTED = {
    "ddp.yaml": (None, None, None, None, []),
    "qsgd.yaml": (CompressedDDP, QSGD, SyncSchedule, None, []),
    "dq.yaml": (CompressedDDP, QSGD, SyncSchedule, DQPolicy, []),
    "topk.yaml": (CompressedDDP, TopK, SyncSchedule, None, []),
    "adaptive_topk.yaml": (CompressedDDP, TopK, SyncSchedule, AdaptiveTopKPolicy, []),
    "sketch.yaml": (CompressedDDP, CountSketch, SyncSchedule, None, []),
    "local_sgd.yaml": (CompressedDDP, NoCompression, LocalSGD, None, ["--trainer.strategy.sync.period", "2"]),
    "slowmo.yaml": (CompressedDDP, NoCompression, SlowMo, None, ["--trainer.strategy.sync.period", "2"]),
    "overlap.yaml": (CompressedDDP, NoCompression, OverlapLocalSGD, None, []),
    "backup.yaml": (CompressedDDP, QSGD, BackupWorkers, None, []),
}

STEPS = 4
FAST = [
    "--trainer.max_epochs", "1",
    "--trainer.limit_train_batches", str(STEPS),
    "--trainer.limit_val_batches", "1",
    "--trainer.log_every_n_steps", "1",
    "--trainer.num_sanity_val_steps", "0",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]  # fmt: skip
COMM_METRICS = ("comm/bits_sent", "comm/bits_sent_total", "comm/compression_ratio", "comm/bits_per_coord")


def _args(name: str, root: Path) -> list[str]:
    return [
        "--config", str(BASE), "--config", str(CONFIGS / name), *EXPECTED[name][4], *FAST,
        "--trainer.default_root_dir", str(root / name.removesuffix(".yaml")),
    ]  # fmt: skip


def _read_metrics(root: Path) -> list[dict[str, str]]:
    files = sorted(root.glob("lightning_logs/version_*/metrics.csv"))
    assert files, f"no metrics.csv under {root}"
    with open(files[-1], newline="") as f:
        return list(csv.DictReader(f))


def _values(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) not in (None, "")]


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    # LightningCLI warns when it gets args and sys.argv holds more (here: pytest's own arguments)
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])


def test_every_config_is_tested():
    present = {p.name for p in CONFIGS.glob("*.yaml")} - {"base.yaml"} - DATA_CONFIGS
    missing = present - set(EXPECTED)
    assert not missing, f"configs without an acceptance test: {sorted(missing)}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_parses_into_package_classes(name, tmp_path):
    from lightning_compress.cli import main

    strategy_cls, compressor_cls, sync_cls, policy_cls, _ = EXPECTED[name]
    cli = main(_args(name, tmp_path), run=False)
    strategy = cli.trainer.strategy
    assert isinstance(cli.model, DigitsCNN)
    assert isinstance(cli.datamodule, DigitsDataModule)
    assert cli.trainer.num_devices == 2
    if strategy_cls is None:  # stock DDP
        assert type(strategy).__name__ == "DDPStrategy"
    else:
        assert isinstance(strategy, strategy_cls)
        if compressor_cls is not None:
            assert isinstance(strategy.compressor, compressor_cls)
        assert isinstance(strategy.sync, sync_cls)
    monitors = [c for c in cli.trainer.callbacks if isinstance(c, CommunicationMonitor)]
    assert len(monitors) == 1
    if policy_cls is None:
        assert monitors[0].policy is None
    else:
        assert isinstance(monitors[0].policy, policy_cls)


def test_yaml_settings_reach_the_objects(tmp_path):
    from lightning_compress.cli import main

    cli = main(_args("qsgd.yaml", tmp_path), run=False)
    assert cli.trainer.strategy.compressor.bits == 4
    assert cli.trainer.strategy.comm_state.error_feedback is False
    cli = main(_args("sketch.yaml", tmp_path), run=False)
    assert cli.trainer.strategy.comm_state.momentum == 0.9
    assert cli.model.momentum == 0.0  # the sketch keeps the momentum; the optimizer must not
    cli = main([*_args("dq.yaml", tmp_path), "--monitor.policy.mean_bits", "3"], run=False)
    assert cli.trainer.callbacks and any(
        isinstance(c, CommunicationMonitor) and c.policy.mean_bits == 3.0 for c in cli.trainer.callbacks
    )


def test_flags_alone_build_the_strategy(tmp_path):
    from lightning_compress.cli import main

    cli = main(
        [
            "--trainer.devices", "2", "--trainer.accelerator", "cpu",
            "--trainer.default_root_dir", str(tmp_path),
            "--trainer.strategy.compressor", "TopK", "--trainer.strategy.compressor.ratio", "0.05",
            "--trainer.strategy.sync", "SlowMo", "--trainer.strategy.sync.momentum", "0.7",
            "--trainer.strategy.process_group_backend", "gloo",
        ],
        run=False,
    )  # fmt: skip
    strategy = cli.trainer.strategy
    assert isinstance(strategy, CompressedDDP)
    assert isinstance(strategy.compressor, TopK) and strategy.compressor.ratio == 0.05
    assert isinstance(strategy.sync, SlowMo) and strategy.sync.momentum == 0.7
    assert strategy.process_group_backend == "gloo"


def test_defaults_are_the_digits_example(tmp_path):
    from lightning_compress.cli import main

    cli = main(["--trainer.devices", "2", "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert isinstance(cli.model, DigitsCNN)
    assert isinstance(cli.datamodule, DigitsDataModule)
    assert isinstance(cli.trainer.strategy, CompressedDDP)
    assert isinstance(cli.trainer.strategy.compressor, QSGD)
    assert cli.trainer.max_epochs == 10  # not Lightning's 1000
    assert cli.model.cosine and cli.model.lr == 0.05  # the same training as base.yaml


def test_bad_value_is_the_first_line_of_the_error(tmp_path, capsys):
    from lightning_compress.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([*_args("qsgd.yaml", tmp_path), "--trainer.strategy.compressor.bits", "12"], run=False)
    assert exit_info.value.code == 2
    first = capsys.readouterr().err.splitlines()[0]
    assert first == "error: bits must be an integer in 1..8, got 12"


def test_typo_in_a_strategy_argument_names_the_closest(tmp_path, capsys):
    from lightning_compress.cli import main

    with pytest.raises(SystemExit):
        main([*_args("qsgd.yaml", tmp_path), "--trainer.strategy.init_args.dimm", "0"], run=False)
    assert "dimm" in capsys.readouterr().err


def test_help_lists_the_package_classes(capsys):
    from lightning_compress.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in (
        "lightning_compress.CompressedDDP",
        "lightning_compress.examples.DigitsCNN",
        "lightning_compress.examples.ResNet18",
        "lightning_compress.examples.AGNewsDataModule",
        "--monitor.policy",
    ):
        assert name in out, name
    with pytest.raises(SystemExit):
        main(["fit", "--trainer.strategy.help", "CompressedDDP"])
    out = " ".join(capsys.readouterr().out.split())  # help text wraps lines anywhere
    assert "--trainer.strategy.compressor" in out and "arXiv 1610.02132" in out  # docstrings shown
    with pytest.raises(SystemExit):
        main(["fit", "--monitor.policy.help", "DQPolicy"])
    assert "mean_bits" in capsys.readouterr().out


# -- end-to-end: every config trains on 2 ranks ------------------------------------------------
def _train_all(rank: int, world_size: int, names: list[str], root: str) -> dict[str, str | None]:
    from lightning_compress.cli import main

    errors: dict[str, str | None] = {}
    for name in names:
        try:
            main(["fit", *_args(name, Path(root))])
            errors[name] = None
        except Exception:
            errors[name] = traceback.format_exc()
    return errors


@pytest.fixture(scope="module")
def all_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_runs")
    names = sorted(EXPECTED)
    per_rank = run_distributed(_train_all, 2, names, str(root), timeout=360)
    return root, per_rank


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_trains_on_two_ranks_and_logs_comm_metrics(all_runs, name):
    root, per_rank = all_runs
    for rank, errors in enumerate(per_rank):
        assert errors[name] is None, f"rank {rank} failed on {name}:\n{errors[name]}"
    run_dir = root / name.removesuffix(".yaml")
    rows = _read_metrics(run_dir)
    header = set(rows[0])
    for key in (*COMM_METRICS, "train_loss", "val_acc"):
        assert key in header, f"{name}: {key} missing from metrics.csv ({sorted(header)})"
    assert len(_values(rows, "comm/bits_sent")) == STEPS, name
    totals = _values(rows, "comm/bits_sent_total")
    assert totals == sorted(totals), f"{name}: bits_sent_total must not decrease"
    if name != "backup.yaml":  # with 1 of 2 gradients per step, rank 0 may be late at every step
        assert totals[-1] > 0, f"{name}: nothing sent in {STEPS} steps"
    ratios = [r for r in _values(rows, "comm/compression_ratio") if r > 0]
    if name == "ddp.yaml":
        assert ratios and all(abs(r - 1.0) < 1e-3 for r in ratios), ratios  # float32, up to ring padding
    elif name in ("qsgd.yaml", "dq.yaml", "topk.yaml", "adaptive_topk.yaml", "sketch.yaml"):
        assert ratios and min(ratios) > 1.5, f"{name}: compression ratios {ratios}"
    if name == "dq.yaml":
        widths = _values(rows, "comm/bit_width")
        assert widths and all(2 <= w <= 8 for w in widths), widths
    if name == "adaptive_topk.yaml":
        assert _values(rows, "comm/topk_k"), "adaptive Top-K logs its K"
    checkpoints = list(run_dir.glob("lightning_logs/version_*/checkpoints/*.ckpt"))
    assert checkpoints, f"{name}: no checkpoint written"
    assert list(run_dir.glob("lightning_logs/version_*/config.yaml")), f"{name}: config not saved"


def test_module_entry_point_launches_rank_1_itself(tmp_path):
    """``python -m lightning_compress.cli fit`` as a user runs it: Lightning starts rank 1."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for key in ("LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(key, None)
    cmd = [
        sys.executable, "-m", "lightning_compress.cli", "fit",
        "--config", str(BASE), "--config", str(CONFIGS / "dq.yaml"),
        "--trainer.devices", "2", *FAST, "--trainer.default_root_dir", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in output
    assert "compression ratio" in output  # the monitor's summary table
    rows = _read_metrics(tmp_path)
    assert _values(rows, "comm/bit_width")
