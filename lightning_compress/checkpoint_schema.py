"""The schema of the ``"lightning_compress"`` checkpoint entry, and its validation.

:meth:`~lightning_compress.CompressedDDP.save_checkpoint` writes, under ``CHECKPOINT_KEY``::

    {"version": 1, "world_size": W, "ranks": [{"optimizer_steps": n,
                                               "comm": CompressionState.state_dict(),
                                               "sync": SyncSchedule.state_dict()}, ...]}

:func:`validate_entry` checks all of it, every rank's part, before anything is restored. Every
rank loads the whole checkpoint and runs the same checks on the same bytes, so a bad entry makes
every rank raise the same ``ValueError`` at the same point, with no collective: no rank is left
waiting in ``setup`` for a peer that died on a ``KeyError`` ("connection closed").

The schema below is a table of field → check, one per dict that a ``load_state_dict`` reads. A
key is *required* where the loader indexes it (``state["step"]``) and optional where it reads it
with ``.get`` (older checkpoints of the same version lack it); unknown keys pass, except where the
loader would reject them (``StepRecord(**d)``). A schedule's state is free-form (a user's own
:class:`~lightning_compress.sync.SyncSchedule` may store anything), so ``"sync"`` is checked key by
key for the keys the package's schedules read, whichever schedule wrote them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from numbers import Integral, Real
from typing import Any

import torch
from torch import Tensor

from lightning_compress.comm.ledger import StepRecord
from lightning_compress.sync.averaging import STATE_VERSION as _SYNC_STATE_VERSION

#: versions of the entry this release reads
SUPPORTED_VERSIONS = (1,)

_ROOT = "checkpoint['lightning_compress']"
_HINT = (
    "the checkpoint is corrupted or was written by another version of lightning_compress. To resume "
    "without the compression state (error-feedback memory, counters and schedule state then start "
    "fresh, with a warning), remove the entry: ckpt = torch.load(path, weights_only=False); "
    "del ckpt['lightning_compress']; torch.save(ckpt, path)"
)
_MISSING = object()


class _Invalid(Exception):
    def __init__(self, path: str, expected: str, found: Any) -> None:
        super().__init__(path)
        self.path, self.expected, self.found = path, expected, found


Check = Callable[[Any, str], None]


def _describe(value: Any) -> str:
    if value is _MISSING:
        return "no such key"
    if isinstance(value, Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        return f"{'an' if dtype[0] in 'aeio' else 'a'} {dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        keys = list(value)
        more = ", ..." if len(keys) > 6 else ""
        return f"a {type(value).__name__} with keys [{', '.join(map(repr, keys[:6]))}{more}]"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)} item{'' if len(value) == 1 else 's'}"
    if value is None or isinstance(value, (bool, Real, str, bytes)):
        text = repr(value)
        return text if len(text) <= 80 else text[:77] + "..."
    return f"a {type(value).__name__}"


def _key(path: str, key: Any) -> str:
    return f"{path}[{key!r}]"


def _is_int(v: Any) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


# -- checks ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Leaf:
    """A value tested by one predicate; ``expected`` is what the message says it should be."""

    expected: str
    ok: Callable[[Any], bool]

    def __call__(self, value: Any, path: str) -> None:
        if not self.ok(value):
            raise _Invalid(path, self.expected, value)


def _maybe(leaf: _Leaf) -> _Leaf:
    """``leaf``, or None (the loaders read ``None`` as "not held yet")."""
    return _Leaf(f"None or {leaf.expected}", lambda v: v is None or leaf.ok(v))


@dataclass(frozen=True)
class _MapOf:
    """A dict whose keys pass ``key`` and whose values pass ``value``."""

    key: _Leaf
    value: Check

    @property
    def expected(self) -> str:
        return f"a dict keyed by {self.key.expected}"

    def __call__(self, value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise _Invalid(path, self.expected, value)
        for k, v in value.items():
            if not self.key.ok(k):
                raise _Invalid(path, self.expected, value)
            self.value(v, _key(path, k))


@dataclass(frozen=True)
class _ListOf:
    item: Check
    expected = "a list"

    def __call__(self, value: Any, path: str) -> None:
        if not isinstance(value, (list, tuple)):
            raise _Invalid(path, self.expected, value)
        for i, v in enumerate(value):
            self.item(v, f"{path}[{i}]")


REQUIRED, OPTIONAL = True, False


@dataclass(frozen=True)
class _Record:
    """A dict with named fields: ``{key: (required, check)}``, checked in this order.

    ``closed``: unknown keys are an error (the loader passes the dict as ``**kwargs``).
    ``requires``: a key that, when present, makes other keys required (it names the writer).
    ``rules``: checks across fields, run once every field passed.
    """

    fields: Mapping[str, tuple[bool, Check]]
    closed: bool = False
    requires: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    rules: tuple[Callable[[dict, str], None], ...] = ()

    @property
    def expected(self) -> str:
        required = [k for k, (req, _) in self.fields.items() if req]
        return f"a dict with keys {', '.join(map(repr, required))}" if required else "a dict"

    def __call__(self, value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise _Invalid(path, self.expected, value)
        needed = {k for present, keys in self.requires.items() if present in value for k in keys}
        for key, (required, check) in self.fields.items():
            if key in value:
                check(value[key], _key(path, key))
            elif required or key in needed:
                raise _Invalid(_key(path, key), _expectation(check), _MISSING)
        if self.closed:
            for key in value:
                if key not in self.fields:
                    raise _Invalid(path, f"a dict with keys among {list(self.fields)}", value)
        for rule in self.rules:
            rule(value, path)


def _expectation(check: Check) -> str:
    return getattr(check, "expected", "a value")


_COUNT = _Leaf("an int >= 0", lambda v: _is_int(v) and v >= 0)
_AMOUNT = _Leaf("a finite number >= 0", lambda v: _is_number(v) and math.isfinite(v) and v >= 0)
_NORM = _Leaf("a number >= 0", lambda v: _is_number(v) and not v < 0)  # NaN after nonfinite='ignore'
_NAME = _Leaf("a str", lambda v: isinstance(v, str))
_ANY = _Leaf("a value", lambda v: True)
_FLOATS = _Leaf("a floating-point tensor", lambda v: isinstance(v, Tensor) and v.is_floating_point())
_FLAT = _Leaf(
    "a 1-D floating-point tensor", lambda v: isinstance(v, Tensor) and v.is_floating_point() and v.dim() == 1
)
_RNG = _Leaf(
    "a 1-D uint8 tensor (a torch.Generator state)",
    lambda v: isinstance(v, Tensor) and v.dtype == torch.uint8 and v.dim() == 1 and v.numel() > 0,
)
_LAYOUT_ITEM = _Leaf(
    "a [name, numel] pair",
    lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and isinstance(v[0], str) and _COUNT.ok(v[1]),
)


def _version(versions: tuple[int, ...]) -> _Leaf:
    return _Leaf(
        f"{' or '.join(map(str, versions))} (the versions this lightning_compress reads)",
        lambda v: _is_int(v) and v in versions,
    )


# -- rules across fields -----------------------------------------------------------------------
def _world_size_matches(entry: dict, path: str) -> None:
    if entry["world_size"] != len(entry["ranks"]):
        raise _Invalid(
            _key(path, "world_size"),
            f"the number of entries in 'ranks' ({len(entry['ranks'])})",
            entry["world_size"],
        )


def _ranks_stepped_together(entry: dict, path: str) -> None:
    first = entry["ranks"][0]["optimizer_steps"]
    for r, rank in enumerate(entry["ranks"]):
        if rank["optimizer_steps"] != first:
            raise _Invalid(
                f"{path}['ranks'][{r}]['optimizer_steps']",
                f"{first}, as rank 0's (every rank takes every optimizer step)",
                rank["optimizer_steps"],
            )


#: the flat vectors of a periodic schedule, and what they span of its ``layout``
_FLAT_SPANS = {"local": "all", "z": "all", "x0": "params", "u": "params", "v": "params"}


def _flats_fit_layout(state: dict, path: str) -> None:
    """The schedule's flat vectors span its model layout (else ``write_flat_``/arithmetic fails)."""
    layout = state.get("layout")
    if not layout:
        return  # no layout: PeriodicAveraging starts fresh and reads no tensor
    sizes = {
        "all": sum(n for _, n in layout),
        "params": sum(n for name, n in layout if not name.startswith("buffer:")),
    }
    for key, span in _FLAT_SPANS.items():
        t = state.get(key)
        if t is not None and t.numel() != sizes[span]:
            what = "the parameters and float buffers" if span == "all" else "the parameters"
            raise _Invalid(_key(path, key), f"{sizes[span]} elements ({what} in 'layout')", t)


# -- the schema ------------------------------------------------------------------------------
# BitLedger.load_state_dict: StepRecord(**d) (a missing field defaults, an unknown one is a TypeError)
_STEP_RECORD = _Record(
    {f.name: (OPTIONAL, _COUNT if f.type in (int, "int") else _AMOUNT) for f in fields(StepRecord)},
    closed=True,
)
_LEDGER = _Record(
    {
        "total": (REQUIRED, _STEP_RECORD),
        "last": (OPTIONAL, _STEP_RECORD),
        "steps": (REQUIRED, _COUNT),
        "exchanges": (OPTIONAL, _COUNT),
    }
)
_MEMORIES = _MapOf(_NAME, _FLOATS)  # per parameter name: v (residuals), u (momentum)

# CompressionState.load_state_dict
_COMM = _Record(
    {
        "step": (REQUIRED, _COUNT),
        "skipped_steps": (OPTIONAL, _COUNT),
        "last_grad_norm": (OPTIONAL, _maybe(_NORM)),
        "ledger": (REQUIRED, _LEDGER),
        "residuals": (REQUIRED, _MEMORIES),
        "momentum": (OPTIONAL, _MEMORIES),
        "compressor": (OPTIONAL, _MapOf(_NAME, _ANY)),  # written for the record, not read back
        "generator": (OPTIONAL, _RNG),  # a CPU (5056 bytes) or CUDA (16 bytes) generator's
    }
)

# every key a package schedule's load_state_dict / _restore reads, whichever schedule wrote it:
# PeriodicAveraging (LocalSGD, SlowMo, OverlapLocalSGD) and BackupWorkers
_SYNC = _Record(
    {
        "version": (OPTIONAL, _version((_SYNC_STATE_VERSION,))),
        "layout": (OPTIONAL, _ListOf(_LAYOUT_ITEM)),
        "local": (OPTIONAL, _maybe(_FLAT)),
        "optimizer_states": (OPTIONAL, _ListOf(_MapOf(_Leaf("an int", _is_int), _MapOf(_NAME, _ANY)))),
        **{key: (OPTIONAL, _maybe(_FLAT)) for key in ("x0", "residual", "u", "z", "v")},
        "generator": (OPTIONAL, _maybe(_RNG)),  # LocalSGD's may be a CUDA generator's (16 bytes)
        "backups": (OPTIONAL, _COUNT),
        "residual_layout": (OPTIONAL, _ListOf(_NAME)),
        **{key: (OPTIONAL, _COUNT) for key in ("dropped_total", "straggled_total", "skipped_total")},
    },
    requires={"backups": ("residual",)},  # BackupWorkers.load_state_dict indexes state["residual"]
    rules=(_flats_fit_layout,),
)

_RANK = _Record({"optimizer_steps": (REQUIRED, _COUNT), "comm": (REQUIRED, _COMM), "sync": (REQUIRED, _SYNC)})

_ENTRY = _Record(
    {
        "version": (REQUIRED, _version(SUPPORTED_VERSIONS)),  # first: a newer layout fails here, clearly
        "world_size": (REQUIRED, _Leaf("an int >= 1", lambda v: _is_int(v) and v >= 1)),
        "ranks": (REQUIRED, _ListOf(_RANK)),
    },
    rules=(_world_size_matches, _ranks_stepped_together),
)


def validate_entry(entry: Any) -> None:
    """Check a checkpoint's ``"lightning_compress"`` entry, every rank's part of it.

    Run it on every rank before restoring anything: the ranks read the same checkpoint, so they
    all accept it or all raise the same error, without communicating.

    Raises:
        ValueError: for the first malformed field, naming its full path, what was expected and what
            was found, e.g. ``checkpoint['lightning_compress']['ranks'][1]['optimizer_steps']:
            expected an int >= 0, got -3``, followed by how to resume without the entry.

    """
    try:
        _ENTRY(entry, _ROOT)
    except _Invalid as bad:
        raise ValueError(
            f"{bad.path}: expected {bad.expected}, got {_describe(bad.found)}; {_HINT}"
        ) from None


__all__ = ["SUPPORTED_VERSIONS", "validate_entry"]
