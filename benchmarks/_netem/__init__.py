"""The network benchmark behind ``python benchmarks/netem.py`` (issue #8), one module per concept.

- ``cli``: the command line and ``main``;
- ``grid``: what is run: the sub-grids (``--part``), link rates, per-task defaults;
- ``launch``: a worker's configuration, environment and process (in its namespace or alone);
- ``runner``: the grid's runs and floors, saved after each, resumable;
- ``results``: the measured runs as dataclasses, and their JSON (``*_results.json``);
- ``analysis``: step times, bytes, accuracy curves and times to target from the results;
- ``targets``: the issue's targets checked on the MLP task;
- ``report``: the Markdown report and the one-line progress log;
- ``plots``: accuracy vs time and vs bytes.

The emulated cluster (network namespaces, veth, bridge, tc) is ``benchmarks/_cluster.py``; one
worker is ``benchmarks/_worker.py``.

How each quantity is measured:

- *step time*: rank 0's wall time per optimizer step, mean over the steps after a warm-up
  (a whole number of synchronization periods); *x floor*: divided by the same model's step time
  in one process with no communication (``floor``);
- *accuracy*: rank 0 snapshots its parameters every ``--eval-every`` steps (the clock is paused
  for the copy); the snapshots are evaluated on held-out data after training, so evaluation
  never pauses the ranks (a pause would hand asynchronous methods free communication time);
- *time to target*: the training clock at the first snapshot whose accuracy reaches the target.
  Runs that cannot reach it within ``--budget`` seconds (stock DDP at 10 Mbit/s needs hours)
  stop early by a decision rank 0 broadcasts once; their time to target is *projected* (marked
  ``≈``): the method's own accuracy-per-step curve from its longest run (accuracy does not depend
  on the link) times this link's measured time per step;
- *bytes*: each worker's interface ``tx_bytes`` (read inside its namespace) over the training
  window, against what the method reports: CompressedDDP's ``BitLedger.wire_bytes``, the bytes
  torch's hooks hand to ``dist.all_reduce`` (ring model ``2(W-1)/W``), or stock DDP's float32
  gradient (same model).
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent  # the repository: workers run from here
