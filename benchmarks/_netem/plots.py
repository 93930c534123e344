"""Accuracy vs training wall time and vs bytes per worker: one PNG per task, workers and rate."""

from __future__ import annotations

from pathlib import Path

from benchmarks._netem.analysis import auto_target, per_worker_bytes, projected_clock, reference_curve
from benchmarks._netem.grid import rate_label
from benchmarks._netem.results import BenchmarkResult


def make_plots(result: BenchmarkResult, out_dir: Path, stem: str) -> list[str]:
    """Write ``<out_dir>/<stem>_<task>_w<workers>_<rate>.png``; their paths ([] without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    colors = [*plt.cm.tab10.colors, *plt.cm.Dark2.colors, *plt.cm.Set1.colors]
    paths = []
    for task, world in result.clusters():
        target = auto_target(result, task, world)
        for rate in result.rates_in(task, world):
            fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(14, 5.2))
            counted = False
            for i, key in enumerate(result.methods_in(task, world)):
                run = result.find(task, world, rate, key)
                if run is None or not run.ok or run.rank0.curve is None:
                    continue
                color = colors[i % len(colors)]
                style = "-." if run.family == "baseline" else "-"
                marker = "s" if run.family == "baseline" else "o"
                label = result.label(key)
                curve = [p for p in run.rank0.curve if p.step > 0]  # log axes: no step 0
                tx, wire, _ = per_worker_bytes(run)
                per_step = tx if tx is not None else wire
                counted = counted or tx is not None
                ys = [p.acc for p in curve]
                xs_b = [(p.tx if p.tx is not None else (per_step or 0) * p.step) / 1e6 for p in curve]
                kw = dict(color=color, ls=style, marker=marker, ms=2.5, lw=1.3)
                ax_t.plot([p.clock for p in curve], ys, label=label, **kw)
                ax_b.plot(xs_b, ys, label=label, **kw)
                ref = [p for p in reference_curve(result, run) if p.step > 0]
                if curve and ref and ref[-1].step > curve[-1].step:  # projected continuation
                    rest = [p for p in ref if p.step >= curve[-1].step]
                    xs = [projected_clock(run, p.step) for p in rest]
                    ax_t.plot(xs, [p.acc for p in rest], ":", color=color, lw=1.3)
                    if per_step:
                        ax_b.plot(
                            [per_step * p.step / 1e6 for p in rest],
                            [p.acc for p in rest],
                            ":",
                            color=color,
                            lw=1.3,
                        )
            for ax in (ax_t, ax_b):
                ax.set_xscale("log")
                ax.set_ylabel("held-out accuracy (rank 0)")
                ax.grid(True, which="both", alpha=0.3)
                if target is not None:
                    ax.axhline(target, color="k", lw=0.8, ls="--")
            ax_t.set_xlabel("training wall time (s)")
            what = "interface tx counter" if counted else "reported by the method"
            ax_b.set_xlabel(f"MB sent per worker ({what})")
            ax_t.set_title(f"{task}, {world} workers, {rate_label(rate)}: accuracy vs time")
            ax_b.set_title("accuracy vs bytes (dotted: projected; dashed line: target)")
            ax_b.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
            fig.tight_layout()
            path = out_dir / f"{stem}_{task}_w{world}_{rate.replace('.', 'p')}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            paths.append(str(path))
    return paths
