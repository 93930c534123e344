"""The package's DDP communication hook on Lightning's stock ``DDPStrategy`` (``strategy="ddp"``).

:class:`~lightning_compress.CommunicationMonitor` uses it when the strategy is not
``CompressedDDP``: it checks that the strategy has no hook of its own, picks the codec (the
user's, the policy's default, or a float32 allreduce the ledger counts exactly), registers the
hook on the wrapped model and keeps its :class:`~lightning_compress.hooks.CompressionState`
across fits.
"""

from __future__ import annotations

import logging
from typing import Any

from lightning_utilities.core.rank_zero import rank_zero_warn
from torch.nn.parallel import DistributedDataParallel

from lightning_compress._compat import ddp_comm_options
from lightning_compress.compressors import Compressor, NoCompression
from lightning_compress.hooks import CompressionState, register_compression_hook
from lightning_compress.policies.base import CompressionPolicy

log = logging.getLogger(__name__)


class StockDDPHook:
    """Install the compressing hook on stock DDP, and keep its state.

    Args:
        compressor: the codec to install (``None``: the policy's default, else
            :class:`~lightning_compress.compressors.NoCompression`).
        state_kwargs: the other :class:`~lightning_compress.hooks.CompressionState` arguments
            (validated here, so that a typo fails at construction).

    """

    def __init__(self, compressor: Compressor | None, state_kwargs: dict[str, Any]) -> None:
        self.compressor = compressor
        self.state_kwargs = dict(state_kwargs)
        CompressionState(NoCompression(), **self.state_kwargs)
        #: the state installed by :meth:`install` (``None`` before the first), carried across fits
        self.state: CompressionState | None = None

    def codec(self, policy: CompressionPolicy | None) -> Compressor:
        """The codec to install: the given one, else the policy's default, else a float32 allreduce."""
        if self.compressor is not None:
            return self.compressor
        return policy.default_compressor() if policy is not None else NoCompression()

    def check(self, strategy: Any) -> None:
        """Refuse a strategy that already configures a DDP communication hook or model averaging.

        Raises:
            ValueError: naming the options that clash.

        """
        clash = [name for name, value in ddp_comm_options(strategy).items() if value is not None]
        if clash:
            raise ValueError(
                f"CommunicationMonitor installs its own DDP communication hook, but the strategy already "
                f"configures {clash}; remove them, or use CompressedDDP(compressor=..., sync=...)"
            )

    def install(self, strategy: Any, policy: CompressionPolicy | None, owner: str) -> CompressionState | None:
        """Register the hook on the strategy's wrapped model; returns its state.

        Returns ``None`` (after a warning) when the model is not wrapped in DDP and there is no
        policy: there is nothing to meter.

        Raises:
            ValueError: the model is not wrapped in DDP and a policy was asked for.

        """
        model = strategy.model
        if not isinstance(model, DistributedDataParallel):
            if policy is not None:
                raise ValueError(
                    f"CommunicationMonitor(policy=...): {type(strategy).__name__} did not wrap the model "
                    "in DistributedDataParallel, so there is no gradient exchange to compress"
                )
            rank_zero_warn("CommunicationMonitor: the model is not wrapped in DDP; nothing to log")
            return None
        if self.state is None:
            compressor = self.codec(policy)
            kwargs = dict(self.state_kwargs)
            if isinstance(compressor, NoCompression):
                # metering only: behave exactly like stock DDP, which sends no non-finite flag
                kwargs["nonfinite"] = "ignore"
            self.state = CompressionState(compressor, **kwargs)
        state = self.state
        state.process_group = None
        # float16 mixed precision: overflow steps go through the scaler, in unscaled units
        state.use_scaler(getattr(strategy.precision_plugin, "scaler", None), owner)
        # a second fit wraps the model in a new DDP: register again; the state carries over
        register_compression_hook(model, state)
        log.debug(f"{owner}: registered the hook ({state.compressor!r}) on stock DDP")
        return state

    # -- what a checkpoint can carry -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any] | None:
        """What is identical on every rank (Lightning saves callback state from rank 0 only).

        CompressedDDP saves every rank's hook state itself; on stock DDP only the counters, the
        norm and the ledger can come back, not the per-rank error-feedback residuals.
        """
        own = self.state
        if own is None:
            return None
        return {
            "step": own.step,
            "last_grad_norm": own.last_grad_norm,
            "ledger": own.ledger.state_dict(),
            "residuals": {},
            "momentum": {},
            "error_feedback": own.error_feedback or own.uses_sketch,
        }

    def load_state_dict(self, comm: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` into the installed state (warns: residuals restart at zero)."""
        assert self.state is not None
        if comm.get("error_feedback"):
            rank_zero_warn(
                "CommunicationMonitor on stock DDP: error-feedback memory is per rank and Lightning "
                "saves callback state from rank 0 only, so it restarts at zero after this resume; use "
                "CompressedDDP for an exact resume"
            )
        self.state.load_state_dict(comm)


__all__ = ["StockDDPHook"]
