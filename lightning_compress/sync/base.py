"""What happens around ``optimizer.step``: the base of every synchronization schedule."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch.optim import Optimizer

    from lightning_compress.strategy import CompressedDDP


class SyncSchedule:
    """Synchronous data parallelism: every optimizer step averages the (compressed) gradients.

    Subclasses change *when* ranks communicate and *what* they exchange. The strategy calls:

    - :meth:`setup` once the model is wrapped in DDP and the hook registered;
    - :meth:`communicates` before each optimizer step's backward pass: ``False`` turns the
      gradient exchange off for that step (local steps);
    - :meth:`run_closure` inside ``optimizer.step``, to run the step's forward and backward and
      leave the gradients the optimizer applies (backup workers exchange them here);
    - :meth:`after_optimizer_step` after each optimizer step (model averaging, slow momentum);
    - :meth:`state_dict` / :meth:`load_state_dict` with every checkpoint (per rank).

    Every decision must be a function of values identical on every rank (the step counter, the
    configuration), or the ranks' collectives stop matching.
    """

    def setup(self, strategy: CompressedDDP) -> None:
        """Called once the model is wrapped and the communication hook registered."""

    def communicates(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based) exchanges gradients."""
        return True

    def run_closure(
        self, strategy: CompressedDDP, optimizer: Optimizer, closure: Callable[[], Any], step: int
    ) -> Any:
        """Run optimizer step ``step``'s closure (forward and backward) and return its result.

        Called by ``optimizer.step`` before it updates the parameters, and before gradient
        clipping and ``on_before_optimizer_step``: whatever is in ``.grad`` when this returns is
        what the optimizer applies.
        """
        return closure()

    def after_optimizer_step(self, strategy: CompressedDDP, optimizer: Optimizer, step: int) -> None:
        """Called after optimizer step ``step`` (0-based) has been applied."""

    def on_train_end(self, strategy: CompressedDDP) -> None:
        """Run once when ``fit`` ends normally (not after an exception)."""

    def before_save(self, strategy: CompressedDDP) -> None:
        """Called before the state is saved (complete pending asynchronous work here)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
