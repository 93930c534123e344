"""The seed papers' claims, reproduced side by side: writes ``docs/papers.md`` and its raw JSON.

One row per claim (registry: :mod:`benchmarks._papers_rows`). Every row runs small, real
experiments: gloo process groups, Lightning Trainers, the package's digits example, 2 processes
on this machine (3 for backup workers; network namespaces with tbf-limited links for
Overlap-Local-SGD when root is available). Rows are independent: ``--rows`` runs some and merges
them into the existing JSON, and ``--report-only`` re-renders the page from the JSON alone.

Usage::

    python benchmarks/papers.py                          # every implemented row (~15-25 min on 2 cores)
    python benchmarks/papers.py --rows slowmo,overlap    # just those; merged into the JSON
    python benchmarks/papers.py --report-only            # docs/papers.md from docs/papers_results.json
    python benchmarks/papers.py --package-ref HEAD       # workers import lightning_compress as of HEAD
    python benchmarks/papers.py --list
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/papers.py` from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks import _papers_rows  # noqa: E402,F401  (registers the rows)
from benchmarks._machine import machine_description  # noqa: E402
from benchmarks._papers_common import ROWS, Context, Summary, package_info, use_snapshot  # noqa: E402

DEFAULT_JSON = ROOT / "docs" / "papers_results.json"
DEFAULT_OUT = ROOT / "docs" / "papers.md"
VERDICTS = ("reproduced", "partly", "not reproduced")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="", help="comma-separated row keys (default: every implemented row)")
    ap.add_argument("--report-only", action="store_true", help="render the page from the JSON; run nothing")
    ap.add_argument(
        "--results", type=Path, default=DEFAULT_JSON, help="raw results JSON (read and merged into)"
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the Markdown page to write")
    ap.add_argument(
        "--package-ref",
        default=None,
        help="git ref whose lightning_compress the workers import (default: the working tree)",
    )
    ap.add_argument("--row-timeout", type=float, default=900.0, help="seconds each launch of a row may take")
    ap.add_argument("--list", action="store_true", help="list the rows and exit")
    return ap.parse_args(argv)


# -- results file -------------------------------------------------------------------------------
def load(path: Path) -> dict[str, Any]:
    if path.exists():
        return json.loads(path.read_text())
    return {"rows": {}}


def save(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=float) + "\n")
    os.replace(tmp, path)


def _command(argv: list[str]) -> str:
    return "python benchmarks/papers.py" + "".join(" " + shlex.quote(a) for a in argv)


def _loadavg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def run_rows(keys: list[str], args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    result = load(args.results)
    rows = result.setdefault("rows", {})
    with tempfile.TemporaryDirectory(prefix="lcpapers-pkg-") as pkg:
        use_snapshot(args.package_ref, Path(pkg))
        pkg_info = package_info(args.package_ref)
        mach = machine_description()
        for key in keys:
            spec = ROWS[key]
            print(f"== {key}: {spec.paper} (arXiv {spec.arxiv})", flush=True)
            ctx = Context(timeout=args.row_timeout)
            t0 = time.time()
            entry: dict[str, Any] = {
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "command": _command(argv),
                "machine": mach,
                "package": pkg_info,
                "load_before": _loadavg(),
            }
            try:
                entry["data"] = spec.run(ctx)
                entry["status"] = "ok"
            except NotImplementedError as err:
                entry["status"] = "pending"
                entry["error"] = str(err)
                print(f"   not run: {err}", flush=True)
            except Exception:  # a failed row is recorded, the others still run
                entry["status"] = "error"
                entry["error"] = traceback.format_exc()[-3000:]
                print(entry["error"], flush=True)
            entry["wall_s"] = round(time.time() - t0, 1)
            entry["load_after"] = _loadavg()
            entry["trace"] = ctx.trace
            if entry["status"] == "ok" and spec.summarize is not None:
                try:  # the raw data is saved even if its summary fails (fix it, then --report-only)
                    s = spec.summarize(entry["data"])
                    entry["summary"] = s.__dict__
                    print(
                        f"   -> {s.verdict}: {s.why}\n   measured: {s.measured}\n"
                        f"   ({entry['wall_s']:.0f} s)",
                        flush=True,
                    )
                except Exception:
                    print(f"   summary failed:\n{traceback.format_exc()[-2000:]}", flush=True)
            if entry["status"] != "pending" or key not in rows:
                rows[key] = entry
            save(args.results, result)
    return result


# -- the page -----------------------------------------------------------------------------------
def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def summary_of(key: str, entry: dict[str, Any] | None) -> Summary | None:
    """The row's summary: recomputed from its raw data when the registry can, else the stored one."""
    if not entry or entry.get("status") != "ok":
        return None
    spec = ROWS.get(key)
    if spec is not None and spec.summarize is not None and "data" in entry:
        try:
            return spec.summarize(entry["data"])
        except Exception as err:  # stale data from an older version of the row: use what was stored
            print(
                f"warning: row {key}: summary not recomputed ({type(err).__name__}: {err})", file=sys.stderr
            )
    stored = entry.get("summary")
    return Summary(**stored) if stored else None


def render(result: dict[str, Any]) -> str:
    rows = result.get("rows", {})
    keys = list(ROWS) + [k for k in rows if k not in ROWS]
    commands = sorted({rows[k]["command"] for k in keys if k in rows and rows[k].get("command")})
    lines = [
        "# The seed papers' claims, reproduced side by side",
        "",
        "Generated by `benchmarks/papers.py` from `docs/papers_results.json`; every figure below was "
        "measured by "
        "the command(s) that produced it:",
        "",
        "```",
        *(commands or ["python benchmarks/papers.py"]),
        "python benchmarks/papers.py --report-only   # re-renders this page from the JSON",
        "```",
        "",
        "Small, real experiments: gloo process groups and Lightning Trainers, 2 processes on one machine (3 "
        "for "
        "backup workers), the package's digits example (`lightning_compress.examples.DigitsCNN`'s network on "
        "`load_digits_split`: 1,438 training and 359 validation images, 151 k parameters). A verdict says "
        "whether the paper's claim holds *in this small setting*; a digits CNN is not CIFAR-10 on 32 GPUs, "
        "and the reasons are given with each row.",
        "",
        "| paper (arXiv) | claim | setting here | measured | verdict |",
        "|---|---|---|---|---|",
    ]
    sections: list[str] = []
    for key in keys:
        spec, entry = ROWS.get(key), rows.get(key)
        paper = spec.paper if spec else entry.get("paper", key)
        arxiv = spec.arxiv if spec else entry.get("arxiv", "")
        claim = spec.claim if spec else entry.get("claim", "")
        link = f"{paper} ([{arxiv}](https://arxiv.org/abs/{arxiv}))" if arxiv else paper
        s = summary_of(key, entry)
        if s is None:
            status = (entry or {}).get("status", "not run")
            if (spec and spec.pending) or status == "pending":
                cell = "not run (pending: no experiment yet)"
            elif status == "error":
                cell = "not run (its last run failed: see the JSON)"
            else:
                cell = "not run"
            lines.append(f"| {_cell(link)} | {_cell(claim)} | — | — | {cell} |")
            continue
        verdict = f"**{s.verdict}**: {s.why}"
        lines.append(
            f"| {_cell(link)} | {_cell(claim)} | {_cell(s.setting)} | {_cell(s.measured)} | "
            f"{_cell(verdict)} |"
        )
        sections += [
            f"## {paper} — `{key}`",
            "",
            f"**Claim** (arXiv {arxiv}): {claim}",
            "",
            f"**Setting:** {s.setting}",
            "",
            f"**Verdict: {s.verdict}** — {s.why}",
            "",
            *s.details,
            "",
        ]
        meta = [f"run {entry.get('started', '?')}, {entry.get('wall_s', '?')} s"]
        if entry.get("load_before"):
            meta.append(f"load average before/after {entry['load_before']} / {entry.get('load_after')}")
        pkg = entry.get("package") or {}
        if pkg:
            meta.append(
                f"package: {pkg.get('source')}"
                + (
                    f" with uncommitted changes in {', '.join(pkg['modified'])}"
                    if pkg.get("modified")
                    else ""
                )
            )
        m = entry.get("machine") or {}
        if m:
            meta.append(
                f"{m.get('cpu')}, {m.get('cores')} cores, torch {m.get('torch')}, "
                f"pytorch-lightning {m.get('pytorch_lightning')}"
            )
        sections += ["*" + "; ".join(meta) + f"; command: `{entry.get('command', '?')}`*", ""]
        if entry.get("trace"):
            sections += [
                "<details><summary>trace (what the run printed)</summary>",
                "",
                "```",
                *entry["trace"],
                "```",
                "",
                "</details>",
                "",
            ]
    lines += [
        "",
        "Verdicts: **reproduced** (the claim's effect is measured here, beyond the run-to-run noise shown), "
        "**partly** (part of it, or only under a condition stated in the row), **not reproduced** (not "
        "measured "
        "here; the row says why), **not run** (the row has no experiment yet, or it was not run).",
        "",
        "The machine's 2 cores were shared with other jobs during the runs (load averages are given with "
        "each "
        "row): step times are noisy, which is why time comparisons are interleaved and repeated and why the "
        "overlap row reports shares of the communication time measured within the same run.",
        "",
        *sections,
    ]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.list:
        for key, spec in ROWS.items():
            print(f"{key:15s} {'(pending) ' if spec.pending else ''}{spec.paper}, arXiv {spec.arxiv}")
        return 0
    if not args.report_only:
        keys = [k.strip() for k in args.rows.split(",") if k.strip()] or [
            k for k, s in ROWS.items() if not s.pending
        ]
        unknown = [k for k in keys if k not in ROWS]
        if unknown:
            print(f"unknown rows {unknown}; known: {list(ROWS)}", file=sys.stderr)
            return 2
        t0 = time.time()
        run_rows(keys, args, argv)
        print(f"all rows: {time.time() - t0:.0f} s", flush=True)
    result = load(args.results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(result))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
