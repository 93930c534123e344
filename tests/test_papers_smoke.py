"""Smoke test of ``benchmarks/papers.py --report-only``: the page renders from a results JSON alone.

Runs no experiment: a tiny fake JSON in a temporary directory holds one row with a stored summary
(a key the registry does not know), one registered row whose run failed, and nothing for the
others, which must show as "not run".
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "papers.py"

FAKE = {
    "rows": {
        "fake_claim": {
            "status": "ok",
            "paper": "A Fake Paper (Doe)",
            "arxiv": "0000.00000",
            "claim": "Fake claims hold.",
            "command": "python benchmarks/papers.py --rows fake_claim",
            "started": "2026-01-01T00:00:00+00:00",
            "wall_s": 1.0,
            "summary": {
                "setting": "nothing at all",
                "measured": "42 ms vs 43 ms",
                "verdict": "partly",
                "why": "because it is a test",
                "details": ["| a | b |", "|---|---|", "| 1 | 2 |"],
            },
            "trace": ["   a line of trace"],
        },
        "overlap": {"status": "error", "error": "Traceback: boom", "command": "python benchmarks/papers.py"},
    }
}


def test_report_only_renders_table_with_verdicts(tmp_path: Path) -> None:
    results = tmp_path / "papers_results.json"
    out = tmp_path / "papers.md"
    results.write_text(json.dumps(FAKE))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--report-only", "--results", str(results), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    page = out.read_text()
    header = "| paper (arXiv) | claim | setting here | measured | verdict |"
    assert header in page
    table = page[page.index(header) :].split("\n\n", 1)[0].splitlines()
    assert all(line.count("|") - line.count("\\|") == 6 for line in table), table  # 5 columns every row
    fake = next(line for line in table if "A Fake Paper" in line)
    assert "0000.00000" in fake and "42 ms vs 43 ms" in fake and "**partly**: because it is a test" in fake
    # registered rows without results, a failed row and the placeholders all say "not run"
    slowmo = next(line for line in table if "1910.00643" in line)
    assert slowmo.rstrip().endswith("not run |")
    assert "not run (its last run failed" in next(line for line in table if "2002.09539" in line)
    # the compression rows have experiments but no results in the fake JSON: also "not run"
    for arxiv in ("2107.14575", "1712.01887", "1903.04488"):
        assert next(line for line in table if arxiv in line).rstrip().endswith("not run |")
    assert "python benchmarks/papers.py --rows fake_claim" in page  # the command is on the page
    assert "## A Fake Paper (Doe)" in page and "a line of trace" in page
    assert json.loads(results.read_text()) == FAKE  # --report-only never writes the results
