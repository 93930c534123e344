"""The measured results as dataclasses, and their JSON form (``<report stem>_results.json``).

The JSON keeps the keys it always had (the worker's report, ``benchmarks/_worker.py``, decides
its own): ``to_json``/``from_json`` convert, ``load``/``save`` read and write the file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, TypeVar

from benchmarks._methods import DEFAULT_METHODS
from benchmarks._netem.grid import rate_order


class CurvePoint(NamedTuple):
    """One accuracy snapshot of rank 0 (a JSON list ``[step, clock, tx, acc]``)."""

    step: int
    clock: float  # training wall time, snapshot pauses excluded
    tx: int | None  # interface bytes sent since the start (None: not measured)
    acc: float  # held-out accuracy


_OK_KEYS = ("steps", "step_times", "clock", "tx_bytes", "rx_bytes", "reported", "n_params")


@dataclass
class WorkerReport:
    """What one worker process measured (its status only, with an error, when it failed)."""

    status: str
    error: str | None = None
    steps: int = 0
    step_times: list[float] = field(default_factory=list)
    clock: list[float] = field(default_factory=list)  # training wall time after each step
    tx_bytes: int | None = None
    rx_bytes: int | None = None
    reported: dict[str, Any] = field(default_factory=dict)  # bytes the method says it sent + "source"
    n_params: int | None = None
    curve: list[CurvePoint] | None = None  # rank 0 only
    final_acc: float | None = None  # rank 0 only
    rank: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys a newer worker writes, kept as they are

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def failed(cls, error: str) -> WorkerReport:
        return cls(status="error", error=error)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> WorkerReport:
        known = {f.name for f in fields(cls)} - {"extra"}
        kw = {k: v for k, v in d.items() if k in known}
        kw.setdefault("status", "error")
        if kw.get("curve") is not None:
            kw["curve"] = [CurvePoint(*c) for c in kw["curve"]]
        return cls(**kw, extra={k: v for k, v in d.items() if k not in known})

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status}
        if self.error is not None:
            out["error"] = self.error
        if self.ok:
            out.update((k, getattr(self, k)) for k in _OK_KEYS)
        if self.curve is not None:
            out["curve"] = [list(c) for c in self.curve]
        if self.final_acc is not None:
            out["final_acc"] = self.final_acc
        if self.rank is not None:
            out["rank"] = self.rank
        return {**out, **self.extra}


def _to_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    return value.to_json() if hasattr(value, "to_json") else value


def _json_fields(obj: Any) -> dict[str, Any]:
    """The dataclass's fields by name, nested dataclasses as their JSON; a None ``resumed_with`` left out."""
    return {
        f.name: _to_json(v)
        for f in fields(obj)
        if (v := getattr(obj, f.name)) is not None or f.name != "resumed_with"
    }


_R = TypeVar("_R", bound="_WithReports")


class _WithReports:
    """A record of worker reports: its JSON is its fields, the reports as theirs."""

    _absent: ClassVar[dict[str, Any]] = {}  # values for keys that older files lack

    @classmethod
    def from_json(cls: type[_R], d: dict[str, Any]) -> _R:
        return cls(**{**cls._absent, **d, "reports": [WorkerReport.from_json(r) for r in d["reports"]]})

    def to_json(self) -> dict[str, Any]:
        return _json_fields(self)


@dataclass
class Run(_WithReports):
    """One method on one emulated cluster (task, workers, rate): every worker's report."""

    task: str
    world: int
    rate: str
    method: str
    label: str
    family: str
    period: int
    full: bool  # at the full-run rate: ignores --budget, gives the whole accuracy curve
    isolated: bool  # namespaces: own link and interface counters per worker
    warmup: int
    started: str
    wall_s: float
    load: list[list[float] | None]  # the load average before and after
    reports: list[WorkerReport]

    @property
    def ok(self) -> bool:
        return bool(self.reports) and all(r.ok for r in self.reports)

    @property
    def status(self) -> str:
        """``ok``, or the first failed worker's status."""
        return next((r.status for r in self.reports if not r.ok), "ok")

    @property
    def error(self) -> str:
        """The first failed worker's error ('' if none)."""
        return next((r.error or "" for r in self.reports if not r.ok), "")

    @property
    def rank0(self) -> WorkerReport:
        return self.reports[0]

    @property
    def curve(self) -> list[CurvePoint] | None:
        """Rank 0's accuracy curve, when the run completed and has one."""
        return self.rank0.curve if self.ok else None

    _absent: ClassVar[dict[str, Any]] = {"load": []}


@dataclass
class Floor(_WithReports):
    """The step time with no communication: ``parallel`` independent single processes at once."""

    task: str
    parallel: int
    when: str  # "start" or "end" of the benchmark (a drift between them: the machine's load changed)
    reports: list[WorkerReport]
    load: list[float] | None

    _absent: ClassVar[dict[str, Any]] = {"when": "start", "load": None}


@dataclass
class Network:
    """How the links were emulated (or why they were not)."""

    namespaces: bool
    why: str
    delay_ms: float
    segment: bool
    queue_ms: float
    full_at: list[str] = field(default_factory=list)  # per part, the rate of the full runs

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Network:
        full_at = d.get("full_at", [])
        return cls(**{"queue_ms": 20.0, **d, "full_at": [full_at] if isinstance(full_at, str) else full_at})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BenchmarkResult:
    """Everything one benchmark invocation measured; saved after every run."""

    args: dict[str, Any]  # the command line's options, as parsed
    command: str
    date: str
    machine: dict[str, Any]  # benchmarks._machine.machine_description()
    network: Network
    elapsed_s: float = 0.0
    complete: bool = False
    floors: list[Floor] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)
    resumed_with: list[str] | None = None  # the commands that resumed it, if any

    # -- JSON ------------------------------------------------------------------------------------
    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BenchmarkResult:
        return cls(
            **{
                **d,
                "network": Network.from_json(d["network"]),
                "floors": [Floor.from_json(f) for f in d["floors"]],
                "runs": [Run.from_json(r) for r in d["runs"]],
            }
        )

    def to_json(self) -> dict[str, Any]:
        return _json_fields(self)

    @classmethod
    def load(cls, path: str | Path) -> BenchmarkResult:
        return cls.from_json(json.loads(Path(path).read_text()))

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_json()))

    # -- what was run ------------------------------------------------------------------------------
    @property
    def warmup(self) -> int:
        return int(self.args["warmup"])

    def find(self, task: str, world: int, rate: str, method: str) -> Run | None:
        for run in self.runs:
            if (run.task, run.world, run.rate, run.method) == (task, world, rate, method):
                return run
        return None

    def runs_of(self, task: str, world: int, method: str) -> list[Run]:
        """Every run of ``method`` on ``task`` with ``world`` workers, at any rate."""
        return [r for r in self.runs if (r.task, r.world, r.method) == (task, world, method)]

    def clusters(self) -> list[tuple[str, int]]:
        """(task, workers) in report order: by task as first run, then by workers as first run."""
        tasks = dict.fromkeys(r.task for r in self.runs)
        return [(t, w) for t in tasks for w in dict.fromkeys(r.world for r in self.runs if r.task == t)]

    def label(self, key: str) -> str:
        return next((r.label for r in self.runs if r.method == key), key)

    def family(self, key: str) -> str:
        return next((r.family for r in self.runs if r.method == key), "")

    def _seen(self, task: str, world: int, name: str) -> list[str]:
        seen: list[str] = []
        for run in self.runs:
            if run.task == task and run.world == world and getattr(run, name) not in seen:
                seen.append(getattr(run, name))
        return seen

    def methods_in(self, task: str, world: int) -> list[str]:
        """The methods run, baselines first in the default order, then the extra combinations as run
        (a resumed or redone run appends to the results, so the order in the file is not a guide)."""
        seen = self._seen(task, world, "method")
        order = {key: i for i, key in enumerate(DEFAULT_METHODS)}
        return sorted(seen, key=lambda k: (order.get(k, len(order)), seen.index(k)))

    def rates_in(self, task: str, world: int) -> list[str]:
        """The rates run: loopback, then unthrottled namespaces, then slowest to fastest."""
        return sorted(self._seen(task, world, "rate"), key=rate_order)
