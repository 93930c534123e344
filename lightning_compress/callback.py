"""``CommunicationMonitor``: the bits every step sends, in every logger, and a per-step policy.

With :class:`~lightning_compress.CompressedDDP` it reads the strategy's ledger. With Lightning's
stock ``DDPStrategy`` (``strategy="ddp"``) it installs the package's DDP communication hook on the
wrapped model itself, so the monitor alone turns plain DDP into compressed DDP (with a policy) or
into exactly metered float32 DDP (without one).
"""

from __future__ import annotations

import logging
import math
from dataclasses import fields, replace
from typing import TYPE_CHECKING, Any

import torch
from lightning_utilities.core.rank_zero import rank_zero_warn
from pytorch_lightning.callbacks import Callback
from torch.nn.parallel import DistributedDataParallel

from lightning_compress._lightning import ddp_strategy_types
from lightning_compress.comm.ledger import StepRecord
from lightning_compress.compressors import Compressor, NoCompression, TopK, resolve_compressor
from lightning_compress.fingerprint import check_settings_agree, settings_of
from lightning_compress.hooks import CompressionState, register_compression_hook
from lightning_compress.policies.base import CompressionPolicy
from lightning_compress.strategy import CHECKPOINT_KEY, CompressedDDPMixin

if TYPE_CHECKING:
    import pytorch_lightning as pl

log = logging.getLogger(__name__)

_INTERVALS = ("step", "epoch")

#: names of the logged metrics
BITS_SENT = "comm/bits_sent"
BITS_SENT_TOTAL = "comm/bits_sent_total"
COMPRESSION_RATIO = "comm/compression_ratio"
BITS_PER_COORD = "comm/bits_per_coord"
WIRE_BITS = "comm/wire_bits"
BIT_WIDTH = "comm/bit_width"
TOPK_K = "comm/topk_k"
GRAD_NORM = "comm/grad_norm"


class CommunicationMonitorMixin:
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
        if policy is not None and not isinstance(policy, CompressionPolicy):
            raise TypeError(
                "policy must be a lightning_compress.policies policy (DQPolicy, AdaptiveTopKPolicy) or None, "
                f"got {type(policy).__name__}"
            )
        if logging_interval not in _INTERVALS:
            raise ValueError(f"logging_interval must be one of {_INTERVALS}, got {logging_interval!r}")
        self.policy = policy
        self.logging_interval = logging_interval
        self._compressor = None if compressor is None else resolve_compressor(compressor)
        if self._compressor is not None and policy is not None:
            policy.check_compressor(self._compressor)
        # validated here so that a typo fails at construction, not at fit
        self._state_kwargs: dict[str, Any] = {
            "min_compression_size": min_compression_size,
            "error_feedback": error_feedback,
            "warmup_steps": warmup_steps,
            "seed": seed,
        }
        CompressionState(NoCompression(), **self._state_kwargs)
        self.summary = bool(summary)

        self._state: CompressionState | None = None  # the state of the hook in use
        self._own_state: CompressionState | None = None  # the state this monitor installed (stock DDP)
        self._disabled = False
        self._numel = 0  # gradient coordinates that travel through the codec
        self._logged_steps = 0  # ledger.steps already logged
        self._setting_sum = 0.0
        self._setting_count = 0
        self._samples = 0
        self._samples_known = True
        self._epoch_start: tuple[StepRecord, float, int] | None = None
        self._stash: dict[str, Any] | None = None
        self._world_size = 1

    # -- properties --------------------------------------------------------------------------
    @property
    def comm_state(self) -> CompressionState | None:
        """The hook state being monitored (the strategy's, or the one installed on stock DDP)."""
        return self._state

    @property
    def compressor(self) -> Compressor | None:
        return None if self._state is None else self._state.compressor

    # -- set-up ------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = trainer.strategy
        self._disabled = False
        self._state = None
        if isinstance(strategy, CompressedDDPMixin):
            if self._compressor is not None:
                raise ValueError(
                    "CommunicationMonitor(compressor=...) is for stock DDP; with CompressedDDP set the codec "
                    "on the strategy: CompressedDDP(compressor=...)"
                )
            if self.policy is not None:
                self.policy.check_compressor(strategy.compressor)
        elif isinstance(strategy, ddp_strategy_types()):
            clash = [
                name
                for name in ("ddp_comm_hook", "ddp_comm_state", "ddp_comm_wrapper", "model_averaging_period")
                if getattr(strategy, f"_{name}", None) is not None
            ]
            if clash:
                raise ValueError(
                    f"CommunicationMonitor installs its own DDP communication hook, but the strategy already "
                    f"configures {clash}; remove them, or use CompressedDDP(compressor=..., sync=...)"
                )
            if self.policy is not None:
                self.policy.check_compressor(self._stock_compressor())
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

    def _stock_compressor(self) -> Compressor:
        if self._compressor is not None:
            return self._compressor
        return self.policy.default_compressor() if self.policy is not None else NoCompression()

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
            model = strategy.model
            if not isinstance(model, DistributedDataParallel):
                if self.policy is not None:
                    raise ValueError(
                        f"CommunicationMonitor(policy=...): {type(strategy).__name__} did not wrap the model "
                        "in DistributedDataParallel, so there is no gradient exchange to compress"
                    )
                rank_zero_warn("CommunicationMonitor: the model is not wrapped in DDP; nothing to log")
                self._disabled = True
                return
            if self._own_state is None:
                compressor = self._stock_compressor()
                kwargs = dict(self._state_kwargs)
                if isinstance(compressor, NoCompression):
                    # metering only: behave exactly like stock DDP, which sends no non-finite flag
                    kwargs["nonfinite"] = "ignore"
                self._own_state = CompressionState(compressor, **kwargs)
            state = self._own_state
            state.process_group = None
            # float16 mixed precision: overflow steps go through the scaler, in unscaled units
            state.use_scaler(getattr(strategy.precision_plugin, "scaler", None), type(self).__name__)
            # a second fit wraps the model in a new DDP: register again; the state carries over
            register_compression_hook(model, state)
            log.debug(f"{type(self).__name__}: registered the hook ({state.compressor!r}) on stock DDP")
        self._state = state
        self._world_size = trainer.world_size
        threshold = state.min_compression_size
        sizes = [p.numel() for p in pl_module.parameters() if p.requires_grad]
        self._numel = sum(n for n in sizes if n >= threshold)
        self._apply_stash(state)
        if self.policy is not None:
            if self._numel == 0:
                rank_zero_warn(
                    f"CommunicationMonitor: no parameter has >= min_compression_size={threshold} elements; "
                    "everything travels dense and the policy has nothing to control"
                )
            # only when needed: estimating the run length may load the train dataloader early
            self.policy.setup(self._numel, _total_steps(trainer) if self.policy.needs_total_steps else None)
        # every rank reaches this line: a policy (or the stock-DDP codec) that differs fails here
        check_settings_agree(
            settings_of(state, policy=self.policy), group=state.process_group, what="CommunicationMonitor"
        )
        # the exchange itself decides, on every rank, from this step's reduced gradient norm
        state.policy = self.policy
        self._logged_steps = state.ledger.steps

    def _setting(self) -> tuple[str, float] | None:
        compressor = self.compressor
        if compressor is None:
            return None
        if isinstance(compressor, TopK):
            return TOPK_K, float(compressor.k_for(self._numel))
        bits = getattr(compressor, "bits", None)
        return (BIT_WIDTH, float(bits)) if bits is not None else None

    # -- logging -----------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._state is not None:
            self._epoch_start = (replace(self._state.ledger.total), self._setting_sum, self._setting_count)

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
            self._setting_sum += setting[1]
            self._setting_count += 1
        if self.logging_interval != "step" or not _logs_now(trainer):
            return  # building and logging metrics Lightning would drop costs ~2 ms a step
        last = ledger.last
        metrics = {
            BITS_SENT: float(last.bits_sent),
            BITS_SENT_TOTAL: float(ledger.total.bits_sent),
            WIRE_BITS: 8.0 * last.wire_bytes,
            COMPRESSION_RATIO: last.compression_ratio,
            BITS_PER_COORD: last.bits_per_coord,
        }
        if setting is not None:
            metrics[setting[0]] = setting[1]
            if state.last_grad_norm is not None:
                metrics[GRAD_NORM] = state.last_grad_norm
        # schedules that decide something per step (backup workers: contributions, dropped
        # ranks) expose it through metrics(); identical on every rank, so no reduction needed
        schedule_metrics = getattr(getattr(trainer.strategy, "sync", None), "metrics", None)
        if callable(schedule_metrics):
            metrics.update(schedule_metrics())
        _log(pl_module, metrics, on_step=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = self._state
        if state is None or self.logging_interval != "epoch" or self._epoch_start is None:
            return
        start, setting_sum, setting_count = self._epoch_start
        total = state.ledger.total
        epoch = StepRecord(**{f.name: getattr(total, f.name) - getattr(start, f.name) for f in fields(total)})
        metrics = {
            BITS_SENT: float(epoch.bits_sent),
            BITS_SENT_TOTAL: float(total.bits_sent),
            WIRE_BITS: 8.0 * epoch.wire_bytes,
            COMPRESSION_RATIO: epoch.compression_ratio,
            BITS_PER_COORD: epoch.bits_per_coord,
        }
        setting = self._setting()
        if setting is not None and self._setting_count > setting_count:
            metrics[setting[0]] = (self._setting_sum - setting_sum) / (self._setting_count - setting_count)
        _log(pl_module, metrics, on_step=False)

    def _count_samples(self, batch: Any) -> None:
        if not self._samples_known:
            return
        from pytorch_lightning.utilities.data import extract_batch_size

        try:
            self._samples += extract_batch_size(batch)
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
        from rich.table import Table

        assert self._state is not None
        ledger = self._state.ledger
        total = ledger.total
        # what float32 DDP hands to its allreduce in the same optimizer steps, from the ledger's
        # baseline, which counts every step (local steps included): wire = 2(W-1)/W x payload
        world = self._world_size
        dense_payload = total.dense_wire_bytes * world / (2 * (world - 1)) if world > 1 else 0.0
        table = Table(title=f"Gradient communication of this rank ({self._state.compressor!r})")
        table.add_column("")
        table.add_column("this run", justify="right")
        table.add_column("float32 DDP", justify="right")
        table.add_row("optimizer steps", f"{ledger.steps:,}", f"{ledger.steps:,}")
        table.add_row("exchanges (gradients or models)", f"{ledger.exchanges:,}", f"{ledger.steps:,}")
        table.add_row("bytes handed to collectives", _human(total.payload_bytes), _human(dense_payload))
        table.add_row("bytes on the wire (ring)", _human(total.wire_bytes), _human(total.dense_wire_bytes))
        ratio = total.compression_ratio
        table.add_row("compression ratio (wire)", f"{ratio:.2f}x" if ratio else "-", "1.00x")
        table.add_row("bits per coordinate", f"{total.bits_per_coord:.3g}", "32")
        setting = self._setting()
        if setting is not None and self._setting_count:
            mean = self._setting_sum / self._setting_count
            if setting[0] == BIT_WIDTH:
                table.add_row("mean bit width", f"{mean:.3g}", "32")
            else:
                d = f"{self._numel:,}"
                table.add_row(f"mean K (of {d} coordinates)", f"{mean:,.1f}", d)
        if self._samples_known and self._samples:
            table.add_row(
                "bytes per sample",
                _human(total.payload_bytes / self._samples),
                _human(dense_payload / self._samples),
            )
        return table

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # Lightning saves callback state from rank 0 only: everything here is identical on every
        # rank by construction (policy state, counters, and the ledger of equal-size payloads).
        state: dict[str, Any] = {
            "version": 1,
            "policy": None if self.policy is None else self.policy.state_dict(),
            "samples": self._samples,
            "setting_sum": self._setting_sum,
            "setting_count": self._setting_count,
        }
        own = self._own_state
        if own is not None:
            # CompressedDDP saves every rank's hook state itself; on stock DDP only what is
            # identical on every rank can come back (not the per-rank error-feedback residuals)
            state["comm"] = {
                "step": own.step,
                "last_grad_norm": own.last_grad_norm,
                "ledger": own.ledger.state_dict(),
                "residuals": {},
                "momentum": {},
                "error_feedback": own.error_feedback or own.uses_sketch,
            }
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

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning calls this before strategy.setup(): the hook does not exist yet, so stash the
        # state and apply it in on_fit_start.
        self._stash = dict(state_dict)

    def _apply_stash(self, state: CompressionState) -> None:
        stash, self._stash = self._stash, None
        if stash is None:
            return
        if self.policy is not None and stash.get("policy") is not None:
            self.policy.load_state_dict(stash["policy"])
        self._samples = int(stash.get("samples", 0))
        self._setting_sum = float(stash.get("setting_sum", 0.0))
        self._setting_count = int(stash.get("setting_count", 0))
        comm = stash.get("comm")
        if comm is not None and state is self._own_state:
            if comm.get("error_feedback"):
                rank_zero_warn(
                    "CommunicationMonitor on stock DDP: error-feedback memory is per rank and Lightning "
                    "saves callback state from rank 0 only, so it restarts at zero after this resume; use "
                    "CompressedDDP for an exact resume"
                )
            state.load_state_dict(comm)


class CommunicationMonitor(CommunicationMonitorMixin, Callback):
    __doc__ = CommunicationMonitorMixin.__doc__


def _total_steps(trainer: pl.Trainer) -> float:
    try:
        return float(trainer.estimated_stepping_batches)
    except Exception:  # e.g. an iterable dataset without max_steps
        return math.inf


def _logs_now(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes this step's values (every ``log_every_n_steps``, and the last step).

    Read from Lightning's logger connector; if a Lightning version lacks it, every step logs.
    """
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))


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


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:,.0f} {unit}" if unit == "B" else f"{nbytes:,.2f} {unit}"
        nbytes /= 1024
    return f"{nbytes} B"  # unreachable


__all__ = ["CommunicationMonitor", "CommunicationMonitorMixin"]
