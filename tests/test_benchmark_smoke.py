"""Smoke test of the network benchmark (benchmarks/netem.py --quick), run as a subprocess.

With root and ``ip netns`` the quick mode emulates a 100 Mbit/s cluster in network namespaces;
without, it falls back to unthrottled loopback. Both must pass, and the second test forces the
fallback so that path is exercised everywhere.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "netem.py"


def _quick(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "benchmarks.md"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--no-plots", *extra],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    report = out.read_text()
    assert "stock DDP (float32)" in report and "QSGD 4-bit" in report
    assert "python benchmarks/netem.py --quick" in report  # the exact command is recorded
    return json.loads((tmp_path / "benchmarks_results.json").read_text())


def _check_runs(result: dict) -> None:
    runs = {r["method"]: r for r in result["runs"]}
    assert set(runs) == {"ddp", "qsgd4"}
    for run in runs.values():
        assert len(run["reports"]) == 2
        for rep in run["reports"]:
            assert rep["status"] == "ok", rep.get("error")
            assert rep["steps"] == 16
            assert all(t > 0 for t in rep["step_times"])
            assert rep["reported"]["wire_bytes"] > 0
        assert run["reports"][0]["curve"][-1][0] == 16  # a final accuracy snapshot at the last step
    floors = [f for f in result["floors"] if f["parallel"] == 1]
    assert floors and floors[0]["reports"][0]["status"] == "ok"
    # the ledger sees 4-bit codes: far fewer bytes than the dense float32 gradient
    dense = runs["ddp"]["reports"][0]["reported"]["wire_bytes"]
    assert runs["qsgd4"]["reports"][0]["reported"]["wire_bytes"] < dense / 4


def test_quick_benchmark(tmp_path: Path) -> None:
    from benchmarks._cluster import stale_namespaces

    # another run's leftovers (e.g. a benchmark killed with SIGKILL) are not this run's to judge
    before = set(stale_namespaces())
    result = _quick(tmp_path)
    _check_runs(result)
    if not result["network"]["namespaces"]:
        assert all(rep["tx_bytes"] is None for run in result["runs"] for rep in run["reports"])
        pytest.skip(f"interface byte check needs network namespaces: {result['network']['why']}")
    # interface counters inside the namespaces agree with what the methods report; the tiny
    # model's small messages carry relatively more TCP/IP headers than the 4.35M-parameter MLP
    for run in result["runs"]:
        for rep in run["reports"]:
            ratio = rep["tx_bytes"] / rep["reported"]["wire_bytes"]
            assert 0.95 <= ratio <= 1.3, (run["method"], ratio)
    assert set(stale_namespaces()) <= before  # the run removed its own namespaces


def test_quick_benchmark_loopback_fallback(tmp_path: Path) -> None:
    result = _quick(tmp_path, "--loopback")
    assert result["network"]["namespaces"] is False
    _check_runs(result)
    assert "unthrottled loopback fallback" in (tmp_path / "benchmarks.md").read_text()


def test_help_documents_the_knobs() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0
    for flag in (
        "--workers",
        "--rates",
        "--methods",
        "--tasks",
        "--budget",
        "--quick",
        "--loopback",
        "--delay-ms",
    ):
        assert flag in proc.stdout


@pytest.mark.parametrize("bad", [["--rates", "fast"], ["--methods", "nonsense"]])
def test_bad_arguments_are_refused(bad: list[str]) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), *bad], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "error" in proc.stderr


def test_backup_methods_and_straggler_option():
    sys.path.insert(0, str(ROOT))
    from benchmarks._methods import get_method
    from benchmarks._netem.cli import parse_args
    from lightning_compress.sync import BackupWorkers

    strategy, _ = get_method("backup1_q4").build()
    assert isinstance(strategy.sync, BackupWorkers)
    assert strategy.sync.backups == 1 and strategy.sync.skip_late_steps is None  # automatic
    assert strategy.comm_state.compressor.bits == 4
    assert parse_args(["--straggler", "3:300"]).straggler == (3, 300.0)
    for bad in ("0:300", "3", "3:-1"):  # rank 0 measures; MS >= 0
        with pytest.raises(SystemExit):
            parse_args(["--straggler", bad])
