"""DDP communication hooks that exchange compressed gradients.

Usable on a plain :class:`torch.nn.parallel.DistributedDataParallel`::

    from lightning_compress.compressors import QSGD
    from lightning_compress.hooks import CompressionState, register_compression_hook

    state = CompressionState(QSGD(bits=4))
    register_compression_hook(ddp_model, state)   # binds parameter names, then register_comm_hook

How it works (and why it is safe on gloo with many buckets):

1. DDP calls the hook once per gradient bucket, in bucket order, from the autograd thread. The
   hook only parks the bucket and returns a pending future.
2. At the last bucket, :meth:`CompressionState.flush` fuses all parked buckets into one flat
   vector, splits off the small tensors (below ``min_compression_size``: biases, norms), and runs
   **one** compressed exchange for the large ones plus one dense allreduce for the small ones,
   all issued from the same thread in the same order on every rank. torch's PowerSGD hook
   instead chains collectives from future callbacks, whose order differs between ranks; on gloo
   that is a collective mismatch.
3. The averages are written back into the bucket buffers and every future is completed.

Error-feedback residuals are kept per parameter name, so DDP's bucket rebuild after the first
iteration, or a resume with another bucket size, keeps them where they belong.
"""

import logging
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from lightning_compress.comm.collectives import allreduce_mean, exchange, write_flat_
from lightning_compress.comm.ledger import BitLedger
from lightning_compress.compressors import Compressor, resolve_compressor
from lightning_compress.feedback import ErrorFeedback

log = logging.getLogger(__name__)

_COMPRESSED = "compressed"


class CompressionState:
    """Settings and mutable state of the compressing DDP hook (picklable, checkpointable).

    Args:
        compressor: the codec, or its alias (``"qsgd"``, ``"topk"``, ``"sketch"``, ``"none"``).
        error_feedback: keep what the codec dropped and add it back next step (Karimireddy et al.,
            arXiv 1901.09847). ``None`` (default) turns it on for biased codecs (Top-K) and off for
            unbiased ones (QSGD, whose stochastic rounding already averages out). Count sketches
            always accumulate their error (Sketched SGD's ``v``), whatever this says.
        min_compression_size: tensors with fewer elements travel uncompressed in one dense
            allreduce. Compressing a bias of 64 floats saves nothing and costs kernel launches;
            typical values 256-4096.
        warmup_steps: optimizer steps of plain float32 allreduce before compression starts
            (PowerSGD's ``start_powerSGD_iter``); helps accuracy early in training. 0 disables.
        sketch_momentum: Sketched SGD's momentum ``ρ`` (``u ← ρu + g``), used only with a
            :class:`~lightning_compress.compressors.CountSketch`. Keep the optimizer's own momentum
            at 0 when using it; the paper uses 0.9.
        seed: seeds the stochastic rounding; rank ``r`` draws from ``seed + r`` so ranks make
            independent rounding choices (their errors average out).
        nonfinite: what to do when any rank's gradient holds NaN or Inf: ``"skip"`` (default) skips
            the step on every rank (zero gradients with the bare hook; no optimizer update under
            :class:`~lightning_compress.CompressedDDP`) and leaves the error-feedback memory
            untouched; ``"raise"`` raises ``FloatingPointError`` on every rank. All ranks learn of
            it through one extra float in the dense allreduce, so they always agree. ``"ignore"``
            sends no flag and averages whatever arrives, exactly like stock DDP (NaN spreads to
            every rank, and into the error-feedback memory).
        process_group: the group to communicate in (``None``: the default group).

    """

    def __init__(
        self,
        compressor: str | Compressor = "qsgd",
        error_feedback: bool | None = None,
        min_compression_size: int = 1024,
        warmup_steps: int = 0,
        sketch_momentum: float = 0.0,
        seed: int = 0,
        nonfinite: str = "skip",
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        self.compressor = resolve_compressor(compressor)
        if error_feedback is not None and not isinstance(error_feedback, bool):
            raise TypeError(f"error_feedback must be True, False or None (automatic), got {error_feedback!r}")
        if not isinstance(min_compression_size, int) or min_compression_size < 0:
            raise ValueError(f"min_compression_size must be an integer >= 0, got {min_compression_size!r}")
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if nonfinite not in ("skip", "raise", "ignore"):
            raise ValueError(f"nonfinite must be 'skip', 'raise' or 'ignore', got {nonfinite!r}")
        if not 0.0 <= float(sketch_momentum) < 1.0:
            raise ValueError(f"sketch_momentum must be in [0, 1), got {sketch_momentum!r}")
        self.error_feedback = (not self.compressor.unbiased) if error_feedback is None else error_feedback
        self.min_compression_size = min_compression_size
        self.warmup_steps = warmup_steps
        self.sketch_momentum = float(sketch_momentum)
        self.seed = int(seed)
        self.nonfinite = nonfinite
        self.process_group = process_group

        self.ledger = BitLedger()
        self.memory = ErrorFeedback()
        self.momentum = ErrorFeedback()  # Sketched SGD's u, same per-parameter bookkeeping
        self.step = 0
        #: the L2 norm of the last averaged (decoded) gradient: identical on every rank, which is
        #: what policies base their per-step decisions on.
        self.last_grad_norm: float | None = None
        #: set by a sync schedule: False skips the exchange (local steps) and leaves gradients local.
        self.communicate = True
        #: whether the last exchange found non-finite gradients on some rank (and was skipped)
        self.last_step_skipped = False
        self.skipped_steps = 0
        self.names: dict[int, tuple[int, str]] = {}
        self._pending: list[tuple[Tensor, list[Tensor], torch.futures.Future]] = []
        self._layout: tuple[tuple[str, int], ...] = ()
        self._stash: dict[str, Any] | None = None
        self._generator: torch.Generator | None = None

    # -- binding -----------------------------------------------------------------------------
    def bind(self, named_parameters: Iterable[tuple[str, Tensor]]) -> None:
        """Learn parameter names and model order (stable across bucket rebuilds and resumes)."""
        self.names = {id(p): (i, name) for i, (name, p) in enumerate(named_parameters)}

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.process_group)

    @property
    def uses_sketch(self) -> bool:
        return self.compressor.exchange == "sketch"

    def _rng(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed + dist.get_rank(self.process_group))
            if self._stash is not None and "generator" in self._stash and device.type == "cpu":
                gen.set_state(self._stash.pop("generator"))
            self._generator = gen
        return self._generator

    # -- the exchange ------------------------------------------------------------------------
    def park(self, bucket: dist.GradBucket) -> torch.futures.Future:
        fut: torch.futures.Future = torch.futures.Future()
        self._pending.append((bucket.buffer(), list(bucket.parameters()), fut))
        if bucket.is_last():
            self.flush()
        return fut

    def flush(self) -> None:
        """Exchange every parked bucket (see the module docstring, step 2) and complete futures."""
        pending, self._pending = self._pending, []
        try:
            if self.communicate:
                self._exchange(pending)
                self.ledger.end_step()
            for buffer, _, fut in pending:
                fut.set_result(buffer)
        except BaseException as err:  # never leave DDP waiting on a future that cannot complete
            for _, _, fut in pending:
                if not fut.done():
                    fut.set_exception(err)
            raise
        finally:
            self.step += 1

    def _exchange(self, pending: list[tuple[Tensor, list[Tensor], torch.futures.Future]]) -> None:
        small: list[tuple[int, Tensor]] = []
        large: list[tuple[int, Tensor, str]] = []
        warm = self.step < self.warmup_steps
        unbound = len(self.names)  # parameters the state was not bound to keep their bucket order
        for buffer, params, _ in pending:
            offset = 0
            for p in params:
                view = buffer[offset : offset + p.numel()]
                offset += p.numel()
                index, name = self.names.get(id(p), (unbound, f"unbound{unbound}"))
                unbound += id(p) not in self.names
                if warm or p.numel() < self.min_compression_size:
                    small.append((index, view))
                else:
                    large.append((index, view, name))
        # Model order, not bucket order: DDP rebuilds its buckets after the first iteration (and
        # a resumed run starts with the initial ones again); the fused vector, and so every
        # quantization bucket and random draw, must not depend on that.
        small.sort(key=lambda t: t[0])
        large.sort(key=lambda t: t[0])
        small_views = [v for _, v in small]
        large_views = [v for _, v, _ in large]

        # 1. The dense allreduce of the small tensors carries one extra element: how many ranks
        #    hold non-finite gradients. Every rank then knows it, so all skip (or raise) together
        #    and no rank is left alone in the compressed exchange below.
        check = self.nonfinite != "ignore"
        small_flat = [t.reshape(-1).to(torch.float32) for t in small_views]
        grad = torch.cat([t.reshape(-1).to(torch.float32) for t in large_views]) if large else None
        if check:
            small_flat.append(_nonfinite_flag(small_flat + ([grad] if grad is not None else [])))
        if small_flat:
            flat = torch.cat(small_flat)
            self.ledger.record_coords(flat.numel() - check, 4 * flat.numel(), self.world_size)
            flat = allreduce_mean(flat, self.process_group, self.ledger)
            if check:
                bad_ranks = round(float(flat[-1]) * self.world_size)
                self.last_step_skipped = bad_ranks > 0
                if self.last_step_skipped:
                    self._on_nonfinite(bad_ranks, small_views + large_views)
                    return
            write_flat_(small_views, flat[: flat.numel() - check])  # less the flag

        # 2. One compressed exchange for all large tensors.
        if grad is not None:
            average = self._compressed_average(grad, tuple((name, v.numel()) for _, v, name in large))
            write_flat_(large_views, average)
            self.last_grad_norm = float(torch.linalg.vector_norm(average))

    def _on_nonfinite(self, bad_ranks: int, views: list[Tensor]) -> None:
        message = (
            f"non-finite gradients (NaN/Inf) on {bad_ranks} of {self.world_size} ranks at step {self.step}"
        )
        if self.nonfinite == "raise":
            raise FloatingPointError(f"{message}; set nonfinite='skip' to skip such steps instead")
        log.warning("%s: step skipped on every rank, error-feedback memory untouched", message)
        self.skipped_steps += 1
        for view in views:  # zero update for users of the bare hook; CompressedDDP skips the step
            view.zero_()

    def _compressed_average(self, grad: Tensor, layout: tuple[tuple[str, int], ...]) -> Tensor:
        if layout != self._layout:
            self._relayout(layout, grad.device)
        generator = self._rng(grad.device)
        if self.uses_sketch:
            # Sketched SGD (arXiv 1903.04488, Alg. 1): u ← ρu + g; v ← v + u; exchange S(v)
            u = (
                self.momentum.compensate(_COMPRESSED, torch.zeros_like(grad))
                .mul_(self.sketch_momentum)
                .add_(grad)
            )
            self.momentum.residuals[_COMPRESSED] = u
            v = self.memory.compensate(_COMPRESSED, u)
            result = exchange(self.compressor, v, self.process_group, self.ledger, generator)
            # zero u and v where the update was applied (Alg. 1, line 11)
            u[result.applied] = 0.0
            v[result.applied] = 0.0
            self.memory.residuals[_COMPRESSED] = v
            return result.average
        if self.error_feedback:
            p = self.memory.compensate(_COMPRESSED, grad)
            result = exchange(self.compressor, p, self.process_group, self.ledger, generator, want_local=True)
            assert result.local is not None
            self.memory.update(_COMPRESSED, p, result.local)
            return result.average
        return exchange(self.compressor, grad, self.process_group, self.ledger, generator).average

    def _relayout(self, layout: tuple[tuple[str, int], ...], device: torch.device) -> None:
        """Re-order flat per-parameter memories for a new bucket layout (or restore a checkpoint)."""
        for name, memory in (("residuals", self.memory), ("momentum", self.momentum)):
            per_param = self._split(memory.residuals.get(_COMPRESSED), self._layout)
            if self._stash is not None and name in self._stash:
                per_param = self._stash.pop(name)
            if not per_param:
                memory.reset()
                continue
            parts = []
            for pname, numel in layout:
                t = per_param.get(pname)
                if t is None or t.numel() != numel:
                    if t is not None:
                        log.warning(
                            "CompressionState: dropping the saved %s of %r: its size changed", name, pname
                        )
                    t = torch.zeros(numel, dtype=torch.float32, device=device)
                parts.append(t.reshape(-1).to(device=device, dtype=torch.float32))
            memory.residuals[_COMPRESSED] = torch.cat(parts)
        self._layout = layout

    @staticmethod
    def _split(flat: Tensor | None, layout: tuple[tuple[str, int], ...]) -> dict[str, Tensor]:
        if flat is None or not layout:
            return {}
        return dict(zip([n for n, _ in layout], flat.split([m for _, m in layout]), strict=True))

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's state: residuals and momentum per parameter name, counters, RNG, ledger."""
        state: dict[str, Any] = {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "last_grad_norm": self.last_grad_norm,
            "ledger": self.ledger.state_dict(),
            "residuals": {
                k: v.clone()
                for k, v in self._split(self.memory.residuals.get(_COMPRESSED), self._layout).items()
            },
            "momentum": {
                k: v.clone()
                for k, v in self._split(self.momentum.residuals.get(_COMPRESSED), self._layout).items()
            },
            "compressor": self.compressor.meta(),
        }
        if self._generator is not None and self._generator.device.type == "cpu":
            state["generator"] = self._generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; per-parameter memories are applied at the next exchange."""
        missing = {"step", "ledger", "residuals"} - set(state)
        if missing:
            raise ValueError(
                f"compression state is missing {sorted(missing)}; was it saved by CompressionState?"
            )
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.last_grad_norm = state.get("last_grad_norm")
        self.ledger.load_state_dict(state["ledger"])
        self._stash = {"residuals": dict(state["residuals"]), "momentum": dict(state.get("momentum", {}))}
        if "generator" in state:
            self._stash["generator"] = state["generator"]
        self._layout = ()
        self._generator = None
        self.memory.reset()
        self.momentum.reset()

    def __getstate__(self) -> dict[str, Any]:
        # spawn pickles the strategy into its children: no process group, futures or generator
        d = self.__dict__.copy()
        d["process_group"] = None
        d["_pending"] = []
        d["_generator"] = None
        return d


def _nonfinite_flag(flats: list[Tensor]) -> Tensor:
    """1.0 if any of ``flats`` holds a NaN or Inf, else 0.0 (a 1-element float32 tensor).

    ``aminmax`` propagates NaN and returns ±Inf when present: one read of the data, about 20x
    cheaper than ``isfinite(x).all()``, which writes a mask as large as the gradient.
    """
    if not flats:
        return torch.zeros(1)
    extremes = torch.stack([torch.stack(torch.aminmax(f)) for f in flats if f.numel()] or [torch.zeros(2)])
    return (~torch.isfinite(extremes).all()).to(torch.float32).reshape(1)


def compressed_hook(state: CompressionState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP comm hook: park the bucket; at the last bucket exchange all of them compressed."""
    return state.park(bucket)


def register_compression_hook(model: DistributedDataParallel, state: CompressionState) -> None:
    """Bind ``state`` to the model's parameter names and register :func:`compressed_hook`."""
    state.bind(model.module.named_parameters())
    model.register_comm_hook(state, compressed_hook)
