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

State that differs between ranks (each rank's local parameters in the middle of a period, the
base optimizer's local momentum buffers) is saved per rank, because Lightning's checkpoint keeps
rank 0's weights and optimizer state only; on resume every rank gets its own back, so a resumed
run continues exactly like an uninterrupted one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from lightning_compress.comm.collectives import allreduce_mean, write_flat_
from lightning_compress.comm.ledger import BitLedger, allreduce_wire_bytes
from lightning_compress.sync.base import SyncSchedule

if TYPE_CHECKING:
    from torch.optim import Optimizer

    from lightning_compress.strategy import CompressedDDP

log = logging.getLogger(__name__)

STATE_VERSION = 1


# -- flat vectors ----------------------------------------------------------------------------
def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate ``tensors`` into one new flat float32 vector (empty if there are none)."""
    if not tensors:
        return torch.empty(0, dtype=torch.float32)
    return torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors])


@torch.no_grad()
def allreduce_average_(
    tensors: Sequence[Tensor], group: dist.ProcessGroup | None, ledger: BitLedger | None
) -> Tensor:
    """Replace ``tensors`` by their average over ranks with ONE fused float32 allreduce.

    One collective for the whole model, not one per tensor: per-call latency dominates small
    tensors, and a single call keeps the order of collectives trivially identical on all ranks.
    The bytes are recorded in ``ledger`` (payload, wire and dense-baseline figures).

    Returns:
        The averaged flat float32 vector (identical on every rank).

    """
    flat = flatten(tensors)
    if flat.numel() == 0:
        return flat
    if ledger is not None:
        ledger.record_coords(flat.numel(), 4 * flat.numel(), dist.get_world_size(group))
    allreduce_mean(flat, group, ledger)
    write_flat_(tensors, flat)
    return flat


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
        # bound in setup (not pickled)
        self._params: list[Tensor] = []
        self._buffers: list[Tensor] = []
        self._layout: list[tuple[str, int]] = []
        self._loaded: dict[str, Any] | None = None
        self._snapshot: dict[str, Any] = {}
        self._opt_hook: Any = None

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
    def setup(self, strategy: CompressedDDP) -> None:
        """Bind the model's parameters and float buffers; restore a checkpoint or start fresh."""
        module = strategy.lightning_module
        assert module is not None
        self._bind(module, strategy)
        ddp = strategy.model
        if self._buffers and getattr(ddp, "broadcast_buffers", False):
            # DDP would broadcast rank 0's buffers at every forward: a collective on every local
            # step, which also overwrites each rank's local statistics. Buffers are averaged at
            # sync points instead.
            log.info(f"{type(self).__name__}: turning off DDP's per-forward buffer broadcast; "
                     "float buffers are averaged at sync points")
            ddp.broadcast_buffers = False  # type: ignore[union-attr]
        loaded, self._loaded = self._loaded, None
        if loaded and self._restore(loaded, strategy):
            return
        self._init_state(strategy)

    def after_optimizer_step(self, strategy: CompressedDDP, optimizer: Optimizer, step: int) -> None:
        """Start the local phase at the end of the warm-up; sync at sync points; close the ledger step."""
        self._snapshot = {}
        if step < self.warmup_steps:
            if step == self.warmup_steps - 1:
                self._init_state(strategy)  # replicas are identical now: the local phase starts here
            return  # the hook exchanged gradients and closed the ledger step
        if self.is_sync_step(step):
            self._synchronize(strategy, optimizer, step)
        # the hook did not exchange (communicates() was False) and so did not close the step.
        # The baseline is what stock DDP would have sent in this step: one float32 allreduce of
        # every trainable parameter's gradient, so the compression ratio shows the τ-fold saving.
        ledger = strategy.comm_state.ledger
        numel = sum(p.numel() for p in self._params)
        ledger.current.dense_wire_bytes = allreduce_wire_bytes(4 * numel, strategy.world_size)
        ledger.end_step()

    def before_save(self, strategy: CompressedDDP) -> None:
        """Keep what differs between ranks (local parameters, optimizer buffers) for the checkpoint."""
        snapshot: dict[str, Any] = {}
        if self._params and self.ranks_may_differ(strategy.optimizer_steps):
            snapshot["local"] = flatten(self._params + self._buffers)
        if strategy.optimizer_steps > self.warmup_steps and strategy.optimizers:
            states = [_clone(opt.state_dict()["state"]) for opt in strategy.optimizers]
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

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Stash a :meth:`state_dict`; it is applied in :meth:`setup`, once the model is wrapped."""
        if not isinstance(state, dict):
            raise TypeError(f"{type(self).__name__} state must be a dict, got {type(state).__name__}")
        self._loaded = dict(state) if state else None

    # -- subclass interface ------------------------------------------------------------------
    def _init_state(self, strategy: CompressedDDP) -> None:
        """Take the state of a fresh local phase from the (identical) model replicas."""

    def _synchronize(self, strategy: CompressedDDP, optimizer: Optimizer, step: int) -> None:
        raise NotImplementedError

    def _state_tensors(self) -> dict[str, Tensor | None]:
        return {}

    def _state_extra(self) -> dict[str, Any]:
        return {}

    def _load_tensors(self, state: dict[str, Any], device: torch.device) -> None:
        """Restore the tensors of :meth:`_state_tensors` (on ``device``)."""

    # -- helpers -----------------------------------------------------------------------------
    def _order(self, named: list[tuple[str, Tensor]], strategy: CompressedDDP) -> list[tuple[str, Tensor]]:
        """Order the parameters of every flat vector (model order; subclasses may regroup)."""
        return named

    def _bind(self, module: nn.Module, strategy: CompressedDDP) -> None:
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        named = self._order(named, strategy)
        buffers = [(n, b) for n, b in module.named_buffers() if b.is_floating_point()]
        self._params = [p for _, p in named]
        self._buffers = [b for _, b in buffers]
        self._layout = [(n, p.numel()) for n, p in named] + [(f"buffer:{n}", b.numel()) for n, b in buffers]

    @property
    def _device(self) -> torch.device:
        return self._params[0].device if self._params else torch.device("cpu")

    def _restore(self, state: dict[str, Any], strategy: CompressedDDP) -> bool:
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
            self._opt_hook = strategy.model.register_forward_pre_hook(  # type: ignore[union-attr]
                _OptimizerRestore(self, strategy, states)
            )
        return True

    def __getstate__(self) -> dict[str, Any]:
        # spawn pickles the strategy into its children: no bound tensors, hooks or pending work
        d = self.__dict__.copy()
        d["_params"] = []
        d["_buffers"] = []
        d["_snapshot"] = {}
        d["_opt_hook"] = None
        return d

    def __repr__(self) -> str:
        return f"{type(self).__name__}(period={self.period}, warmup_steps={self.warmup_steps})"


class _OptimizerRestore:
    """Forward pre-hook that loads this rank's saved optimizer state once, then removes itself."""

    def __init__(self, schedule: PeriodicAveraging, strategy: CompressedDDP, states: list[dict]) -> None:
        self.schedule = schedule
        self.strategy = strategy
        self.states = states

    def __call__(self, module: nn.Module, args: Any) -> None:
        handle, self.schedule._opt_hook = self.schedule._opt_hook, None
        if handle is not None:
            handle.remove()
        optimizers = self.strategy.optimizers
        if len(optimizers) != len(self.states):
            log.warning("%s: the checkpoint holds %d optimizer states per rank, this run has %d optimizers; "
                        "keeping rank 0's", type(self.schedule).__name__, len(self.states), len(optimizers))
            return
        for opt, saved in zip(optimizers, self.states, strict=True):
            opt.load_state_dict({"state": saved, "param_groups": opt.state_dict()["param_groups"]})


def _clone(obj: Any) -> Any:
    return apply_to_collection(obj, Tensor, lambda t: t.detach().clone())


__all__ = [
    "PeriodicAveraging",
    "allreduce_average_",
    "divide_by_lr",
    "flatten",
    "learning_rates",
    "optimizer_buffers",
    "write_flat_",
]
