"""Where a step's time goes: a per-step timeline of the engine's exchange, for diagnosis.

Enabled by ``LCBENCH_TIMELINE=DIR`` in a worker's environment (``benchmarks/netem.py`` passes its
environment on). Each rank then writes ``DIR/timeline_<method>_run<port>_<rank>.json`` (one file
per run: ``summarize`` lists them in the order they ran): per training step, the
milliseconds from the step's start to its backward pass, to the first and last chunk the
engine issued (:meth:`PipelinedExchange.issue`), to the first and last chunk received, to the
optimizer step and to the step's end. ``python -m benchmarks._timeline DIR`` prints the means.

From these, the rate the link delivered **while the exchange was in flight** is the interface's
bytes per step over the span from the first chunk issued to the last received: unlike the
report's whole-step figure, it leaves out the forward and backward compute before the first
chunk is ready and the decoding and optimizer step after the last. The timestamps are host
times (``time.perf_counter``): correct on CPU with gloo, not for CUDA kernels still queued.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from pytorch_lightning.callbacks import Callback

from lightning_compress.comm import engine

PHASES = ("backward", "first_issue", "last_issue", "first_received", "last_received", "optimizer", "end")


class Timeline(Callback):
    """Marks each step's phases; wraps the engine's ``issue`` and its chunks' ``wait`` to see chunks.

    The wrapping replaces the methods on the engine's classes for the whole process: meant for a
    benchmark worker, which builds one ``Timeline`` and exits after its run.
    """

    def __init__(self, directory: str, method: str) -> None:
        self.path = Path(directory)
        self.method = method
        self.steps: list[dict[str, float]] = []
        self._step: dict[str, list[float]] = {}
        issue, wait = engine.PipelinedExchange.issue, engine._Chunk.wait
        mark = self._mark

        def timed_issue(exchange: engine.PipelinedExchange) -> None:
            mark("issue")
            issue(exchange)

        def timed_wait(chunk: engine._Chunk) -> Any:
            out = wait(chunk)
            mark("received")
            return out

        engine.PipelinedExchange.issue = timed_issue  # type: ignore[method-assign]
        engine._Chunk.wait = timed_wait  # type: ignore[method-assign]

    def _mark(self, what: str) -> None:
        self._step.setdefault(what, []).append(time.perf_counter())

    def on_train_batch_start(self, *args: Any, **kwargs: Any) -> None:
        self._step = {}
        self._mark("start")

    def on_before_backward(self, *args: Any, **kwargs: Any) -> None:
        self._mark("backward")

    def on_before_optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        self._mark("optimizer")

    def on_train_batch_end(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
        self._mark("end")
        marks, t0 = self._step, self._step["start"][0]
        row = {"backward": marks["backward"][0], "optimizer": marks["optimizer"][0], "end": marks["end"][0]}
        if "issue" in marks and "received" in marks:
            row.update(
                first_issue=marks["issue"][0],
                last_issue=marks["issue"][-1],
                first_received=marks["received"][0],
                last_received=marks["received"][-1],
            )
        self.steps.append({k: 1e3 * (v - t0) for k, v in row.items()})

    def on_fit_end(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / f"timeline_{self.method}_{trainer.global_rank}.json", "w") as f:
            json.dump(self.steps, f)


def from_environment(cfg: dict[str, Any]) -> list[Timeline]:
    """``[Timeline]`` if ``LCBENCH_TIMELINE`` names a directory, else ``[]``."""
    directory = os.environ.get("LCBENCH_TIMELINE")
    run = Path(cfg.get("out", "")).name.split(".")[0]  # "run<port>": unique per run
    return [Timeline(directory, f"{cfg['method']}_{run}")] if directory else []


def summarize(directory: str, skip: int = 8) -> str:
    """Mean milliseconds from a step's start to each phase, per run and rank (first ``skip`` left out)."""
    lines = ["run  steps  " + "  ".join(PHASES)]
    for path in sorted(Path(directory).glob("timeline_*.json"), key=lambda p: (p.stat().st_mtime, p.name)):
        steps = [s for s in json.loads(path.read_text())[skip:] if "first_issue" in s]
        if not steps:
            continue
        means = [statistics.mean(s[p] for s in steps) for p in PHASES]
        name = path.stem.removeprefix("timeline_")
        lines.append(f"{name}  {len(steps)}  " + "  ".join(f"{m:.1f}" for m in means))
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(sys.argv[1]))
