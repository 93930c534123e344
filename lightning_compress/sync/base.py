"""What happens around ``optimizer.step``: the base of every synchronization schedule."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lightning_compress.state import DeclaredState

if TYPE_CHECKING:
    from torch import nn
    from torch.optim import Optimizer

    from lightning_compress.hooks import CompressionState


@dataclass(frozen=True)
class SyncContext:
    """What a schedule sees of the run: handed to every :class:`SyncSchedule` call by the strategy.

    A schedule needs the exchange's state, the model and the optimizers, never the strategy
    itself; so ``sync/`` imports nothing from ``strategy.py`` and a schedule can be driven by
    anything that builds this context (a test, another trainer).

    Attributes:
        comm: the exchange's state (codec, settings, ledger, memories, process group).
        module: the LightningModule (the unwrapped model).
        model: the DDP-wrapped model.
        rank: this rank in the process group.
        world_size: ranks in the process group.
        trainer: the Lightning ``Trainer``.

    The precision plugin's ``GradScaler`` (``precision="16-mixed"``) is ``comm.scaler``.

    """

    comm: CompressionState
    module: nn.Module
    model: Any
    rank: int
    world_size: int
    trainer: Any
    _optimizers: Callable[[], Sequence[Optimizer]]
    _steps_done: Callable[[], int]

    @property
    def optimizers(self) -> list[Optimizer]:
        """The run's optimizers (read when asked: Lightning creates them after the model is wrapped)."""
        return list(self._optimizers())

    @property
    def steps_done(self) -> int:
        """Optimizer steps taken so far (identical on every rank; checkpointed by the strategy)."""
        return self._steps_done()


class SyncSchedule(DeclaredState):
    """Synchronous data parallelism: every optimizer step averages the (compressed) gradients.

    Subclasses change *when* ranks communicate and *what* they exchange. The strategy calls,
    each with a :class:`SyncContext`:

    - :meth:`setup` once the model is wrapped in DDP and the hook registered;
    - :meth:`communicates` before each optimizer step's backward pass: ``False`` turns the
      gradient exchange off for that step (local steps);
    - :meth:`run_closure` inside ``optimizer.step``, to run the step's forward and backward and
      leave the gradients the optimizer applies (backup workers exchange them here);
    - :meth:`after_optimizer_step` after each optimizer step (model averaging, slow momentum);
    - :meth:`on_collective` when anything calls one of the strategy's collectives (Lightning's
      ``self.log(..., sync_dist=True)``, ``self.all_gather``, callbacks' decisions);
    - :meth:`state_dict` / :meth:`load_state_dict` with every checkpoint (per rank; state is
      declared with :meth:`~lightning_compress.state.DeclaredState.add_state`).

    Every decision must be a function of values identical on every rank (the step counter, the
    configuration), or the ranks' collectives stop matching.

    A schedule that has figures to log declares their names in :attr:`logged_metrics` and
    returns them from :meth:`metrics`; :class:`~lightning_compress.CommunicationMonitor` logs them.
    """

    #: the names :meth:`metrics` returns (what the monitor logs for this schedule)
    logged_metrics: tuple[str, ...] = ()

    def setup(self, ctx: SyncContext) -> None:
        """Called once the model is wrapped and the communication hook registered."""

    def communicates(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based) exchanges gradients."""
        return True

    def run_closure(
        self, ctx: SyncContext, optimizer: Optimizer, closure: Callable[[], Any], step: int
    ) -> Any:
        """Run optimizer step ``step``'s closure (forward and backward) and return its result.

        Called by ``optimizer.step`` before it updates the parameters, and before gradient
        clipping and ``on_before_optimizer_step``: whatever is in ``.grad`` when this returns is
        what the optimizer applies.
        """
        return closure()

    def after_optimizer_step(self, ctx: SyncContext, optimizer: Optimizer, step: int) -> None:
        """Called after optimizer step ``step`` (0-based) has been applied."""

    def on_train_end(self, ctx: SyncContext) -> None:
        """Run once when ``fit`` ends normally (not after an exception)."""

    def teardown(self) -> None:
        """When the strategy tears down, after a failure too: release threads or groups (no-op)."""

    def on_collective(self, name: str) -> None:
        """The strategy's collective ``name`` (reduce, all_gather, broadcast, barrier) was called."""

    def before_save(self, ctx: SyncContext) -> None:
        """Called before the state is saved (complete pending asynchronous work here)."""

    def metrics(self) -> dict[str, float]:
        """This rank's figures of the last step, named as in :attr:`logged_metrics` (default: none)."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
