"""NaN/Inf on one rank under LocalSGD, SlowMo and OverlapLocalSGD: caught locally, never averaged in.

Two faults, on rank 1 of 2 (real gloo groups, real Trainers), with ``period=2`` (sync points
after steps 1, 3, 5):

- ``"loss"``: a NaN loss at local step 2, so NaN gradients on that rank only;
- ``"param"``: finite gradients, but a NaN written into a parameter during step 3, after the
  gradients were checked (an optimizer that produces NaN from finite gradients), found at the
  sync point that follows.

``nonfinite="skip"``: the run completes, every rank's parameters are finite, the ranks agree after
the last sync point, rank 1 counts one skipped step and logs a warning. ``"raise"``: every rank
raises ``FloatingPointError``, within seconds.
"""

from __future__ import annotations

import logging
import time

import pytest
import torch
from launch import run_distributed
from lightning_ns import CompressedDDP, pl
from models import ToyClassifier, flat_params, trainer_kwargs

from lightning_compress.compressors import NoCompression, TopK
from lightning_compress.sync import LocalSGD, OverlapLocalSGD, SlowMo
from lightning_compress.sync.averaging import (
    allreduce_average_,
    allreduce_average_checked_,
    gradients_finite,
    nonfinite_flag,
)

BAD_RANK = 1
BAD_STEP = 2  # a local step: with period 2 the sync points follow steps 1, 3, 5
STEPS = 6
SCHEDULES = ("local", "slowmo", "overlap", "local_topk")


def _strategy(name: str, mode: str) -> CompressedDDP:
    if name == "local":
        return CompressedDDP(compressor=NoCompression(), nonfinite=mode, sync=LocalSGD(period=2))
    if name == "slowmo":
        return CompressedDDP(compressor=NoCompression(), nonfinite=mode,
                             sync=SlowMo(period=2, momentum=0.5, momentum_buffers="average"))
    if name == "overlap":
        return CompressedDDP(compressor=NoCompression(), nonfinite=mode, sync=OverlapLocalSGD(period=2))
    if name == "local_topk":  # the compressed delta average, with an error-feedback residual
        return CompressedDDP(compressor=TopK(ratio=0.1), error_feedback=True, min_compression_size=256,
                             nonfinite=mode, sync=LocalSGD(period=2))
    raise ValueError(name)


class Faulty(ToyClassifier):
    """On rank ``BAD_RANK``: a NaN loss at step ``bad_step`` (``"loss"``), or a NaN parameter in the next."""

    def __init__(self, fault: str, bad_step: int = BAD_STEP, **kw):
        super().__init__(**kw)
        self.fault, self.bad_step = fault, bad_step

    def _hit(self) -> bool:
        return self.global_rank == BAD_RANK and self.global_step == self.bad_step

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.fault == "loss" and self._hit():
            loss = loss * float("nan")
        return loss

    def on_before_optimizer_step(self, optimizer):
        # after the backward pass and its check, before optimizer.step: as if the optimizer made it
        if self.fault == "param" and self.global_rank == BAD_RANK and self.global_step == self.bad_step + 1:
            with torch.no_grad():
                self.net[0].weight[0, 0] = float("nan")


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _fit(name: str, mode: str, fault: str, steps: int, bad_step: int) -> dict:
    pl.seed_everything(0, verbose=False)
    model = Faulty(fault, bad_step=bad_step, momentum=0.9)
    strategy = _strategy(name, mode)
    handler = _Messages()
    logger = logging.getLogger("lightning_compress")
    logger.addHandler(handler)
    start = time.monotonic()
    out: dict = {"error": None}
    try:
        pl.Trainer(**trainer_kwargs(2, strategy=strategy, max_steps=steps)).fit(model)
    except FloatingPointError as err:
        out["error"] = str(err)
    finally:
        logger.removeHandler(handler)
    out.update(elapsed=time.monotonic() - start, messages=handler.messages, params=flat_params(model),
               skipped=strategy.comm_state.skipped_steps, numel=sum(p.numel() for p in model.parameters()),
               total=strategy.comm_state.ledger.total)
    sync = strategy.sync
    if isinstance(sync, OverlapLocalSGD):
        out["anchor"] = sync.anchor.clone() if sync.anchor is not None else None
        out["v_finite"] = sync.v is None or bool(torch.isfinite(sync.v).all())
    residual = getattr(sync, "residual", None)
    out["residual_finite"] = residual is None or bool(torch.isfinite(residual).all())
    states = [t for s in strategy.optimizers[0].state.values() for t in s.values()
              if isinstance(t, torch.Tensor)]
    out["optimizer_finite"] = all(bool(torch.isfinite(t).all()) for t in states)
    return out


def _runs(rank, world_size, cases):
    out = {key: _fit(*key) for key in cases}
    out["checked_average"] = _checked_average(rank)  # on the process group the Trainers left
    return out


def _cases(mode: str, fault: str, steps: int = STEPS, bad_step: int = BAD_STEP):
    return [(name, mode, fault, steps, bad_step) for name in SCHEDULES]


@pytest.fixture(scope="module")
def runs():
    # one set of processes for every fit: starting them costs more than the fits
    cases = (_cases("skip", "loss") + _cases("skip", "param") + [("local", "ignore", "loss", STEPS, BAD_STEP)]
             + _cases("raise", "loss") + _cases("raise", "param")
             # a NaN after the last sync point (step 4 of 0..4; the last one follows step 3): found at the end
             + [("local", "raise", "loss", 5, 4), ("overlap", "raise", "loss", 5, 4)])
    out = run_distributed(_runs, 2, cases, timeout=240)
    return {key: [r[key] for r in out] for key in [*cases, "checked_average"]}


@pytest.mark.parametrize("fault", ["loss", "param"])
@pytest.mark.parametrize("name", SCHEDULES)
def test_skip_keeps_every_rank_finite_and_in_agreement(runs, name, fault):
    r0, r1 = runs[(name, "skip", fault, STEPS, BAD_STEP)]
    for r in (r0, r1):
        assert r["error"] is None, r["error"]
        assert torch.isfinite(r["params"]).all(), (name, fault)
        assert r["residual_finite"] and r["optimizer_finite"], (name, fault)
    if name == "overlap":  # replicas are pulled towards the anchor, which is identical and finite
        assert torch.equal(r0["anchor"], r1["anchor"]) and torch.isfinite(r0["anchor"]).all()
        assert r0["v_finite"] and r1["v_finite"]
    else:  # STEPS is a multiple of the period: the last step is a sync point
        assert torch.equal(r0["params"], r1["params"]), name
    # one skipped step, on the rank that had it; a warning there naming rank and step
    assert (r0["skipped"], r1["skipped"]) == (0, 1)
    bad = [m for m in r1["messages"] if "non-finite" in m]
    assert bad, r1["messages"]
    if fault == "loss":
        assert not [m for m in r0["messages"] if "non-finite" in m], r0["messages"]
        assert any(f"rank {BAD_RANK}" in m and f"step {BAD_STEP}" in m and "local step" in m
                   and "other ranks" in m for m in bad), bad
    else:  # found at the sync point: every rank hears that one rank was left out of the average
        assert any("1 of 2 ranks" in m for m in r0["messages"]), r0["messages"]


def test_skip_at_a_local_step_costs_no_collective(runs):
    # the flag rides the sync point's allreduce: one float more, no extra collective
    for r in runs[("local", "skip", "loss", STEPS, BAD_STEP)]:
        assert r["total"].collectives == STEPS // 2
        assert r["total"].payload_bytes == STEPS // 2 * 4 * (r["numel"] + 1)


def test_ignore_checks_nothing_and_sends_no_flag(runs):
    for r in runs[("local", "ignore", "loss", STEPS, BAD_STEP)]:
        assert r["error"] is None and r["skipped"] == 0
        assert not torch.isfinite(r["params"]).all()  # like stock DDP: NaN spreads to every rank
        assert r["total"].payload_bytes == STEPS // 2 * 4 * r["numel"]


@pytest.mark.parametrize("fault", ["loss", "param"])
@pytest.mark.parametrize("name", SCHEDULES)
def test_raise_fails_every_rank_within_seconds(runs, name, fault):
    for rank, r in enumerate(runs[(name, "raise", fault, STEPS, BAD_STEP)]):
        assert r["error"] is not None, (name, fault, rank)
        assert "1 of 2 ranks" in r["error"], r["error"]
        assert r["elapsed"] < 30, r["elapsed"]


@pytest.mark.parametrize("name", ["local", "overlap"])
def test_raise_after_the_last_sync_point_fails_when_fit_ends(runs, name):
    for r in runs[(name, "raise", "loss", 5, 4)]:
        assert r["error"] is not None and "1 of 2 ranks" in r["error"], r["error"]


# -- the pieces ------------------------------------------------------------------------------------
def test_gradients_finite_is_exact():
    def params(*grads):
        out = []
        for g in grads:
            p = torch.nn.Parameter(torch.zeros_like(g))
            p.grad = g
            out.append(p)
        return out

    ok = torch.ones(5)
    assert gradients_finite(params(ok, torch.full((3,), 1e30)))  # the norm overflows; the values do not
    assert gradients_finite(params(ok.to(torch.bfloat16))) and gradients_finite([torch.nn.Parameter(ok)])
    for bad in (float("nan"), float("inf"), float("-inf")):
        g = ok.clone()
        g[2] = bad
        assert not gradients_finite(params(ok, g)), bad
        assert not gradients_finite(params(g.to(torch.bfloat16)))
    assert nonfinite_flag([], torch.device("cpu")).tolist() == [0.0]
    assert nonfinite_flag([ok, torch.tensor([float("nan")])], torch.device("cpu")).tolist() == [1.0]


def _checked_average(rank):
    from lightning_compress.comm import BitLedger

    values = torch.full((4,), float(rank + 1))
    if rank == 1:
        values[1] = float("nan")
    buffers = torch.full((2,), float(10 * (rank + 1)))
    ledger = BitLedger()
    n_bad, mine = allreduce_average_checked_([values], None, ledger, torch.device("cpu"))
    ledger.end_step()
    # a second collective for the same ranks, the count known from the first (SlowMo's buffers)
    allreduce_average_([buffers], None, None, left_out=mine, n_left_out=n_bad)
    # another reason to be left out rides the same float (a delta, optimizer state, ...)
    again = torch.full((3,), float(rank + 1))
    n_again, mine_again = allreduce_average_checked_([again], None, None, torch.device("cpu"),
                                                     torch.tensor([float(rank == 0)]))
    return {"values": values, "buffers": buffers, "n_bad": n_bad, "mine": mine, "again": again,
            "bytes": ledger.last.payload_bytes, "coords": ledger.last.coords, "n_again": n_again,
            "mine_again": mine_again}


def test_checked_average_leaves_non_finite_ranks_out(runs):
    for rank, r in enumerate(runs["checked_average"]):
        assert (r["n_bad"], r["mine"]) == (1, rank == 1)
        # rank 0's alone (divided by the 1 rank left, not by 2), on the left-out rank too
        assert torch.equal(r["values"], torch.full((4,), 1.0))
        assert torch.equal(r["buffers"], torch.full((2,), 10.0))
        assert (r["bytes"], r["coords"]) == (4 * 5, 4)  # the flag is one float more, not a coordinate
        assert (r["n_again"], r["mine_again"]) == (1, rank == 0)
        assert torch.equal(r["again"], torch.full((3,), 2.0))
