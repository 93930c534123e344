"""``CommunicationMonitor``: the bits every step sends, in every logger, and a per-step policy.

With :class:`~lightning_compress.CompressedDDP` it reads the strategy's ledger. With Lightning's
stock ``DDPStrategy`` (``strategy="ddp"``) it installs the package's DDP communication hook on the
wrapped model itself, so the monitor alone turns plain DDP into compressed DDP (with a policy) or
into exactly metered float32 DDP (without one).

The callback only wires four parts: the metrics (:mod:`lightning_compress.metrics`, pure
functions of the ledger), the policy driver (:class:`~lightning_compress.policies.driver.PolicyDriver`),
the stock-DDP hook installer (:class:`~lightning_compress.stock_ddp.StockDDPHook`) and the summary
table (:mod:`lightning_compress.summary`). Its own per-rank state is declared
(:class:`~lightning_compress.state.DeclaredState`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from lightning_utilities.core.rank_zero import rank_zero_warn
from pytorch_lightning.callbacks import Callback

from lightning_compress._compat import should_update_logs
from lightning_compress._lightning import ddp_strategy_types
from lightning_compress.compressors import Compressor, resolve_compressor
from lightning_compress.fingerprint import check_settings_agree, settings_of
from lightning_compress.hooks import CompressionState
from lightning_compress.metrics import (  # noqa: F401 - the metric names, importable from here as before
    BIT_WIDTH,
    BITS_PER_COORD,
    BITS_SENT,
    BITS_SENT_TOTAL,
    COMPRESSION_RATIO,
    GRAD_NORM,
    TOPK_K,
    WIRE_BITS,
    record_between,
    step_metrics,
)
from lightning_compress.policies.base import CompressionPolicy
from lightning_compress.policies.driver import PolicyDriver
from lightning_compress.state import DeclaredState
from lightning_compress.stock_ddp import StockDDPHook
from lightning_compress.strategy import CHECKPOINT_KEY, CompressedDDPMixin
from lightning_compress.summary import summary_table

if TYPE_CHECKING:
    import pytorch_lightning as pl

_INTERVALS = ("step", "epoch")
#: version of :meth:`CommunicationMonitorMixin.state_dict`
STATE_VERSION = 1


class CommunicationMonitorMixin(DeclaredState):
    """Log the gradient bits each rank sends and, with a ``policy``, adapt the codec every step.

    Logged through :meth:`~pytorch_lightning.core.LightningModule.log` (so every Lightning logger
    gets them), once per gradient exchange (``logging_interval="step"``, subject to the Trainer's
    ``log_every_n_steps``) or once per epoch (``"epoch"``):

    - ``comm/bits_sent``: bits this rank handed to collectives in the step (epoch): 8 × the
      payload bytes of the ledger.
    - ``comm/bits_sent_total``: the same, summed since the start of training (resumes included).
    - ``comm/wire_bits``: bits this rank put on the wire for them under ring/pairwise collectives.
    - ``comm/compression_ratio``: wire bytes of a float32 ring allreduce of the same gradient over
      the wire bytes actually sent (1.0 for uncompressed DDP).
    - ``comm/bits_per_coord``: encoded bits per gradient coordinate: codes, scales, indices, and 32
      for the tensors sent dense.
    - ``comm/bit_width`` (QSGD) or ``comm/topk_k`` (Top-K): the codec setting of the step's
      compressed exchange, chosen by the policy or fixed (absent for steps that sent nothing
      compressed: warm-up, local steps).
    - ``comm/grad_norm``: the norm the policy decided from: this step's pre-compression gradient
      norm of the compressed tensors, ``sqrt(mean over ranks of ||g_r||²)`` (same steps as the
      setting).

    The values are this rank's (``sync_dist=False``: no collective is added, so logging can never
    deadlock). Every rank exchanges payloads of the same size, so they agree on every rank; the
    loggers record rank 0's.

    At the end of ``fit`` rank 0 prints a table: steps, bytes, compression ratio, mean bit width
    (or K), bytes per sample, next to what stock float32 DDP would have needed.

    Args:
        policy: a :class:`~lightning_compress.policies.DQPolicy` (bit width of QSGD) or
            :class:`~lightning_compress.policies.AdaptiveTopKPolicy` (Top-K's K), applied before
            each optimizer step's gradient exchange; ``None`` logs only.
        logging_interval: ``"step"`` (default) or ``"epoch"``.
        compressor: stock DDP only: the codec to install (default: the policy's, i.e.
            ``QSGD(bits=round(mean_bits))`` or ``TopK(ratio=mean_ratio)``; without a policy
            :class:`~lightning_compress.compressors.NoCompression`, a float32 allreduce that the
            ledger counts exactly and that, like stock DDP, averages non-finite gradients as they
            come). With ``CompressedDDP`` configure the strategy's instead.
        min_compression_size: stock DDP only: parameters with fewer elements travel dense.
        error_feedback: stock DDP only: see :class:`~lightning_compress.hooks.CompressionState`
            (``None``: on for Top-K, off for QSGD).
        warmup_steps: stock DDP only: steps of plain allreduce before compression starts.
        seed: stock DDP only: seed of QSGD's stochastic rounding.
        summary: print the summary table at the end of ``fit`` (rank 0).

    Attributes:
        samples: samples trained on so far (resumes included), for bytes per sample.
        setting_sum: sum of the codec setting (bit width or ``K``) over the compressed steps.
        setting_count: number of those steps.

    Raises:
        ValueError: at ``setup`` for a strategy whose gradient exchange cannot be monitored, or a
            stock DDP strategy that already has a ``ddp_comm_hook``.
        TypeError: at ``setup`` when the policy does not fit the codec (``DQPolicy`` needs a bit
            width, ``AdaptiveTopKPolicy`` a ``TopK``).

    Example::

        trainer = pl.Trainer(strategy="ddp", callbacks=[CommunicationMonitor(policy=DQPolicy(mean_bits=4.0))])

    With ``import lightning as L``, take it from :mod:`lightning_compress.lightning`; either one
    works with either namespace's ``DDPStrategy`` and ``CompressedDDP``.

    """

    def __init__(
        self,
        policy: CompressionPolicy | None = None,
        logging_interval: str = "step",
        compressor: str | Compressor | None = None,
        min_compression_size: int = 1024,
        error_feedback: bool | None = None,
        warmup_steps: int = 0,
        seed: int = 0,
        summary: bool = True,
    ) -> None:
        self._driver = PolicyDriver(policy)
        if logging_interval not in _INTERVALS:
            raise ValueError(f"logging_interval must be one of {_INTERVALS}, got {logging_interval!r}")
        self.logging_interval = logging_interval
        codec = None if compressor is None else resolve_compressor(compressor)
        if codec is not None:
            self._driver.check(codec)
        # validates the hook's arguments here, so that a typo fails at construction, not at fit
        self._stock = StockDDPHook(
            codec,
            {
                "min_compression_size": min_compression_size,
                "error_feedback": error_feedback,
                "warmup_steps": warmup_steps,
                "seed": seed,
            },
        )
        self.summary = bool(summary)
        # -- declared state (lightning_compress.state) --
        # checkpointed, under these keys: identical on every rank by construction
        self.add_state("samples", 0)  # samples trained on (when every batch's size is known)
        self.add_state("setting_sum", 0.0)  # sum and count of the codec setting over compressed steps
        self.add_state("setting_count", 0)
        # this rank's view of the current fit (not saved; set again at every fit)
        self.add_state("_state", None, persistent=False)  # the state of the hook in use
        self.add_state("_disabled", False, persistent=False)
        self.add_state("_numel", 0, persistent=False)  # gradient coordinates that travel through the codec
        self.add_state("_logged_steps", 0, persistent=False)  # ledger.steps already logged
        self.add_state("_samples_known", True, persistent=False)
        self.add_state("_epoch_start", None, persistent=False)  # (ledger.total, setting_sum, setting_count)
        self.add_state("_world_size", 1, persistent=False)

    # -- properties --------------------------------------------------------------------------
    @property
    def policy(self) -> CompressionPolicy | None:
        return self._driver.policy

    @property
    def comm_state(self) -> CompressionState | None:
        """The hook state being monitored (the strategy's, or the one installed on stock DDP)."""
        return self._state

    @property
    def compressor(self) -> Compressor | None:
        return None if self._state is None else self._state.compressor

    @property
    def _own_state(self) -> CompressionState | None:
        """The state this monitor installed on stock DDP (``None`` with CompressedDDP)."""
        return self._stock.state

    # -- set-up ------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = trainer.strategy
        self._disabled = False
        self._state = None
        if isinstance(strategy, CompressedDDPMixin):
            if self._stock.compressor is not None:
                raise ValueError(
                    "CommunicationMonitor(compressor=...) is for stock DDP; with CompressedDDP set the codec "
                    "on the strategy: CompressedDDP(compressor=...)"
                )
            self._driver.check(strategy.compressor)
        elif isinstance(strategy, ddp_strategy_types()):
            self._stock.check(strategy)
            if self.policy is not None:
                self._driver.check(self._stock.codec(self.policy))
        elif self.policy is not None:
            raise ValueError(
                f"CommunicationMonitor(policy=...) needs DDP gradient communication (strategy='ddp' or "
                f"CompressedDDP), but the strategy is {type(strategy).__name__}"
            )
        else:
            rank_zero_warn(
                f"CommunicationMonitor: {type(strategy).__name__} exchanges no DDP gradients this monitor "
                "can meter; nothing will be logged (use strategy='ddp' or CompressedDDP)"
            )
            self._disabled = True

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs after strategy.setup(): the model is wrapped in DDP (and CompressedDDP's hook is
        # registered), and before the first forward/backward, so a hook registered here sees
        # every gradient of the run.
        if self._disabled:
            return
        strategy = trainer.strategy
        if isinstance(strategy, CompressedDDPMixin):
            state = strategy.comm_state
        else:
            state = self._stock.install(strategy, self.policy, type(self).__name__)
            if state is None:
                self._disabled = True
                return
        self._state = state
        self._world_size = trainer.world_size
        threshold = state.min_compression_size
        sizes = [p.numel() for p in pl_module.parameters() if p.requires_grad]
        self._numel = sum(n for n in sizes if n >= threshold)
        self.apply_restored(state)
        self._driver.setup(self._numel, trainer, threshold)
        # every rank reaches this line: a policy (or the stock-DDP codec) that differs fails here
        check_settings_agree(
            settings_of(state, policy=self.policy), group=state.process_group, what="CommunicationMonitor"
        )
        # the exchange itself decides, on every rank, from this step's reduced gradient norm
        self._driver.attach(state)
        self._logged_steps = state.ledger.steps

    def _setting(self) -> tuple[str, float] | None:
        """``(metric name, value)`` of the codec's current setting (named by the policy's ``metric``)."""
        return self._driver.setting(self.compressor, self._numel)

    # -- logging -----------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._state is not None:
            self._epoch_start = (replace(self._state.ledger.total), self.setting_sum, self.setting_count)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        state = self._state
        if state is None:
            return
        self._count_samples(batch)
        ledger = state.ledger
        if ledger.steps == self._logged_steps:
            return  # no exchange in this batch (gradient accumulation)
        self._logged_steps = ledger.steps
        setting = self._setting() if state.last_compressed else None
        if setting is not None:
            self.setting_sum += setting[1]
            self.setting_count += 1
        if self.logging_interval != "step" or not should_update_logs(trainer):
            return  # building and logging metrics Lightning would drop costs ~2 ms a step
        metrics = step_metrics(ledger.last, ledger.total, setting, state.last_grad_norm)
        # schedules that decide something per step (backup workers: contributions, dropped
        # ranks) declare it (SyncSchedule.logged_metrics) and return it from metrics()
        strategy = trainer.strategy
        if isinstance(strategy, CompressedDDPMixin) and strategy.sync.logged_metrics:
            metrics.update(strategy.sync.metrics())
        _log(pl_module, metrics, on_step=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = self._state
        if state is None or self.logging_interval != "epoch" or self._epoch_start is None:
            return
        start, setting_sum, setting_count = self._epoch_start
        total = state.ledger.total
        setting = self._setting()
        mean = None
        if setting is not None and self.setting_count > setting_count:
            mean = (setting[0], (self.setting_sum - setting_sum) / (self.setting_count - setting_count))
        _log(pl_module, step_metrics(record_between(start, total), total, mean), on_step=False)

    def _count_samples(self, batch: Any) -> None:
        if not self._samples_known:
            return
        from pytorch_lightning.utilities.data import extract_batch_size

        try:
            self.samples += extract_batch_size(batch)
        except Exception:  # custom batch types: the summary then omits bytes per sample
            self._samples_known = False

    # -- summary -----------------------------------------------------------------------------
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._state is None or not self.summary or not trainer.is_global_zero:
            return
        from rich.console import Console

        Console().print(self.summary_table())

    def summary_table(self) -> Any:
        """Build the end-of-fit table (a ``rich.table.Table``): this run next to float32 DDP."""
        assert self._state is not None
        setting = self._setting()
        mean = None
        if setting is not None and self.setting_count:
            mean = (setting[0], self.setting_sum / self.setting_count)
        return summary_table(
            self._state.ledger,
            title=f"Gradient communication of this rank ({self._state.compressor!r})",
            world_size=self._world_size,
            setting=mean,
            numel=self._numel,
            samples=self.samples if self._samples_known else None,
        )

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # Lightning saves callback state from rank 0 only: everything here is identical on every
        # rank by construction (policy state, counters, and the ledger of equal-size payloads).
        state: dict[str, Any] = {"version": STATE_VERSION, "policy": self._driver.state_dict()}
        state.update(super().state_dict())  # samples, setting_sum, setting_count
        comm = self._stock.state_dict()
        if comm is not None:
            state["comm"] = comm
        return state

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if CHECKPOINT_KEY in checkpoint and not isinstance(trainer.strategy, CompressedDDPMixin):
            rank_zero_warn(
                "CommunicationMonitor: the checkpoint holds CompressedDDP's per-rank compression state "
                f"(error-feedback memory, schedule state), which {type(trainer.strategy).__name__} ignores; "
                "resume with CompressedDDP to continue exactly"
            )

    # load_state_dict (DeclaredState's) stashes: Lightning calls it before strategy.setup(), when
    # the hook does not exist yet; on_fit_start applies it through apply_restored -> _load_state.
    def _load_state(self, state: dict[str, Any], comm_state: CompressionState) -> None:
        self._driver.load_state_dict(state.get("policy"))
        self.samples = int(state.get("samples", 0))
        self.setting_sum = float(state.get("setting_sum", 0.0))
        self.setting_count = int(state.get("setting_count", 0))
        comm = state.get("comm")
        if comm is not None and comm_state is self._stock.state:
            self._stock.load_state_dict(comm)


class CommunicationMonitor(CommunicationMonitorMixin, Callback):
    __doc__ = CommunicationMonitorMixin.__doc__


def _log(pl_module: pl.LightningModule, metrics: dict[str, float], on_step: bool) -> None:
    # float64 where the device has it: bit totals pass 2**24 quickly, where float32 rounds
    dtype = torch.float32 if pl_module.device.type == "mps" else torch.float64
    if not metrics:
        return
    # one host-to-device copy per logging step, not one per metric
    values = torch.tensor(list(metrics.values()), dtype=dtype, device=pl_module.device)
    for i, name in enumerate(metrics):
        pl_module.log(
            name,
            values[i],
            on_step=on_step,
            on_epoch=not on_step,
            sync_dist=False,
            batch_size=1,
        )


__all__ = ["CommunicationMonitor", "CommunicationMonitorMixin"]
