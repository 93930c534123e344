"""Top-K with momentum correction against DDP on the benchmark's MLP task, 2 workers on loopback.

The smallest run of ``benchmarks/netem.py``'s MLP task (``benchmarks/_tasks.py``'s ``TeacherMLP``:
64→2048→2048→10, SGD lr 0.02, batch 64 per worker, 480 steps, seed 0, one bucket, gloo, one thread
per worker) that compares final accuracies only: no network namespaces, no timing. Each variant
runs as two processes on 127.0.0.1, one after the other::

    python -m benchmarks.topk_momentum                                  # every variant, 480 steps
    python -m benchmarks.topk_momentum --variants ddp topk topk_mc --steps 480 --out /tmp/mc.json

It prints a Markdown table: final accuracy on the task's 16k-sample final set (as in
docs/benchmarks.md), the gap to DDP, and the ledger's bytes per step and wire-byte ratio to a
float32 ring allreduce.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

#: name -> (label, strategy kwargs for CompressedDDP or None for stock DDP, optimizer momentum)
VARIANTS: dict[str, tuple[str, dict[str, Any] | None, float]] = {
    "ddp": ("stock DDP (float32), SGD momentum 0.9", None, 0.9),
    "topk": ("Top-K 1% + EF, SGD momentum 0.9 (as before)", {"topk": {}, "error_feedback": True}, 0.9),
    "topk_mc": ("Top-K 1%, momentum correction + masking (global)", {"topk": {}, "momentum": 0.9}, 0.0),
    "topk_mc_warmup": (
        "Top-K 1%, momentum correction + masking (global), 24 dense warm-up steps",
        {"topk": {}, "momentum": 0.9, "warmup_steps": 24},
        0.0,
    ),
    "topk_mc_nomask": (
        "Top-K 1%, momentum correction, no masking (global)",
        {"topk": {}, "momentum": 0.9, "momentum_masking": False},
        0.0,
    ),
    "topk_mc_layer": (
        "Top-K 1% per layer, momentum correction + masking",
        {"topk": {"per_layer": True}, "momentum": 0.9},
        0.0,
    ),
    "topk_mc_layer_nomask": (
        "Top-K 1% per layer, momentum correction, no masking",
        {"topk": {"per_layer": True}, "momentum": 0.9, "momentum_masking": False},
        0.0,
    ),
    "sketch": (
        "Sketched SGD (CountSketch 1%, 5 rows), momentum 0.9 + masking",
        {"sketch": {}, "momentum": 0.9},
        0.0,
    ),
}
DEFAULT = ["ddp", "topk", "topk_mc", "topk_mc_nomask", "topk_mc_layer", "topk_mc_layer_nomask"]


def _strategy(spec: dict[str, Any] | None) -> Any:
    from pytorch_lightning.strategies import DDPStrategy

    from benchmarks._methods import BUCKET_CAP_MB
    from lightning_compress import CompressedDDP
    from lightning_compress.compressors import CountSketch, TopK

    if spec is None:
        return DDPStrategy(process_group_backend="gloo", bucket_cap_mb=BUCKET_CAP_MB)
    spec = dict(spec)
    if "topk" in spec:
        compressor: Any = TopK(ratio=0.01, **spec.pop("topk"))
    else:
        compressor = CountSketch(rows=5, ratio=0.01, **spec.pop("sketch"))
    return CompressedDDP(
        compressor=compressor, process_group_backend="gloo", bucket_cap_mb=BUCKET_CAP_MB, **spec
    )


def worker(variant: str, steps: int, seed: int, out: str) -> None:
    """One rank of one variant (the environment names the rank, as for benchmarks/_worker.py)."""
    import pytorch_lightning as pl
    import torch

    from benchmarks._tasks import TeacherMLP

    torch.set_num_threads(1)
    pl.seed_everything(seed, verbose=False)
    _, spec, momentum = VARIANTS[variant]
    task = TeacherMLP(momentum=momentum)
    strategy = _strategy(spec)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, num_nodes=2, strategy=strategy, max_steps=steps, max_epochs=-1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(task)
    result: dict[str, Any] = {"steps": trainer.global_step, "seconds": time.perf_counter() - start}
    ledger = getattr(getattr(strategy, "comm_state", None), "ledger", None)
    if ledger is not None:
        total = ledger.total
        result.update(
            payload_mb_per_step=total.payload_bytes / ledger.steps / 1e6,
            wire_ratio=total.dense_wire_bytes / total.wire_bytes if total.wire_bytes else None,
        )
    if trainer.global_rank == 0:
        state = {k: v.detach().clone() for k, v in task.net.state_dict().items()}
        result["final_acc"] = task.evaluate(state, final=True)
        Path(out).write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_variant(variant: str, steps: int, seed: int, timeout: float) -> dict[str, Any]:
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        procs = []
        for rank in range(2):
            env = {
                **os.environ,
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(rank),
                "LOCAL_RANK": "0", "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1",
            }  # fmt: skip
            cmd = [sys.executable, "-m", "benchmarks.topk_momentum", "--worker", variant,
                   "--steps", str(steps), "--seed", str(seed), "--out", out]  # fmt: skip
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env))
        deadline = time.monotonic() + timeout
        codes = []
        for p in procs:
            try:
                codes.append(p.wait(max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                return {"error": f"timed out after {timeout:.0f} s"}
        if any(codes) or not os.path.exists(out):
            return {"error": f"exit codes {codes}"}
        return json.loads(Path(out).read_text())


def table(results: dict[str, dict[str, Any]]) -> str:
    base = results.get("ddp", {}).get("final_acc")
    lines = [
        "| variant | optimizer momentum | final acc | vs DDP (points) | MB handed to collectives / step "
        "| wire reduction vs float32 allreduce |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        label, _, momentum = VARIANTS[name]
        if "final_acc" not in r:
            lines.append(f"| {label} | {momentum} | {r.get('error', 'failed')} | | | |")
            continue
        gap = "" if base is None else f"{100 * (r['final_acc'] - base):+.2f}"
        mb = f"{r['payload_mb_per_step']:.3f}" if "payload_mb_per_step" in r else "17.400 (dense)"
        ratio = f"{r['wire_ratio']:.1f}x" if r.get("wire_ratio") else "1x"
        lines.append(f"| {label} | {momentum} | {r['final_acc']:.4f} | {gap} | {mb} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", nargs="+", default=DEFAULT, choices=sorted(VARIANTS))
    parser.add_argument("--steps", type=int, default=480)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per variant")
    parser.add_argument("--out", help="JSON file for the results (appended to, by variant)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.seed, args.out)
        return
    results: dict[str, dict[str, Any]] = {}
    if args.out and os.path.exists(args.out):
        results = json.loads(Path(args.out).read_text())
    for variant in args.variants:
        print(f"{variant} ...", flush=True)
        results[variant] = run_variant(variant, args.steps, args.seed, args.timeout)
        print(f"{variant}: {results[variant]}", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
