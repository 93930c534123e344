"""Every rank must run with the same settings: compare them once at set-up, fail fast if not.

The ranks' collectives only match when every rank derives them from the same configuration:
the codec and its settings fix payload sizes, ``min_compression_size`` the split into compressed
and dense tensors, the schedule which steps communicate. Nothing in ``torch.distributed`` checks
this. A different bit width, bucket size or ``min_compression_size`` ends in gloo's "Is there a
distributed collective mismatch?"; QSGD on one rank and Top-K on another, or Local SGD with
period 2 against 3, hangs until the process-group timeout (30 minutes by default); error feedback
on one rank only trains on, silently, with biased updates.

So every rank condenses its settings into a flat dict (:func:`settings_of`) and
:func:`check_settings_agree` compares the dicts across ranks:

1. One ``all_gather`` of two int64 per rank: a digest of the settings and their encoded size.
   Every rank receives the same digests, so every rank takes the same branch below: no rank can
   be left waiting in a collective the others skipped.
2. All digests equal: done (the usual case, one small collective).
3. Otherwise one more ``all_gather`` of the encoded settings, and every rank raises the same
   ``ValueError``, naming each differing field and every rank's value.

What is compared: the codec's type and its :meth:`~lightning_compress.compressors.Compressor.meta`
(the settings a receiver needs to decode, by contract identical on every rank) plus its
constructor arguments; the exchange's settings (error feedback as resolved, sizes, warm-up,
momentum, non-finite mode); the schedule's type and constructor arguments; the policy's type and
constructor arguments. Constructor arguments are found generically (``inspect.signature`` of every
``__init__`` in the class's MRO, read back from the attribute of that name or its ``_``-prefixed
private twin), so a new codec, schedule or policy is covered without touching this module.

What is not compared, because it may legitimately differ per rank (:data:`PER_RANK`):

- ``seed`` of the exchange's stochastic rounding: rank ``r`` draws from ``seed + r`` anyway, and
  every rank applies the same decoded average whatever it drew, so parameters stay identical. (A
  count sketch's ``seed`` is compared: its hashes must agree; it is ``compressor.seed``.)
- ``process_group``: an object, the group the check runs in.
- ``sketch_momentum``: a deprecated alias of ``momentum``, which is compared.
- a schedule's ``timeout``: how long this rank waits before failing, a local deadline.

Mutable runtime state (error-feedback memory, counters, a policy's decisions, Top-K's
``segments``) is not a constructor argument and is never read.
"""

from __future__ import annotations

import datetime
import enum
import hashlib
import inspect
import json
import logging
import math
import re
from numbers import Integral, Real
from typing import Any

import torch
import torch.distributed as dist

from lightning_compress.compressors.base import Compressor
from lightning_compress.hooks import CompressionState
from lightning_compress.policies.base import CompressionPolicy
from lightning_compress.sync.base import SyncSchedule

log = logging.getLogger(__name__)

#: constructor arguments left out of the comparison, by role: ``"exchange"``
#: (:class:`~lightning_compress.hooks.CompressionState`, whose ``compressor`` is compared as its own
#: part) and ``"sync"``; see the module docstring for why each may differ per rank
PER_RANK: dict[str, frozenset[str]] = {
    "exchange": frozenset({"compressor", "process_group", "sketch_momentum", "seed"}),
    "sync": frozenset({"timeout"}),
}

_ABSENT = "(not set)"
_ROLES = ("compressor", "sync", "policy")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


# -- the fingerprint -----------------------------------------------------------------------------
def settings_of(*parts: Any, **named: Any) -> dict[str, Any]:
    """The settings every rank must share, as a flat dict of dotted field names to plain values.

    Args:
        *parts: any of: a strategy with ``comm_state`` and ``sync`` (:class:`~lightning_compress.
            CompressedDDP`: everything, including ``comm_state.policy``), a
            :class:`~lightning_compress.hooks.CompressionState` (the exchange, its codec and its
            policy), a :class:`~lightning_compress.compressors.Compressor`, a
            :class:`~lightning_compress.sync.SyncSchedule` or a
            :class:`~lightning_compress.policies.CompressionPolicy`.
        **named: ``field=object`` puts ``object``'s settings under ``field`` and replaces any
            ``field`` entries ``parts`` produced; ``None`` gives ``{field: None}``. Use it for a
            part that may be absent, e.g. ``settings_of(policy=monitor.policy)``, so that a rank
            without one still contributes ``policy: None`` to the comparison.

    Returns:
        e.g. ``{"compressor": "QSGD", "compressor.bits": 4, "compressor.bucket_size": 512, ...,
        "error_feedback": False, "min_compression_size": 1024, ..., "sync": "LocalSGD",
        "sync.period": 2, ..., "policy": None}``. Values are ``str``, ``int``, ``float``, ``bool``
        or ``None`` (dtypes, callables and other objects as stable strings without addresses).

    Raises:
        TypeError: for a part of none of those kinds.

    """
    out: dict[str, Any] = {}
    for part in parts:
        if hasattr(part, "comm_state") and hasattr(part, "sync"):
            _flatten("", part.comm_state, out)
            _flatten("sync", part.sync, out)
        elif isinstance(part, CompressionState):
            _flatten("", part, out)
        elif isinstance(part, Compressor):
            _flatten("compressor", part, out)
        elif isinstance(part, SyncSchedule):
            _flatten("sync", part, out)
        elif isinstance(part, CompressionPolicy):
            _flatten("policy", part, out)
        else:
            raise TypeError(
                "settings_of takes a CompressedDDP, CompressionState, Compressor, SyncSchedule or "
                f"CompressionPolicy (or field=object), got {type(part).__name__}"
            )
    for field, obj in named.items():
        _flatten(field, obj, out)
    return out


def _flatten(prefix: str, obj: Any, out: dict[str, Any]) -> None:
    """Write ``obj``'s settings into ``out`` under ``prefix`` (its type name at ``prefix`` itself).

    Replaces whatever ``out`` held under ``prefix`` (a later part wins, whole).
    """
    if prefix:
        for key in [k for k in out if k == prefix or k.startswith(prefix + ".")]:
            del out[key]
    if isinstance(obj, CompressionState):
        # the exchange's settings are top-level fields, named like CompressedDDP's arguments
        _flatten(_join(prefix, "compressor"), obj.compressor, out)
        settings = _constructor_settings(obj, PER_RANK["exchange"])
        out.update({_join(prefix, k): v for k, v in settings.items()})
        _flatten(_join(prefix, "policy"), obj.policy, out)
        return
    if not isinstance(obj, (Compressor, SyncSchedule, CompressionPolicy)):
        out[prefix] = _plain(obj)
        return
    out[prefix] = type(obj).__name__
    exempt = PER_RANK["sync"] if isinstance(obj, SyncSchedule) else frozenset()
    settings = _constructor_settings(obj, exempt)
    if isinstance(obj, Compressor):
        # meta(): what a receiver needs to decode, identical on every rank by contract
        settings.update({k: _plain(v) for k, v in obj.meta().items()})
    for name, value in settings.items():
        out[f"{prefix}.{name}"] = value


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _constructor_settings(obj: Any, exempt: frozenset[str]) -> dict[str, Any]:
    """``obj``'s constructor arguments, read back from its attributes, as plain values.

    Every ``__init__`` along the MRO contributes its named parameters (a subclass that passes
    ``**kwargs`` on still has its base's read). A parameter is read from the attribute of the same
    name, or its ``_``-prefixed twin when that name is missing or a method (``CountSketch`` keeps
    ``candidates`` as ``_candidates`` next to a ``candidates()`` method); one stored under
    another name is skipped.
    """
    names: list[str] = []
    for cls in type(obj).__mro__:
        init = cls.__dict__.get("__init__")
        if init is None or cls is object:
            continue
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):  # builtins without a signature
            continue
        for p in params:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name == "self":
                continue
            if p.name not in exempt and p.name not in names:
                names.append(p.name)
    settings: dict[str, Any] = {}
    for name in names:
        for attr in (name, "_" + name):
            try:
                value = getattr(obj, attr)
            except AttributeError:
                continue
            if inspect.ismethod(value):
                continue
            settings[name] = _plain(value)
            break
        else:
            log.debug(
                f"settings_of: {type(obj).__name__}({name}=...) is stored under another name; not compared"
            )
    return settings


def _plain(value: Any) -> Any:
    """A value that pickles and compares the same on every rank (no memory addresses)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, Integral):
        return int(value)
    if isinstance(value, Real):
        v = float(value)
        return "nan" if math.isnan(v) else v
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, (tuple, list)):
        return repr(tuple(_plain(v) for v in value))
    if inspect.isfunction(value) or inspect.isclass(value) or inspect.isbuiltin(value):
        return f"{value.__module__}.{value.__qualname__}"
    if type(value).__repr__ is object.__repr__:
        return f"{type(value).__module__}.{type(value).__qualname__}"
    return _ADDRESS.sub("", repr(value))


# -- the comparison ------------------------------------------------------------------------------
def check_settings_agree(
    settings: dict[str, Any],
    group: dist.ProcessGroup | None = None,
    what: str = "CompressedDDP",
    device: torch.device | str | None = None,
) -> None:
    """Raise the same ``ValueError`` on every rank of ``group`` unless all ranks hold equal ``settings``.

    Every rank of ``group`` must call it at the same point (it is a collective); a rank that
    skips it leaves the others waiting for the process-group timeout. Costs one ``all_gather`` of
    two int64 per rank when the settings agree, one more of the encoded settings when they do not.
    A no-op without an initialized process group, or with one rank.

    Args:
        settings: this rank's fields, usually :func:`settings_of`'s; any subset works (e.g. only
            the policy's fields), as long as every rank passes the same kind of subset.
        group: the process group (``None``: the default group).
        what: what the settings configure, for the message (``"CompressedDDP"``,
            ``"CommunicationMonitor"``).
        device: where the exchanged tensors live. ``None``: the CPU when the group's backend has a
            CPU path (gloo, mpi, ucc, or a ``"cpu:gloo,cuda:nccl"`` pair), else this process's
            current accelerator (NCCL: the current CUDA device, which Lightning sets per rank).

    Raises:
        ValueError: on every rank, naming each differing field and each rank's value, e.g.
            ``CompressedDDP settings differ across ranks: compressor.bits is 4 on rank 0, 8 on rank 1``.

    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size(group)
    if world <= 1:
        return
    where = torch.device(device) if device is not None else _exchange_device(group)
    items = [[str(k), _plain(v)] for k, v in settings.items()]
    encoded = json.dumps(items, sort_keys=False, allow_nan=True).encode()
    canonical = json.dumps(sorted(items, key=lambda kv: kv[0]), allow_nan=True).encode()
    digest = int.from_bytes(hashlib.sha256(canonical).digest()[:8], "little", signed=True)

    # 1. digests and sizes: every rank sees all of them, so all take the same branch
    mine = torch.tensor([digest, len(encoded)], dtype=torch.int64, device=where)
    heads = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(heads, mine, group=group)
    digests = [int(h[0]) for h in heads]
    if all(d == digests[0] for d in digests):  # 2.
        log.debug(f"{what}: settings agree on all {world} ranks ({len(items)} fields)")
        return

    # 3. they differ: gather every rank's settings and name what differs
    longest = max(int(h[1]) for h in heads)
    buf = torch.zeros(longest, dtype=torch.uint8, device=where)
    buf[: len(encoded)] = torch.frombuffer(bytearray(encoded), dtype=torch.uint8).to(where)
    bufs = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(bufs, buf, group=group)
    ranks = [_global_rank(group, r) for r in range(world)]
    per_rank = [
        dict(json.loads(bytes(b[: int(h[1])].cpu().tolist()).decode()))
        for b, h in zip(bufs, heads, strict=True)
    ]
    raise ValueError(describe_differences(per_rank, ranks, what))


def describe_differences(
    per_rank: list[dict[str, Any]], ranks: list[int] | None = None, what: str = "CompressedDDP"
) -> str:
    """The message for settings that differ: every differing field with every rank's value.

    A field whose parent differs is left out (with ``compressor`` QSGD on one rank and TopK on
    another, ``compressor.bits`` against ``compressor.k`` says nothing more). Ranks holding the same
    value are grouped, ranges compacted (``ranks 0-6``), so the message stays short at any scale.
    """
    ranks = list(range(len(per_rank))) if ranks is None else ranks
    fields: list[str] = []
    for settings in per_rank:
        fields.extend(k for k in settings if k not in fields)
    differing = [f for f in fields if len({_key(s.get(f, _ABSENT)) for s in per_rank}) > 1]
    shown = [f for f in differing if not any(f.startswith(parent + ".") for parent in differing)]
    lines = []
    for f in shown:
        groups: dict[str, list[int]] = {}
        for rank, settings in zip(ranks, per_rank, strict=True):
            groups.setdefault(_shown(f, settings), []).append(rank)
        lines.append(f"{f} is " + ", ".join(f"{v} on {_ranks_text(rs)}" for v, rs in groups.items()))
    return (
        f"{what} settings differ across ranks: " + "; ".join(lines) + ". Every rank must be configured "
        f"identically (the same {what}(...) arguments, codec, sync schedule and policy); otherwise their "
        "collectives stop matching: a 'collective mismatch' error, a hang until the process-group timeout, "
        "or training that silently diverges"
    )


def _shown(field: str, settings: dict[str, Any]) -> str:
    if field not in settings:
        return _ABSENT
    value = settings[field]
    if field.rpartition(".")[2] in _ROLES and isinstance(value, str):
        return value  # a type name: QSGD, LocalSGD
    return repr(value)


def _key(value: Any) -> str:
    return json.dumps(value)


def _ranks_text(ranks: list[int]) -> str:
    runs: list[str] = []
    start = prev = ranks[0]
    for r in [*ranks[1:], None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if r is not None:
            start = prev = r
    word = "rank" if len(ranks) == 1 else "ranks"
    return f"{word} {', '.join(runs)}"


def _global_rank(group: dist.ProcessGroup | None, rank: int) -> int:
    if group is None:
        return rank
    try:
        return dist.get_global_rank(group, rank)
    except (RuntimeError, ValueError):
        return rank


def _exchange_device(group: dist.ProcessGroup | None) -> torch.device:
    """The CPU if the group's backend can move CPU tensors, else this process's current accelerator."""
    backend = str(dist.get_backend(group)).lower()
    capable: list[str] = []
    for part in backend.split(","):
        dev, _, name = part.rpartition(":")
        capable.extend([dev] if dev else dist.Backend.backend_capability.get(name, ["cpu"]))
    if "cpu" in capable:
        return torch.device("cpu")
    accelerator = torch.accelerator.current_accelerator()
    if accelerator is None:  # pragma: no cover - an accelerator-only backend without an accelerator
        return torch.device(capable[0] if capable else "cpu")
    return torch.device(accelerator.type, torch.accelerator.current_device_index())


__all__ = ["PER_RANK", "check_settings_agree", "describe_differences", "settings_of"]
