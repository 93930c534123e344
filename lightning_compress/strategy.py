"""``CompressedDDP``: Lightning's ``DDPStrategy``, except that gradients travel compressed.

The body is :class:`CompressedDDPMixin`, free of any Lightning namespace; ``CompressedDDP`` here
puts it on ``pytorch_lightning``'s ``DDPStrategy`` and :mod:`lightning_compress.lightning` on
``lightning.pytorch``'s. It differs from ``DDPStrategy`` at these points only:

- ``setup``: after the optimizers exist, warns when momentum would be applied twice (in the
  exchange, ``momentum > 0``, and by the optimizer);
- ``_register_ddp_hooks``: registers the package's compressing comm hook on every device
  (stock Lightning registers hooks on CUDA only, silently);
- ``pre_backward`` / ``optimizer_step``: let the synchronization schedule decide whether a
  step communicates and what happens after it (Local SGD, SlowMo, ...);
- ``save_checkpoint`` / ``load_checkpoint``: every rank's compression state (error-feedback
  residuals, sketch momentum, RNG, ledger, schedule state) goes into the checkpoint and comes
  back to the same rank on resume;
- ``_configure_launcher``: with ``start_method="spawn"`` rank 0's ledger and step count come
  back to the main process, as Lightning brings back the weights and metrics.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
from lightning_utilities.core.apply_func import apply_to_collection
from lightning_utilities.core.rank_zero import rank_zero_warn
from pytorch_lightning.strategies import DDPStrategy
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from typing_extensions import override

from lightning_compress._compat import (
    _PATH,
    _StrategyRegistry,
    check_strategy_overrides,
    multiprocessing_launcher,
    set_strategy_launcher,
    strategy_launcher,
    strategy_start_method,
)
from lightning_compress.checkpoint_schema import validate_entry
from lightning_compress.compressors import Compressor
from lightning_compress.fingerprint import check_settings_agree, settings_of
from lightning_compress.hooks import CompressionState, register_compression_hook
from lightning_compress.sync.base import SyncContext, SyncSchedule

if TYPE_CHECKING:
    import pytorch_lightning as pl

log = logging.getLogger(__name__)

#: the checkpoint key under which every rank's compression state is stored
CHECKPOINT_KEY = "lightning_compress"
_FORBIDDEN = ("ddp_comm_hook", "ddp_comm_state", "ddp_comm_wrapper", "model_averaging_period")


class CompressedDDPMixin:
    """Distributed data parallel training with compressed gradient exchange.

    Args:
        compressor: the codec or its alias: ``"qsgd"`` (QSGD, arXiv 1610.02132), ``"topk"``
            (Top-K, arXiv 1901.09847), ``"sketch"`` (Sketched SGD, arXiv 1903.04488), ``"none"``.
            Default: 8-bit QSGD, 4x fewer bytes than float32 with accuracy indistinguishable
            from it in the papers' experiments.
        error_feedback: add what compression dropped back into the next step's gradient. ``None``
            (default): on for biased codecs (Top-K), off for unbiased ones (QSGD).
        sync: when and what ranks exchange (:mod:`lightning_compress.sync`); ``None`` is plain
            synchronous training, one gradient exchange per optimizer step.
        min_compression_size: parameters with fewer elements are sent uncompressed (one dense
            allreduce for all of them); biases and norms cost more to compress than they save.
        warmup_steps: optimizer steps of uncompressed allreduce before compression begins.
        momentum: momentum applied inside the exchange, before compression (Top-K: momentum
            correction of Deep Gradient Compression, arXiv 1712.01887; count sketch: Sketched
            SGD's ``ρ``, arXiv 1903.04488): every rank keeps ``u ← m·u + g``, ``v ← v + u`` and
            sends the top ``k`` of ``v``. Use it with Top-K at 1% or less: it is what keeps Top-K
            near dense momentum SGD (measured on the benchmark MLP in docs/compression.md). The
            optimizer must then run **without** momentum (set it to 0; ``setup`` warns if it is
            not). Raises ``ValueError`` for QSGD / ``"none"`` and with a ``sync`` schedule other
            than every-step exchange (local steps would run without momentum). 0 (default): off;
            0.9 typical.
        momentum_masking: factor masking: zero ``u`` where ``v`` was just sent (DGC, on by
            default); see :class:`~lightning_compress.hooks.CompressionState`.
        seed: seed of the stochastic rounding (rank ``r`` uses ``seed + r``).
        nonfinite: ``"skip"`` (default): a step in which any rank's gradient holds NaN/Inf is
            skipped on every rank (no optimizer update, error-feedback memory untouched, a
            warning); ``"raise"``: ``FloatingPointError`` on every rank; ``"ignore"``: no check,
            like stock DDP.
        sketch_momentum: deprecated alias of ``momentum`` for a count sketch (warns).
        **kwargs: every :class:`~pytorch_lightning.strategies.DDPStrategy` argument
            (``process_group_backend``, ``timeout``, ``start_method``, ...) and every
            ``DistributedDataParallel`` one (``find_unused_parameters``, ``bucket_cap_mb``, ...);
            any other name raises ``TypeError`` naming the closest valid one.
            ``gradient_as_bucket_view`` defaults to ``True`` here (DDP's default is ``False``):
            the gradients are views of DDP's buckets, which the exchange reads and overwrites in
            place, so neither backward nor the end of the exchange copies the whole gradient
            between them (one gradient-sized buffer less; 263-268 against 272-274 ms per QSGD
            4-bit step in ``docs/benchmarks.md``). Pass ``False`` for code that assigns
            ``param.grad`` a new tensor.

    Example::

        trainer = pl.Trainer(accelerator="cpu", devices=2,
                             strategy=CompressedDDP(compressor=QSGD(bits=4)))

    With ``import lightning as L``, take it from :mod:`lightning_compress.lightning`.

    """

    strategy_name = "ddp_compressed"
    #: the namespace's spawn launcher with :class:`ReturnsCompressionState` (set by each namespace)
    _spawn_launcher: type

    def __init__(
        self,
        compressor: str | Compressor = "qsgd",
        error_feedback: bool | None = None,
        sync: SyncSchedule | None = None,
        min_compression_size: int = 1024,
        warmup_steps: int = 0,
        momentum: float = 0.0,
        momentum_masking: bool = True,
        seed: int = 0,
        nonfinite: str = "skip",
        sketch_momentum: float | None = None,
        **kwargs: Any,
    ) -> None:
        self._check_kwargs(kwargs)
        kwargs.setdefault("gradient_as_bucket_view", True)
        clash = [k for k in _FORBIDDEN if kwargs.get(k) is not None]
        if clash:
            raise ValueError(
                f"CompressedDDP installs its own communication hook; remove {clash} "
                "(use compressor= and sync= instead, e.g. sync=LocalSGD(period=8) for model averaging)"
            )
        if sync is not None and not isinstance(sync, SyncSchedule):
            raise TypeError(
                f"sync must be a lightning_compress.sync.SyncSchedule or None, got {type(sync).__name__}"
            )
        if isinstance(compressor, str) and compressor.strip().lower() == "qsgd":
            from lightning_compress.compressors import QSGD

            compressor = QSGD(bits=8)
        self.comm_state = CompressionState(
            compressor,
            error_feedback=error_feedback,
            min_compression_size=min_compression_size,
            warmup_steps=warmup_steps,
            momentum=momentum,
            momentum_masking=momentum_masking,
            sketch_momentum=sketch_momentum,
            seed=seed,
            nonfinite=nonfinite,
        )
        self.sync: SyncSchedule = sync if sync is not None else SyncSchedule()
        if self.comm_state.momentum > 0.0 and type(self.sync) is not SyncSchedule:
            raise ValueError(
                f"momentum={self.comm_state.momentum} lives in the per-step gradient exchange, and "
                f"sync={type(self.sync).__name__}(...) skips or replaces that exchange on some steps, which "
                "would then run without momentum; use momentum=0 here and keep the optimizer's momentum"
            )
        super().__init__(**kwargs)
        #: optimizer steps taken (identical on every rank; checkpointed)
        self.optimizer_steps = 0
        # this rank's part of a loaded checkpoint, applied when fit wraps the model (a
        # validate/test with ckpt_path loads the checkpoint too, and must not touch the ledger)
        self._restored: dict[str, Any] | None = None
        #: a gloo group for gathering checkpoint state on CPU when the default group is not gloo
        self._cpu_group: Any = None

    def _check_kwargs(self, kwargs: dict[str, Any]) -> None:
        """Refuse a name that neither ``DDPStrategy`` nor ``DistributedDataParallel`` takes."""
        valid = set(inspect.signature(CompressedDDPMixin.__init__).parameters)
        valid |= set(inspect.signature(super().__init__).parameters)  # the namespace's DDPStrategy
        valid |= set(inspect.signature(DistributedDataParallel.__init__).parameters)
        valid -= {"self", "kwargs", "module", "device_ids"}
        for name in kwargs:
            if name not in valid:
                close = difflib.get_close_matches(name, sorted(valid), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise TypeError(
                    f"CompressedDDP got an unexpected keyword argument {name!r}{hint} (it takes its own "
                    "arguments, DDPStrategy's and DistributedDataParallel's)"
                )

    @property
    def compressor(self) -> Compressor:
        return self.comm_state.compressor

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        for name, start_method in (("ddp_compressed", "popen"), ("ddp_compressed_spawn", "spawn")):
            if name in strategy_registry:
                continue
            strategy_registry.register(
                name,
                cls,
                description=f"DDP with compressed gradients, start_method '{start_method}'",
                start_method=start_method,
            )

    # -- wiring ------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer) -> None:
        # a Lightning that renamed the private methods overridden here would never call them
        check_strategy_overrides(type(self))
        # every rank, before DDP's own collectives: settings that differ fail here, by name
        check_settings_agree(settings_of(self), what="CompressedDDP")
        # before the schedule's setup (inside super().setup), which may refuse a GradScaler
        self._attach_scaler()
        super().setup(trainer)
        if dist.is_initialized() and self.world_size > 1 and dist.get_backend() != "gloo":
            # NCCL's gather_object would stage every rank's state on rank 0's GPU; gloo keeps it on
            # the host (created on every rank, here, in the same order: a collective call)
            self._cpu_group = dist.new_group(backend="gloo")
        self._warn_double_momentum()

    def _attach_scaler(self) -> None:
        """Hand the precision plugin's GradScaler (``precision="16-mixed"``) to the exchange.

        The exchange then divides the loss scale out before compressing and a skipped step goes
        through the scaler (see :attr:`~lightning_compress.hooks.CompressionState.scaler`).
        """
        self.comm_state.use_scaler(getattr(self.precision_plugin, "scaler", None), "CompressedDDP")

    def _warn_double_momentum(self) -> None:
        """One warning when momentum is on in the exchange and the optimizer has its own too."""
        momentum = self.comm_state.momentum
        if momentum <= 0.0:
            return
        found = []
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                name = type(optimizer).__name__
                if float(group.get("momentum", 0.0) or 0.0) > 0.0:
                    found.append(f"{name}(momentum={group['momentum']})")
                elif "betas" in group and float(group["betas"][0]) > 0.0:
                    found.append(f"{name}(betas={tuple(group['betas'])}, a momentum of {group['betas'][0]})")
        if found:
            rank_zero_warn(
                f"CompressedDDP(momentum={momentum}) applies momentum in the gradient exchange (momentum "
                f"correction, arXiv 1712.01887 / 1903.04488), and the optimizer has its own: {found[0]}. "
                "Momentum is applied twice. Set the optimizer's momentum to 0 (e.g. torch.optim.SGD(params, "
                "lr, momentum=0)), or CompressedDDP(momentum=0) to keep the optimizer's."
            )

    @override
    def _register_ddp_hooks(self) -> None:
        log.debug(f"{self.__class__.__name__}: registering the compression hook on {self.root_device}")
        assert self.model is not None
        self.comm_state.process_group = None
        self.comm_state.closes_steps = False  # optimizer_step closes the ledger's step
        if self.world_size > 1:
            register_compression_hook(self.model, self.comm_state)  # type: ignore[arg-type]
        else:
            # one process: DDP exchanges nothing, so compressing would only add rounding error
            rank_zero_warn(
                "CompressedDDP runs on a single process (world size 1): there is no gradient exchange, so "
                f"the codec ({self.compressor!r}) is skipped and gradients stay exact; nothing is counted"
            )
        self._apply_restored()
        self.sync.setup(self.sync_context)

    @property
    def sync_context(self) -> SyncContext:
        """What the schedule sees of this run (see :class:`~lightning_compress.sync.SyncContext`)."""
        module = self.lightning_module
        return SyncContext(
            comm=self.comm_state,
            module=module,  # type: ignore[arg-type]
            model=self.model,
            rank=self.global_rank,
            world_size=self.world_size,
            trainer=module.trainer if module is not None else None,
            _optimizers=lambda: self.optimizers,
            _steps_done=lambda: self.optimizer_steps,
        )

    @override
    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        launcher = strategy_launcher(self)
        if launcher is not None and hasattr(launcher, "update_main_process_results"):
            # spawn: bring rank 0's ledger and step count back to the main process with the weights
            set_strategy_launcher(self, self._spawn_launcher(self, start_method=strategy_start_method(self)))

    def _main_process_state(self) -> dict[str, Any]:
        return {
            "ledger": self.comm_state.ledger.state_dict(),
            "step": self.comm_state.step,
            "skipped_steps": self.comm_state.skipped_steps,
            "optimizer_steps": self.optimizer_steps,
        }

    def _load_main_process_state(self, state: dict[str, Any]) -> None:
        self.comm_state.ledger.load_state_dict(state["ledger"])
        self.comm_state.step = int(state["step"])
        self.comm_state.skipped_steps = int(state["skipped_steps"])
        self.optimizer_steps = int(state["optimizer_steps"])

    # -- the strategy's collectives: the schedule hears of each (backup workers stop skipping) --
    @override
    def reduce(self, *args: Any, **kwargs: Any) -> Any:
        self.sync.on_collective("reduce")
        return super().reduce(*args, **kwargs)

    @override
    def all_gather(self, *args: Any, **kwargs: Any) -> Any:
        self.sync.on_collective("all_gather")
        return super().all_gather(*args, **kwargs)

    @override
    def broadcast(self, *args: Any, **kwargs: Any) -> Any:
        self.sync.on_collective("broadcast")
        return super().broadcast(*args, **kwargs)

    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        self.sync.on_collective("barrier")
        super().barrier(*args, **kwargs)

    @override
    def pre_backward(self, closure_loss: Tensor) -> None:
        # before the backward whose exchange decides whether the step is skipped (in manual
        # optimization the backward runs before optimizer_step)
        self.comm_state.begin_step(self.sync.communicates(self.optimizer_steps))
        super().pre_backward(closure_loss)

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: Any = None,
        **kwargs: Any,
    ) -> Any:
        step = self.optimizer_steps
        ctx = self.sync_context
        module = self.lightning_module
        if module is None or module.automatic_optimization:
            # the closure below runs this step's backward (or a backup worker skips it); in manual
            # optimization the backward already ran and set the flag (reset in pre_backward)
            self.comm_state.begin_step(self.sync.communicates(step))

        def run_closure() -> Any:
            # the schedule runs forward/backward and may replace the gradients (backup workers)
            result = self.sync.run_closure(ctx, optimizer, closure, step)
            if self.comm_state.last_step_skipped:
                self._skip_step(optimizer)
            return result

        output = super().optimizer_step(optimizer, run_closure, model, **kwargs)
        self.sync.after_optimizer_step(ctx, optimizer, self.optimizer_steps)
        if self.world_size > 1 or type(self.sync) is not SyncSchedule:
            # one ledger step per optimizer step, whoever communicated in it (a single process
            # has no hook and counts nothing, unless a schedule averages)
            self.comm_state.close_step(owner=True)
        self.optimizer_steps += 1
        return output

    def _skip_step(self, optimizer: Optimizer) -> None:
        """Make ``optimizer.step`` leave parameters and optimizer state alone on this rank.

        Without a GradScaler the gradients are dropped (``None``). A GradScaler must instead see
        the overflow: its ``unscale_`` records Inf, ``step`` skips the optimizer and ``update``
        backs off the scale (dropped gradients would make it raise "No inf checks were recorded
        for this optimizer").
        """
        inf = self.comm_state.loss_scaled
        for group in optimizer.param_groups:
            for p in group["params"]:
                if not inf:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.fill_(math.inf)

    @override
    def on_train_end(self) -> None:
        self.sync.on_train_end(self.sync_context)
        super().on_train_end()

    # -- checkpointing -----------------------------------------------------------------------
    def compression_state_dict(self) -> dict[str, Any]:
        """This rank's state: the hook's memories and counters, and the schedule's state."""
        self.sync.before_save(self.sync_context)
        return _to_cpu(
            {
                "comm": self.comm_state.state_dict(),
                "sync": self.sync.state_dict(),
                "optimizer_steps": self.optimizer_steps,
            }
        )

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None
    ) -> None:
        # Residuals differ per rank; Lightning writes on rank 0 only, so rank 0 gathers every
        # rank's (gather, not all_gather: the other ranks do not stage W states in memory), over
        # gloo, on the host (see setup)
        mine = self.compression_state_dict()
        if dist.is_available() and dist.is_initialized() and self.world_size > 1:
            gathered: list[Any] | None = [None] * self.world_size if self.global_rank == 0 else None
            dist.gather_object(mine, gathered, dst=0, group=self._cpu_group)
            ranks = gathered if gathered is not None else [mine] * self.world_size  # not written
        else:
            ranks = [mine]
        checkpoint[CHECKPOINT_KEY] = {"version": 1, "world_size": len(ranks), "ranks": ranks}
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        self.restore_compression_state(checkpoint)
        return checkpoint

    def restore_compression_state(self, checkpoint: dict[str, Any]) -> None:
        """Take this rank's compression state from a checkpoint dict (applied when fit wraps the model)."""
        entry = checkpoint.get(CHECKPOINT_KEY)
        if entry is None:
            rank_zero_warn(
                "CompressedDDP: the checkpoint holds no compression state (saved by another strategy?); "
                "error-feedback memory and schedule state start fresh"
            )
            self._restored = None
            return
        # every rank checks every rank's part: all raise the same error together, no collective
        validate_entry(entry)
        if entry["world_size"] != self.world_size:
            rank_zero_warn(
                f"CompressedDDP: the checkpoint was saved by {entry['world_size']} ranks, this run has "
                f"{self.world_size}; per-rank error-feedback memory starts fresh"
            )
            self._restored = {"optimizer_steps": entry["ranks"][0]["optimizer_steps"]}
            return
        self._restored = entry["ranks"][self.global_rank]

    def _apply_restored(self) -> None:
        """Hand the loaded parts to their owners, which apply them once they can (declared state)."""
        restored, self._restored = self._restored, None
        if restored is None:
            return
        self.optimizer_steps = int(restored["optimizer_steps"])
        if "comm" in restored:
            self.comm_state.load_state_dict(restored["comm"])
        if "sync" in restored:
            self.sync.load_state_dict(restored["sync"])

    @override
    def teardown(self) -> None:
        self.sync.teardown()
        self.comm_state._pending, self.comm_state._inflight = [], []
        self._cpu_group = None  # destroyed with the default group
        super().teardown()


class ReturnsCompressionState:
    """Body of the spawn launcher: rank 0's compression counters come back with the weights."""

    def get_extra_results(self, trainer: Any) -> dict[str, Any]:
        extra = super().get_extra_results(trainer)  # type: ignore[misc]
        extra[CHECKPOINT_KEY] = trainer.strategy._main_process_state()
        return extra

    def update_main_process_results(self, trainer: Any, extra: dict[str, Any]) -> None:
        super().update_main_process_results(trainer, extra)  # type: ignore[misc]
        if CHECKPOINT_KEY in extra:
            trainer.strategy._load_main_process_state(extra[CHECKPOINT_KEY])


class _SpawnLauncher(ReturnsCompressionState, multiprocessing_launcher("pytorch_lightning")):  # type: ignore[misc]
    pass


class CompressedDDP(CompressedDDPMixin, DDPStrategy):
    __doc__ = CompressedDDPMixin.__doc__
    _spawn_launcher = _SpawnLauncher


def _to_cpu(obj: Any) -> Any:
    return apply_to_collection(obj, Tensor, lambda t: t.detach().cpu())


def register() -> None:
    """Register ``"ddp_compressed"`` (and ``"ddp_compressed_spawn"``) with Lightning's registry."""
    from pytorch_lightning.strategies import StrategyRegistry

    CompressedDDP.register_strategies(StrategyRegistry)


__all__ = ["CHECKPOINT_KEY", "CompressedDDP", "CompressedDDPMixin", "register"]
