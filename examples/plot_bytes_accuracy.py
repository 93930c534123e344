"""Validation accuracy against the bytes each rank sent, for the example configs on digits.

Runs each algorithm config of ``examples/configs`` on top of ``base.yaml`` through the CLI (2 CPU
processes by default), reads the CSV logs the runs write (``val_acc`` per epoch,
``comm/bits_sent_total`` per step), and plots one curve per config:

    python examples/plot_bytes_accuracy.py                       # run everything, then plot
    python examples/plot_bytes_accuracy.py --no-run              # plot existing logs again
    python examples/plot_bytes_accuracy.py --configs ddp qsgd dq --epochs 5

It writes ``docs/accuracy_vs_bytes.png`` and prints a Markdown table (final accuracy, bytes,
ratio to DDP, wall time). The x axis is what one rank put on the wire, cumulative over training:
the sum of CommunicationMonitor's per-step ``comm/wire_bits``, the measure behind its
``comm/compression_ratio``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
DEFAULT_CONFIGS = [
    "ddp", "qsgd", "dq", "topk", "adaptive_topk", "sketch", "local_sgd", "slowmo", "overlap", "backup",
]  # fmt: skip
LABELS = {
    "ddp": "DDP (float32)",
    "qsgd": "QSGD 4 bits",
    "dq": "DQ-SGD (mean 4 bits)",
    "topk": "Top-K 1% + EF",
    "adaptive_topk": "adaptive Top-K (mean 1%)",
    "sketch": "Sketched SGD 1%",
    "local_sgd": "Local SGD (tau=8)",
    "slowmo": "SlowMo (tau=12, beta=0.5)",
    "overlap": "Overlap-Local-SGD (tau=2)",
    "backup": "backup workers (b=1) + QSGD 8",
}


def run_config(name: str, runs: Path, epochs: int, devices: int, timeout: float) -> float | None:
    """Train one config through the CLI into ``runs/name``; the wall time in seconds, or None if it failed."""
    out = runs / name
    cmd = [
        sys.executable, "-m", "lightning_compress.cli", "fit",
        "--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / f"{name}.yaml"),
        "--trainer.devices", str(devices), "--trainer.max_epochs", str(epochs),
        "--trainer.log_every_n_steps", "1",  # so that the last step of every epoch is in the log
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(out),
    ]  # fmt: skip
    start = time.perf_counter()
    with open(runs / f"{name}.log", "w") as log:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            print(f"  {name} did not finish within {timeout:.0f} s; see {runs / f'{name}.log'}", flush=True)
            return None
    if proc.returncode != 0:
        print(f"  {name} failed (exit {proc.returncode}); see {runs / f'{name}.log'}", flush=True)
        return None
    return time.perf_counter() - start


def read_curve(run_dir: Path) -> tuple[list[float], list[float], list[float]]:
    """At the end of every epoch: MB one rank put on the wire, MB it handed to collectives, accuracy.

    Wire bytes are the sum of the per-step ``comm/wire_bits`` (every step is logged), the measure
    behind ``comm/compression_ratio``; bytes handed to collectives are ``comm/bits_sent_total``.
    """
    files = sorted(run_dir.glob("lightning_logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))
    if not files:
        raise FileNotFoundError(f"no metrics.csv under {run_dir}")
    with open(files[-1], newline="") as f:
        rows = list(csv.DictReader(f))
    wire_total = 0.0
    wire: dict[int, float] = {}
    handed: dict[int, float] = {}
    acc: dict[int, float] = {}
    for row in sorted(rows, key=lambda r: int(r["step"])):
        epoch = int(row["epoch"])
        if row.get("comm/wire_bits"):
            wire_total += float(row["comm/wire_bits"]) / 8e6
            wire[epoch] = wire_total
        if row.get("comm/bits_sent_total"):
            handed[epoch] = max(handed.get(epoch, 0.0), float(row["comm/bits_sent_total"]) / 8e6)
        if row.get("val_acc"):
            acc[epoch] = float(row["val_acc"])
    epochs = sorted(set(wire) & set(acc))
    return [wire[e] for e in epochs], [handed[e] for e in epochs], [acc[e] for e in epochs]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "plot", help="where the runs' logs go")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "accuracy_vs_bytes.png")
    parser.add_argument("--no-run", action="store_true", help="only read the logs of earlier runs")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one run may take")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.runs.mkdir(parents=True, exist_ok=True)
    times_file = args.runs / "wall_times.json"
    seconds: dict[str, float] = json.loads(times_file.read_text()) if times_file.exists() else {}
    failed = []
    for name in args.configs:
        if not args.no_run:
            print(f"training {name} ...", flush=True)
            wall = run_config(name, args.runs, args.epochs, args.devices, args.timeout)
            if wall is None:
                failed.append(name)
                seconds.pop(name, None)
            else:
                seconds[name] = wall
            times_file.write_text(json.dumps(seconds, indent=1))

    curves = {name: read_curve(args.runs / name) for name in args.configs if name not in failed}
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, (mb, _, acc) in curves.items():
        ax.plot(mb, acc, marker="o", markersize=3, label=LABELS.get(name, name))
    ax.set_xscale("log")
    ax.set_xlabel("MB one rank put on the wire (cumulative, log scale)")
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(0.5, 1.0)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(f"digits CNN, {args.devices} CPU processes, {args.epochs} epochs (one point per epoch)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")

    dense = curves["ddp"][0][-1] if "ddp" in curves else 0.0
    print("\n| config | final val acc | wire MB per rank | vs DDP | MB handed to collectives | wall time |")
    print("|---|---|---|---|---|---|")
    for name, (mb, handed, acc) in curves.items():
        ratio = f"{dense / mb[-1]:.1f}x fewer" if dense and mb[-1] else "-"
        wall = f"{seconds[name]:.0f} s" if name in seconds else "-"
        print(f"| {name}.yaml | {acc[-1]:.4f} | {mb[-1]:.2f} | {ratio} | {handed[-1]:.2f} | {wall} |")
    if failed:
        raise SystemExit(f"failed: {failed}")


if __name__ == "__main__":
    main()
