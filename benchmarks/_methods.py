"""The methods the benchmark compares: what users would pick instead, and lightning_compress's.

Each entry builds a Lightning strategy and callbacks inside a worker. Methods whose modules are
not importable in this checkout report themselves unavailable (with the import error) instead of
failing the run: the benchmark records what it could not run.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from pytorch_lightning.strategies import DDPStrategy

# DDP's buckets: one bucket for the whole model. torch's PowerSGD hook fails on gloo with several
# buckets (its chained collectives run in different orders on different ranks); the other
# methods do not care, and one bucket keeps the comparison equal. `netem.py --bucket-cap-mb 25`
# (DDP's default) sets it per run, to measure how much communication overlaps backward.
BUCKET_CAP_MB: float = 256


class TorchHookDDP(DDPStrategy):
    """``DDPStrategy`` that registers ``ddp_comm_hook`` on CPU too.

    Lightning 2.6 registers communication hooks only when the device is CUDA, silently; on CPU
    a ``PowerSGDState`` would leave plain float32 allreduce in place.
    """

    def _register_ddp_hooks(self) -> None:
        assert self.model is not None
        if self._ddp_comm_hook is not None:
            self.model.register_comm_hook(self._ddp_comm_state, self._ddp_comm_hook)


class AllreduceCounter:
    """Counts the bytes torch's hooks hand to ``dist.all_reduce`` (they call it through the module).

    ``wire_bytes`` uses the ring model of the package's ledger, ``2(W-1)/W`` per allreduced byte,
    so the baselines' expected traffic is computed the same way as CompressedDDP's.
    """

    def __init__(self) -> None:
        self.payload_bytes = 0
        self.calls = 0
        self.active = False
        self._orig = dist.all_reduce

    def install(self) -> None:
        orig = self._orig

        def counting_all_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self.active:
                self.payload_bytes += tensor.numel() * tensor.element_size()
                self.calls += 1
            return orig(tensor, *args, **kwargs)

        dist.all_reduce = counting_all_reduce  # type: ignore[assignment]


@dataclass
class Method:
    """One benchmarked configuration.

    Attributes:
        key: command-line name.
        label: what the table calls it.
        family: ``baseline`` (stock DDP and torch's hooks) or ``lightning_compress``.
        build: ``build() -> (strategy, callbacks)``; raises ImportError when unavailable.
        period: steps between synchronizations (evaluation snapshots are taken at multiples of it).
        momentum: optimizer momentum override (Sketched SGD keeps its momentum in the compressor).
        counts: where expected wire bytes come from: ``ledger`` (CompressedDDP's BitLedger),
            ``allreduce`` (counted calls of torch's hooks) or ``dense`` (stock DDP: 4 bytes per
            parameter per step, ring allreduce).
    """

    key: str
    label: str
    family: str
    build: Callable[[], tuple[Any, list[Any]]]
    period: int = 1
    momentum: float | None = None
    counts: str = "ledger"
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _lc(name: str) -> Any:
    """``lightning_compress.<module>.<attr>`` or ImportError naming what is missing."""
    module, _, attr = name.rpartition(".")
    mod = importlib.import_module(module)
    if not hasattr(mod, attr):
        raise ImportError(f"{module} has no {attr} yet")
    return getattr(mod, attr)


def _compressed(
    compressor: Callable[[], Any],
    sync: Callable[[], Any] | None = None,
    policy: Callable[[], Any] | None = None,
    **kwargs: Any,
) -> Callable[[], tuple[Any, list[Any]]]:
    def build() -> tuple[Any, list[Any]]:
        strategy_cls = _lc("lightning_compress.CompressedDDP")
        callbacks = []
        if policy is not None:
            monitor = _lc("lightning_compress.CommunicationMonitor")
            callbacks.append(monitor(policy=policy(), summary=False))
        strategy = strategy_cls(
            compressor=compressor(),
            sync=sync() if sync else None,
            process_group_backend="gloo",
            bucket_cap_mb=BUCKET_CAP_MB,
            **kwargs,
        )
        return strategy, callbacks

    return build


def _qsgd(bits: int) -> Callable[[], Any]:
    return lambda: _lc("lightning_compress.compressors.QSGD")(bits=bits)


def _topk(ratio: float) -> Callable[[], Any]:
    return lambda: _lc("lightning_compress.compressors.TopK")(ratio=ratio)


def _sketch() -> Any:
    cls = _lc("lightning_compress.compressors.CountSketch")
    try:
        return cls(rows=5, ratio=0.01)
    except TypeError:
        return cls()


def _stock() -> tuple[Any, list[Any]]:
    return DDPStrategy(process_group_backend="gloo", bucket_cap_mb=BUCKET_CAP_MB), []


def _monitored() -> tuple[Any, list[Any]]:
    strategy, _ = _stock()
    return strategy, [_lc("lightning_compress.CommunicationMonitor")(summary=False)]


def _fp16() -> tuple[Any, list[Any]]:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    return TorchHookDDP(
        process_group_backend="gloo",
        bucket_cap_mb=BUCKET_CAP_MB,
        ddp_comm_hook=default_hooks.fp16_compress_hook,
    ), []


def _powersgd(rank: int) -> Callable[[], tuple[Any, list[Any]]]:
    def build() -> tuple[Any, list[Any]]:
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

        # start_powerSGD_iter=2: the smallest torch allows with error feedback; every method then
        # compresses from (almost) the first step, like CompressedDDP's warmup_steps=0.
        state = powerSGD_hook.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=rank,
            start_powerSGD_iter=2,
            use_error_feedback=True,
            warm_start=True,
        )
        return TorchHookDDP(
            process_group_backend="gloo",
            bucket_cap_mb=BUCKET_CAP_MB,
            ddp_comm_hook=powerSGD_hook.powerSGD_hook,
            ddp_comm_state=state,
        ), []

    return build


def _sync(name: str, **kwargs: Any) -> Callable[[], Any]:
    return lambda: _lc(f"lightning_compress.sync.{name}")(**kwargs)


def _policy(name: str, **kwargs: Any) -> Callable[[], Any]:
    return lambda: _lc(f"lightning_compress.policies.{name}")(**kwargs)


_KEY = re.compile(r"^(localsgd|slowmo|overlap)(\d+)(?:_(q\d|topk\d+))?$")
_BACKUP = re.compile(r"^backup(\d+)(?:_(q\d|topk\d+))?$")


def _codec(spec: str | None) -> tuple[Callable[[], Any], str, bool | None]:
    """``q4`` -> QSGD 4-bit; ``topk10`` -> Top-K 1.0 % (per mille) with error feedback; None: exact."""
    if spec is None:
        return (lambda: "none"), "", None
    if spec.startswith("q"):
        return _qsgd(int(spec[1:])), f" + QSGD {spec[1:]}-bit", None
    permille = int(spec[4:])
    return _topk(permille / 1000), f" + Top-K {permille / 10:g}% + EF", True


def _backup(key: str) -> Method:
    """``backup<b>[_<codec>]``: BackupWorkers(backups=b), defaults otherwise.

    The benchmark's models call no collective in ``training_step`` and hold no torchmetrics
    object, so the default ``skip_late_steps=None`` lets late ranks skip their compute.
    """
    m = _BACKUP.match(key)
    if m is None:
        raise KeyError(key)
    backups, spec = int(m.group(1)), m.group(2)
    codec, suffix, ef = _codec(spec)
    kwargs: dict[str, Any] = {} if ef is None else {"error_feedback": ef}
    sync = _sync("BackupWorkers", backups=backups, timeout=600.0)
    build = _compressed(codec, sync=sync, **kwargs)
    return Method(key, f"backup workers b={backups}{suffix}", "lightning_compress", build)


def _periodic(key: str) -> Method:
    m = _KEY.match(key)
    if m is None:
        raise KeyError(key)
    kind, tau, spec = m.group(1), int(m.group(2)), m.group(3)
    codec, suffix, ef = _codec(spec)
    kwargs: dict[str, Any] = {} if ef is None else {"error_feedback": ef}
    if kind == "localsgd":
        return Method(
            key,
            f"Local SGD τ={tau}{suffix}",
            "lightning_compress",
            _compressed(codec, sync=_sync("LocalSGD", period=tau), **kwargs),
            period=tau,
        )
    if kind == "slowmo":
        return Method(
            key,
            f"SlowMo τ={tau} β=0.6{suffix}",
            "lightning_compress",
            _compressed(codec, sync=_sync("SlowMo", period=tau, momentum=0.6), **kwargs),
            period=tau,
        )
    if spec is not None and not spec.startswith("q"):
        raise KeyError(f"{key}: Overlap-Local-SGD's anchor average takes QSGD only (_q<bits>)")
    return Method(
        key,
        f"Overlap-Local-SGD τ={tau}{suffix}",
        "lightning_compress",
        _compressed(codec, sync=_sync("OverlapLocalSGD", period=tau)),
        period=tau,
    )


def methods(extra: tuple[str, ...] = ()) -> dict[str, Method]:
    """Every method the benchmark knows, by key (availability is checked when a worker builds it).

    Besides the fixed keys, periodic schedules are spelled ``<schedule><τ>[_<codec>]``:
    ``localsgd16_q4`` (Local SGD τ=16 averaging 4-bit QSGD deltas), ``localsgd8_topk10``
    (Top-K 1.0 % with error feedback), ``slowmo12``, ``overlap8``, ``overlap8_q4`` (its anchor
    average in 4-bit QSGD, in flight during the next ``τ`` steps).
    """
    table = [
        Method(
            "ddp",
            "stock DDP (float32)",
            "baseline",
            _stock,
            counts="dense",
            notes="Lightning's DDPStrategy, no comm hook (Lightning registers none on CPU)",
        ),
        Method(
            "monitor",
            "stock DDP + CommunicationMonitor()",
            "lightning_compress",
            _monitored,
            counts="dense",
            notes="the monitor alone, metering DDP's own float32 allreduce",
        ),
        Method("none", "CompressedDDP(compressor='none')", "lightning_compress", _compressed(lambda: "none")),
        Method("fp16", "torch fp16_compress_hook", "baseline", _fp16, counts="allreduce"),
        Method("powersgd1", "torch PowerSGD rank 1", "baseline", _powersgd(1), counts="allreduce"),
        Method("powersgd4", "torch PowerSGD rank 4", "baseline", _powersgd(4), counts="allreduce"),
        Method("qsgd8", "QSGD 8-bit", "lightning_compress", _compressed(_qsgd(8))),
        Method("qsgd4", "QSGD 4-bit", "lightning_compress", _compressed(_qsgd(4))),
        Method("topk", "Top-K 1% + EF", "lightning_compress", _compressed(_topk(0.01), error_feedback=True)),
        Method(
            "sketch",
            "Sketched SGD (CountSketch 1%)",
            "lightning_compress",
            _compressed(_sketch, momentum=0.9),
            momentum=0.0,
        ),
        Method(
            "dq",
            "DQ-SGD (mean 4 bits)",
            "lightning_compress",
            _compressed(_qsgd(4), policy=_policy("DQPolicy", mean_bits=4.0)),
        ),
        Method(
            "adatopk",
            "adaptive Top-K 1% + EF",
            "lightning_compress",
            _compressed(
                _topk(0.01), policy=_policy("AdaptiveTopKPolicy", mean_ratio=0.01), error_feedback=True
            ),
        ),
    ]
    out = {m.key: m for m in table}
    for key in (*DEFAULT_METHODS, *extra):
        if key not in out and _KEY.match(key):
            out[key] = _periodic(key)
        elif key not in out and _BACKUP.match(key):
            out[key] = _backup(key)
    return out


DEFAULT_METHODS = [
    "ddp",
    "fp16",
    "powersgd1",
    "powersgd4",
    "qsgd8",
    "qsgd4",
    "topk",
    "sketch",
    "dq",
    "adatopk",
    "localsgd8",
    "localsgd8_q4",
    "slowmo12",
    "overlap2",
    "overlap8",
]


def get_method(key: str) -> Method:
    """The method named ``key`` (fixed, or spelled ``<schedule><τ>[_<codec>]`` or
    ``backup<b>[_<codec>]``); KeyError if unknown."""
    table = methods()
    if key in table:
        return table[key]
    return _backup(key) if _BACKUP.match(key) else _periodic(key)
