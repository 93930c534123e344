#!/usr/bin/env python
"""Time-to-accuracy and bytes on the wire over an emulated slow network (issue #8).

One command runs every method side by side on the same emulated cluster and writes the report
(``docs/benchmarks.md``), its plots (``docs/benchmarks_*.png``) and the raw measurements
(``docs/benchmarks_results.json``)::

    sudo python benchmarks/netem.py                       # the default grid (long)
    sudo python benchmarks/netem.py --rates 10 100 --methods ddp powersgd4 qsgd4 localsgd8_q4
    python benchmarks/netem.py --quick                    # < 60 s smoke test (CI)
    python benchmarks/netem.py --report-only              # re-render from the JSON

(``python -m benchmarks.netem`` is the same command.)

The emulated cluster: ``N`` worker processes, each in its own network namespace
(``lcbench-<pid>-w<r>``) with one veth (``eth0``, ``10.213.0.<r+1>/24``) on a bridge that lives
in another namespace of the benchmark's own (``lcbench-<pid>-hub``); every link is limited in
both directions by ``tc`` tbf (and delayed by netem with ``--delay-ms`` where the kernel has it).
Workers start as ``ip netns exec NS python -m benchmarks._worker`` with the torchrun-style
environment (``MASTER_ADDR`` = rank 0's address, ``MASTER_PORT``, ``NODE_RANK``,
``LOCAL_RANK=0``, ``WORLD_SIZE``, ``GLOO_SOCKET_IFNAME=eth0``), so Lightning sees
``num_nodes=N, devices=1``. The namespaces are deleted at the end, on error and on Ctrl-C;
``--cleanup`` removes any left by a run killed with SIGKILL. Without root (or without
``ip netns``) everything runs on unthrottled loopback instead, and the report says so.

This file is the entry point only; the benchmark is the package ``benchmarks/_netem/`` (its
``__init__`` lists the modules and how each quantity is measured).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

from benchmarks._netem.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
