"""Model averaging around local steps: flat-vector helpers and the base of periodic schedules.

Every periodic schedule (:class:`~lightning_compress.sync.LocalSGD`,
:class:`~lightning_compress.sync.SlowMo`, :class:`~lightning_compress.sync.OverlapLocalSGD`)
shares the same skeleton, implemented once here by :class:`PeriodicAveraging`:

1. ``warmup_steps`` optimizer steps of ordinary synchronous training (the DDP hook exchanges
   gradients, compressed or not);
2. afterwards, *local steps*: :meth:`~PeriodicAveraging.communicates` is ``False``, so the hook
   skips the gradient exchange and each rank applies its own gradient;
3. after every ``period``-th local step (counted from the end of the warm-up) a *sync point*:
   the subclass's :meth:`~PeriodicAveraging._synchronize` averages the models.

Bytes are counted in the strategy's :class:`~lightning_compress.comm.ledger.BitLedger`. The DDP
hook closes the ledger's step only when it exchanged gradients, so on local steps the schedule
closes it itself, after the averaging collectives of a sync point have been recorded into it.
Every optimizer step is therefore one ledger step, and over a run the bytes per step are the
averaging bytes divided by the period.

Non-finite values (``CompressedDDP(nonfinite=...)``; the DDP hook does the same on the steps
that exchange gradients):

- on a local step, each rank checks its own gradients (one fused norm pass, one read to the
  host, no collective). ``"skip"``: the step is skipped on that rank only (no optimizer update,
  counted in ``comm_state.skipped_steps``, a warning); the others are not affected, and nothing
  non-finite reaches the next average. ``"raise"``: the gradients are dropped too, and the rank
  reports it in the next averaging collective, where every rank raises ``FloatingPointError``
  together (or at the end of ``fit``, if it comes first);
- at a sync point, a rank whose model or optimizer state is non-finite (NaN reached it some other
  way) says so with one extra float in the averaging collective. ``"skip"``: it is left out of
  the average, takes the average of the others and restarts its optimizer state; ``"raise"``:
  every rank raises. If no rank is finite, every rank raises whatever the mode. ``"ignore"``:
  no check and no extra float, like stock DDP.

State that differs between ranks (each rank's local parameters in the middle of a period, the
base optimizer's local momentum buffers) is saved per rank, because Lightning's checkpoint keeps
rank 0's weights and optimizer state only; on resume every rank gets its own back, so a resumed
run continues exactly like an uninterrupted one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from lightning_compress._compat import foreach_norm
from lightning_compress.comm.collectives import allreduce_mean, nonfinite_flag, write_flat_
from lightning_compress.comm.ledger import BitLedger, allreduce_wire_bytes
from lightning_compress.exchange import flatten, split_by_size
from lightning_compress.sync.base import SyncContext, SyncSchedule

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch.optim import Optimizer

log = logging.getLogger(__name__)

STATE_VERSION = 1


@torch.no_grad()
def allreduce_average_(
    tensors: Sequence[Tensor],
    group: dist.ProcessGroup | None,
    ledger: BitLedger | None,
    *,
    left_out: bool = False,
    n_left_out: int = 0,
) -> Tensor:
    """Replace ``tensors`` by their average over ranks with ONE fused float32 allreduce.

    One collective for the whole model, not one per tensor: per-call latency dominates small
    tensors, and a single call keeps the order of collectives trivially identical on all ranks.
    The bytes are recorded in ``ledger`` (payload, wire and dense-baseline figures).

    Args:
        tensors: replaced in place by the average.
        group: the process group.
        ledger: where the bytes are recorded (``None``: nowhere).
        left_out: this rank is left out of the average: it sends zeros and receives the average of
            the others.
        n_left_out: how many ranks are left out, known identically on every rank (from an earlier
            collective, :func:`allreduce_average_checked_`); the sum is divided by the others.

    Returns:
        The averaged flat float32 vector (identical on every rank).

    """
    flat = flatten(tensors)
    if flat.numel() == 0:
        return flat
    if left_out:
        flat.zero_()
    world = dist.get_world_size(group)
    if ledger is not None:
        ledger.record_coords(flat.numel(), 4 * flat.numel(), world)
    if n_left_out == 0:
        allreduce_mean(flat, group, ledger)
    else:
        _allreduce_sum(flat, group, ledger)
        flat.div_(world - n_left_out)
    write_flat_(tensors, flat)
    return flat


@torch.no_grad()
def allreduce_average_checked_(
    tensors: Sequence[Tensor],
    group: dist.ProcessGroup | None,
    ledger: BitLedger | None,
    device: torch.device,
    also_bad: Tensor | None = None,
) -> tuple[int, bool]:
    """Average ``tensors`` over the ranks whose contribution is finite; one allreduce, one float more.

    Each rank appends a flag (1.0 if its ``tensors`` hold NaN/Inf, or if ``also_bad`` is 1) to the
    flat vector and sends zeros instead of its values when the flag is set; the sum of the flags
    is how many ranks were left out, identical on every rank. Every rank, a left-out one too, then
    holds the average of the others. If every rank is left out, ``tensors`` are not changed.
    An empty ``tensors`` sends the flag alone.

    Args:
        tensors: replaced in place by the average of the finite ranks.
        group: the process group.
        ledger: where the bytes are recorded (the flag counts as payload, not as a coordinate).
        device: where the collective runs (the model's device).
        also_bad: a 1-element flag (0.0 or 1.0) on ``device``: leave this rank out for another
            reason as well (non-finite optimizer state or model delta, an earlier local step).

    Returns:
        ``(left_out, mine)``: how many ranks were left out, and whether this rank was.

    """
    flat = flatten(tensors).to(device)
    n = flat.numel()
    flag = nonfinite_flag([flat], device)
    if also_bad is not None:
        flag = torch.maximum(flag, also_bad.to(flag))
    flat = torch.cat([flat.masked_fill_(flag.bool(), 0.0), flag])  # 0·NaN is NaN: fill, not multiply
    world = dist.get_world_size(group)
    if ledger is not None:
        ledger.record_coords(n, 4 * flat.numel(), world)
    _allreduce_sum(flat, group, ledger)
    left_out, mine = torch.stack([flat[n], flag[0]]).tolist()  # one read to the host
    n_bad = round(left_out)
    if n and n_bad < world:
        write_flat_(tensors, flat[:n].div_(world - n_bad))
    return n_bad, mine > 0


def _allreduce_sum(flat: Tensor, group: dist.ProcessGroup | None, ledger: BitLedger | None) -> None:
    dist.all_reduce(flat, group=group)
    if ledger is not None:
        nbytes = flat.numel() * flat.element_size()
        ledger.record(nbytes, allreduce_wire_bytes(nbytes, dist.get_world_size(group)))


# -- non-finite values ---------------------------------------------------------------------------
def gradients_finite(params: Iterable[Tensor]) -> bool:
    """Whether every gradient of ``params`` is finite: one fused pass, one read to the host.

    The fused pass is ``torch._foreach_norm`` (2-norm, through ``_compat``: a sum of squares keeps
    every NaN and Inf, where a max may drop a NaN on some devices). It overflows for finite
    gradients above about 1e19, so a non-finite norm is confirmed exactly with
    :func:`nonfinite_flag` (the rare path).
    """
    grads = [p.grad for p in params if p.grad is not None]
    grads = [g.coalesce().values() if g.is_sparse else g for g in grads]
    if not grads:
        return True
    if bool(torch.stack(foreach_norm(grads)).isfinite().all()):
        return True
    return not bool(nonfinite_flag(grads, grads[0].device).item())


def reset_optimizer_state(optimizers: Sequence[Optimizer], params: Sequence[Tensor] | None = None) -> None:
    """Drop the optimizers' state (momentum, Adam moments and step) of ``params`` (default: all)."""
    keep = None if params is None else {id(p) for p in params}
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                if keep is None or id(p) in keep:
                    opt.state.pop(p, None)


def learning_rates(optimizers: Sequence[Optimizer], params: Sequence[Tensor]) -> float | Tensor:
    """Return the learning rate ``γ`` of every element of ``flatten(params)``.

    A float when every parameter has the same rate (one parameter group, the common case), else
    a flat vector built from each parameter's group. Parameters that no optimizer holds get 0
    (they are not trained; the schedules treat ``γ = 0`` as "no movement").
    """
    lr_of: dict[int, float] = {}
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                lr_of[id(p)] = float(group["lr"])
    values = [lr_of.get(id(p), 0.0) for p in params]
    if not values or all(v == values[0] for v in values):
        return values[0] if values else 0.0
    device = params[0].device
    parts = [
        torch.full((p.numel(),), v, dtype=torch.float32, device=device)
        for p, v in zip(params, values, strict=True)
    ]
    return torch.cat(parts)


def divide_by_lr(x: Tensor, lr: float | Tensor) -> Tensor:
    """``x / γ`` elementwise, with 0 where ``γ == 0`` (a frozen parameter moves by nothing)."""
    if isinstance(lr, Tensor):
        return torch.where(lr > 0, x / lr.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(x))
    return x / lr if lr > 0 else torch.zeros_like(x)


def optimizer_buffers(optimizers: Sequence[Optimizer]) -> list[Tensor]:
    """List the base optimizers' per-parameter floating buffers (momentum, Adam moments) in a fixed order.

    Only tensors shaped like their parameter are taken: scalar entries such as Adam's ``step``
    are counters, identical on every rank, not buffers to average.
    """
    out: list[Tensor] = []
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                state = opt.state.get(p, {})
                for key in sorted(state):
                    t = state[key]
                    if isinstance(t, Tensor) and t.is_floating_point() and t.shape == p.shape:
                        out.append(t)
    return out


def compressed_first(
    named: list[tuple[str, Tensor]], min_size: int
) -> tuple[list[tuple[str, Tensor]], int, int]:
    """``(ordered, elements, count)``: the parameters a codec compresses first, then the rest.

    The compressed ones (at least ``min_size`` elements) are then one leading slice of every
    flat vector over ``ordered``, of ``elements`` elements and ``count`` parameters.
    """
    small, large = split_by_size(named, lambda item: item[1].numel(), min_size, warm=False)
    return large + small, sum(p.numel() for _, p in large), len(large)


def check_optional_bool(name: str, value: Any) -> bool | None:
    """``value`` if it is ``True``, ``False`` or ``None`` (automatic); else a ``TypeError`` naming it."""
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{name} must be True, False or None (automatic), got {value!r}")
    return value


def check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def check_number(name: str, value: Any, low: float, high: float, low_open: bool, high_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    ok_low = v > low if low_open else v >= low
    ok_high = v < high if high_open else v <= high
    if not (ok_low and ok_high):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return v


# -- the base schedule -----------------------------------------------------------------------
class PeriodicAveraging(SyncSchedule):
    """Warm-up, then local steps with a sync point every ``period`` steps (see the module docstring).

    Subclasses implement :meth:`_init_state` (state taken from the model at the start of the local
    phase), :meth:`_synchronize` (what a sync point does) and the ``_state_tensors`` /
    ``_load_tensors`` pair (their checkpointed tensors).

    Args:
        period: local optimizer steps between sync points (``τ``).
        warmup_steps: optimizer steps of ordinary synchronous training first.

    """

    def __init__(self, period: int, warmup_steps: int = 0) -> None:
        self.period = check_int("period", period, 1)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        self._layout: list[tuple[str, int]] = []
        # bound in setup, to this process (not pickled for spawn)
        self._params: list[Tensor]
        self._buffers: list[Tensor]
        self.add_transient("_params", factory=list)
        self.add_transient("_buffers", factory=list)
        #: what differs between ranks, taken by before_save for the next state_dict
        self.add_transient("_snapshot", factory=dict)
        self.add_transient("_opt_hook")
        #: ``nonfinite="raise"``: this rank had non-finite gradients at a local step that the
        #: other ranks have not heard of yet (they learn it in the next averaging collective)
        self._raise_pending = False

    # -- the schedule (pure functions of the step counter: identical on every rank) ---------
    def communicates(self, step: int) -> bool:
        """Gradients are exchanged during the warm-up only."""
        return step < self.warmup_steps

    def is_sync_step(self, step: int) -> bool:
        """Whether the models are averaged after optimizer step ``step`` (0-based)."""
        return step >= self.warmup_steps and (step + 1 - self.warmup_steps) % self.period == 0

    def ranks_may_differ(self, steps_done: int) -> bool:
        """Whether the ranks' parameters may differ after ``steps_done`` optimizer steps."""
        return steps_done > self.warmup_steps and (steps_done - self.warmup_steps) % self.period != 0

    # -- lifecycle ---------------------------------------------------------------------------
    def run_closure(
        self, ctx: SyncContext, optimizer: Optimizer, closure: Callable[[], Any], step: int
    ) -> Any:
        """Run the step; on a local step, check this rank's gradients (locally: no collective)."""
        result = closure()
        # under a GradScaler (float16 mixed precision) the scaler skips an overflowing local step
        # itself and backs off; dropping the gradients first would leave it no inf check to record
        if not self.communicates(step) and _checks(ctx) and not ctx.comm.loss_scaled:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if not gradients_finite(params):
                self._on_local_nonfinite(ctx, step)
        return result

    def _on_local_nonfinite(self, ctx: SyncContext, step: int) -> None:
        comm = ctx.comm
        # CompressedDDP drops the gradients: no update on this rank, nothing non-finite to average;
        # counted as skipped under "skip" ("raise" raises at the next exchange between ranks)
        comm.skip_step(counted=comm.nonfinite != "raise")
        message = (f"{type(self).__name__}: non-finite gradients (NaN/Inf) on rank "
                   f"{dist.get_rank(comm.process_group)} at local step {step}")
        if comm.nonfinite == "raise":
            # raising here alone would leave the other ranks to find out at the next collective
            # (a connection error, or a hang until the timeout on NCCL); every rank raises there
            # together instead
            self._raise_pending = True
            log.error("%s: gradients dropped; every rank raises FloatingPointError at the next exchange "
                      "between ranks (a sync point's average, or the end of fit)", message)
            return
        log.warning("%s: step skipped on this rank only; a local step, so the other ranks are unaffected "
                    "and nothing non-finite reaches the next average", message)

    def _contribution_flag(self, ctx: SyncContext, tensors: Sequence[Tensor] = ()) -> Tensor:
        """Whether this rank must be left out of the next average, as a 1-element 0/1 device tensor.

        It must if ``tensors`` or its optimizer state hold NaN/Inf, or if it has a non-finite local
        step to report (``"raise"``).
        """
        flag = nonfinite_flag(list(tensors) + optimizer_buffers(ctx.optimizers), self._device)
        if self._raise_pending:
            flag.fill_(1.0)
        self._raise_pending = False
        return flag

    def _on_left_out(self, ctx: SyncContext, step: int, n_bad: int, mine: bool) -> None:
        """After an averaging collective that left ``n_bad`` ranks out (``mine``: this one)."""
        if n_bad == 0:
            return
        comm = ctx.comm
        world = dist.get_world_size(comm.process_group)
        name = type(self).__name__
        if comm.nonfinite == "raise":
            raise FloatingPointError(
                f"{name}: non-finite gradients or parameters (NaN/Inf) on {n_bad} of {world} ranks since "
                f"the previous sync point (found at the sync point after step {step}); set "
                "nonfinite='skip' to skip such steps instead"
            )
        if n_bad == world:
            raise FloatingPointError(
                f"{name}: non-finite parameters or optimizer state (NaN/Inf) on every rank ({n_bad} of "
                f"{world} ranks) at the sync point after step {step}: there is no finite model to average"
            )
        log.warning("%s: non-finite parameters or optimizer state (NaN/Inf) on %d of %d ranks at the sync "
                    "point after step %d: left out of the average, they continue from the average of the "
                    "other %d", name, n_bad, world, step, world - n_bad)
        if mine:
            comm.count_discarded()
            log.warning("%s: rank %d was left out: its steps since the previous sync point are discarded and "
                        "its optimizer state restarts", name, dist.get_rank(comm.process_group))

    def on_train_end(self, ctx: SyncContext) -> None:
        """With ``nonfinite="raise"``: report local steps after the last sync point (one float)."""
        comm = ctx.comm
        steps = ctx.steps_done
        if comm.nonfinite != "raise" or not PeriodicAveraging.ranks_may_differ(self, steps):
            return
        flag = torch.tensor([float(self._raise_pending)], device=self._device)
        self._raise_pending = False
        _allreduce_sum(flag, comm.process_group, comm.ledger)
        n_bad = round(flag.item())
        if n_bad:
            world = dist.get_world_size(comm.process_group)
            raise FloatingPointError(
                f"{type(self).__name__}: non-finite gradients (NaN/Inf) on {n_bad} of {world} ranks at local "
                f"steps after the last sync point (found when fit ended, after step {steps - 1}); set "
                "nonfinite='skip' to skip such steps instead"
            )

    def setup(self, ctx: SyncContext) -> None:
        """Bind the model's parameters and float buffers; restore a checkpoint or start fresh."""
        module = ctx.module
        assert module is not None
        self._raise_pending = False
        self._bind(module, ctx)
        ddp = ctx.model
        if self._buffers and getattr(ddp, "broadcast_buffers", False):
            # DDP would broadcast rank 0's buffers at every forward: a collective on every local
            # step, which also overwrites each rank's local statistics. Buffers are averaged at
            # sync points instead.
            log.info(f"{type(self).__name__}: turning off DDP's per-forward buffer broadcast; "
                     "float buffers are averaged at sync points")
            ddp.broadcast_buffers = False  # type: ignore[union-attr]
        if not self.apply_restored(ctx):
            self._init_state(ctx)

    def after_optimizer_step(self, ctx: SyncContext, optimizer: Optimizer, step: int) -> None:
        """Start the local phase at the end of the warm-up; sync at sync points; record the baseline."""
        self._snapshot = {}
        if step < self.warmup_steps:
            if step == self.warmup_steps - 1:
                self._init_state(ctx)  # replicas are identical now: the local phase starts here
            return  # the hook exchanged gradients, which recorded the step's baseline
        if self.is_sync_step(step):
            self._synchronize(ctx, optimizer, step)
        # the hook did not exchange (communicates() was False). The baseline is what stock DDP
        # would have sent in this step: one float32 allreduce of every trainable parameter's
        # gradient, so the compression ratio shows the τ-fold saving. The strategy closes the step.
        numel = sum(p.numel() for p in self._params)
        ctx.comm.ledger.current.dense_wire_bytes = allreduce_wire_bytes(4 * numel, ctx.world_size)

    def before_save(self, ctx: SyncContext) -> None:
        """Keep what differs between ranks (local parameters, optimizer buffers) for the checkpoint."""
        snapshot: dict[str, Any] = {}
        if self._params and self.ranks_may_differ(ctx.steps_done):
            snapshot["local"] = flatten(self._params + self._buffers)
        if ctx.steps_done > self.warmup_steps and ctx.optimizers:
            states = [_clone(opt.state_dict()["state"]) for opt in ctx.optimizers]
            if any(states):
                snapshot["optimizer_states"] = states
        self._snapshot = snapshot

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"version": STATE_VERSION, "layout": list(self._layout)}
        state.update(self._snapshot)
        state.update({k: v.detach().clone() for k, v in self._state_tensors().items() if v is not None})
        state.update(self._state_extra())
        return state

    # -- subclass interface ------------------------------------------------------------------
    def _init_state(self, ctx: SyncContext) -> None:
        """Take the state of a fresh local phase from the (identical) model replicas."""

    def _synchronize(self, ctx: SyncContext, optimizer: Optimizer, step: int) -> None:
        raise NotImplementedError

    def _state_tensors(self) -> dict[str, Tensor | None]:
        return {}

    def _state_extra(self) -> dict[str, Any]:
        return {}

    def _load_tensors(self, state: dict[str, Any], device: torch.device) -> None:
        """Restore the tensors of :meth:`_state_tensors` (on ``device``)."""

    # -- helpers -----------------------------------------------------------------------------
    def _order(self, named: list[tuple[str, Tensor]], ctx: SyncContext) -> list[tuple[str, Tensor]]:
        """Order the parameters of every flat vector (model order; subclasses may regroup)."""
        return named

    def _bind(self, module: nn.Module, ctx: SyncContext) -> None:
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        named = self._order(named, ctx)
        buffers = [(n, b) for n, b in module.named_buffers() if b.is_floating_point()]
        self._params = [p for _, p in named]
        self._buffers = [b for _, b in buffers]
        self._layout = [(n, p.numel()) for n, p in named] + [(f"buffer:{n}", b.numel()) for n, b in buffers]

    @property
    def _device(self) -> torch.device:
        return self._params[0].device if self._params else torch.device("cpu")

    def apply_restored(self, ctx: SyncContext) -> bool:  # type: ignore[override]
        """Apply a loaded :meth:`state_dict` (stashed by ``load_state_dict``); whether it fit this model."""
        state = self.pending_state
        self._restored = None
        return bool(state) and self._restore(state, ctx)

    def _restore(self, state: dict[str, Any], ctx: SyncContext) -> bool:
        layout = [tuple(x) for x in state.get("layout", [])]
        if not layout:
            return False
        if layout != [tuple(x) for x in self._layout]:
            log.warning(f"{type(self).__name__}: the checkpoint's model layout differs from this model's; "
                        "the schedule's state starts fresh")
            return False
        device = self._device
        self._load_tensors(state, device)
        local = state.get("local")
        if local is not None:
            # this rank's own parameters: Lightning restored rank 0's into every rank
            write_flat_(self._params + self._buffers, local.to(device))
        states = state.get("optimizer_states")
        if states:
            # Lightning restores rank 0's optimizer state after setup; this rank's buffers are put
            # back just before the first forward of the resumed run.
            self._opt_hook = ctx.model.register_forward_pre_hook(  # type: ignore[union-attr]
                _OptimizerRestore(self, ctx, states)
            )
        return True

    def __repr__(self) -> str:
        return f"{type(self).__name__}(period={self.period}, warmup_steps={self.warmup_steps})"


class _OptimizerRestore:
    """Forward pre-hook that loads this rank's saved optimizer state once, then removes itself."""

    def __init__(self, schedule: PeriodicAveraging, ctx: SyncContext, states: list[dict]) -> None:
        self.schedule = schedule
        self.ctx = ctx
        self.states = states

    def __call__(self, module: nn.Module, args: Any) -> None:
        handle, self.schedule._opt_hook = self.schedule._opt_hook, None
        if handle is not None:
            handle.remove()
        optimizers = self.ctx.optimizers
        if len(optimizers) != len(self.states):
            log.warning("%s: the checkpoint holds %d optimizer states per rank, this run has %d optimizers; "
                        "keeping rank 0's", type(self.schedule).__name__, len(self.states), len(optimizers))
            return
        for opt, saved in zip(optimizers, self.states, strict=True):
            opt.load_state_dict({"state": saved, "param_groups": opt.state_dict()["param_groups"]})


def _clone(obj: Any) -> Any:
    return apply_to_collection(obj, Tensor, lambda t: t.detach().clone())


def _checks(ctx: SyncContext) -> bool:
    return ctx.comm.nonfinite != "ignore"


__all__ = [
    "PeriodicAveraging",
    "allreduce_average_",
    "allreduce_average_checked_",
    "divide_by_lr",
    "flatten",
    "gradients_finite",
    "learning_rates",
    "nonfinite_flag",
    "optimizer_buffers",
    "reset_optimizer_state",
    "write_flat_",
]
