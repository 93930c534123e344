"""What the benchmark runs: sub-grids of tasks x workers x rates x methods, and the link rates."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

LOOPBACK = "loopback"  # 127.0.0.1, no namespaces
UNLIMITED = "inf"  # namespaces without tbf
TASK_DEFAULTS = {  # steps, eval_every, batch
    "mlp": {"steps": 480, "eval_every": 24},
    "digits": {"steps": 240, "eval_every": 24},
    "tiny": {"steps": 16, "eval_every": 8},
}


@dataclass
class Part:
    """One sub-grid (``--part``); its JSON form is the dict of its fields."""

    tasks: list[str]
    workers: list[int]
    rates: list[str]
    methods: list[str]


def parse_part(tokens: list[str], args: argparse.Namespace) -> Part:
    """``task=mlp workers=2,4 rates=10,100 methods=ddp,qsgd4`` -> one sub-grid (unset keys: the flags)."""
    part = Part(
        tasks=list(args.tasks), workers=list(args.workers), rates=list(args.rates), methods=list(args.methods)
    )
    names = {"task": "tasks", "tasks": "tasks", "workers": "workers", "rates": "rates", "methods": "methods"}
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep or key not in names or not value:
            raise ValueError(f"--part: {token!r} is not one of task=..., workers=..., rates=..., methods=...")
        values = [v for v in value.split(",") if v]
        setattr(part, names[key], [int(v) for v in values] if key == "workers" else values)
    return part


def warm_steps(warmup: int, period: int) -> int:
    """``--warmup`` rounded up to a whole synchronization period."""
    return -(-warmup // period) * period


def is_positive_float(s: str) -> bool:
    try:
        return float(s) > 0
    except ValueError:
        return False


def rate_value(rate: str) -> float | None:
    """The rate in Mbit/s; None for loopback and unlimited veth."""
    return None if rate in (LOOPBACK, UNLIMITED) else float(rate)


def rate_label(rate: str) -> str:
    if rate == LOOPBACK:
        return "loopback"
    if rate == UNLIMITED:
        return "unlimited veth"
    v = float(rate)
    return f"{v / 1000:g} Gbit/s" if v >= 1000 else f"{v:g} Mbit/s"


def rate_order(rate: str) -> float:
    """Sort key: loopback, then unthrottled namespaces, then slowest to fastest."""
    return {LOOPBACK: -2.0, UNLIMITED: -1.0}.get(rate, rate_value(rate) or 0.0)


def full_rate(rates: list[str], choice: str) -> str:
    """The rate whose runs ignore ``--budget`` (``--full-at``; 'auto' or absent: the fastest)."""
    if choice in rates:
        return choice
    if LOOPBACK in rates:
        return LOOPBACK
    if UNLIMITED in rates:
        return UNLIMITED
    numeric = [r for r in rates if rate_value(r) is not None]
    return max(numeric, key=lambda r: float(r)) if numeric else rates[0]
