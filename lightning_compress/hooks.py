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

A quantizer without a policy (:class:`~lightning_compress.compressors.QSGD`, whose payload size
depends only on the element count) does not wait for the last bucket: from its second exchange
on, the hook streams each bucket into the fused vector as it arrives and puts every chunk whose
values are final on the wire at once, while backward goes on, in a fixed order that is the same
on every rank (:mod:`lightning_compress.comm.stream`). The result is bit-identical to the fused
exchange's; :attr:`CompressionState.overlap_backward` turns it off.

A plain float exchange (:class:`~lightning_compress.compressors.NoCompression`, no exchange
momentum, no policy) has nothing to fuse: each bucket's allreduce starts as soon as DDP hands it
over, as DDP's default hook does (:meth:`CompressionState.plain_allreduce`), so metering stock DDP
costs what DDP costs.

Error-feedback residuals are kept per parameter name, so DDP's bucket rebuild after the first
iteration, or a resume with another bucket size, keeps them where they belong.

With ``momentum > 0`` (Top-K or a count sketch) the momentum lives in the exchange, per
coordinate: ``u ← m·u + g`` on every coordinate (the dense ones send ``u``), and the compressed
part sends the top ``k`` of ``v ← v + u`` (momentum correction and factor masking of Deep Gradient
Compression, arXiv 1712.01887; Sketched SGD, arXiv 1903.04488). The optimizer then runs without
momentum. ``u`` and ``v`` use the same per-parameter bookkeeping as the residuals.
"""

import logging
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from lightning_compress._compat import grad_scaler_scale
from lightning_compress.comm.collectives import (
    allreduce_mean,
    nonfinite_flag,
    start_allreduce_mean,
    write_flat_,
)
from lightning_compress.comm.engine import PipelinedExchange
from lightning_compress.comm.ledger import BitLedger, allreduce_wire_bytes
from lightning_compress.comm.stream import GradientStream, StreamPlan
from lightning_compress.compressors import Compressor, NoCompression, resolve_compressor
from lightning_compress.exchange import (
    COMPRESSED,
    ExchangeConfig,
    ExchangeMemory,
    Layout,
    RankGenerator,
    compressed_average,
    on_nonfinite,
)
from lightning_compress.feedback import ErrorFeedback
from lightning_compress.state import DeclaredState, detached_copy

log = logging.getLogger(__name__)


class CompressionState(DeclaredState):
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
        momentum: momentum ``m`` applied inside the exchange, before compression, for
            :class:`~lightning_compress.compressors.TopK` and
            :class:`~lightning_compress.compressors.CountSketch` (other codecs raise ``ValueError``:
            keep the optimizer's momentum with them). Every rank keeps, per coordinate,
            ``u ← m·u + g`` and ``v ← v + u``, sends the top ``k`` of ``v`` (Top-K: momentum
            correction of Deep Gradient Compression, Lin et al., arXiv 1712.01887, Sec. 3.2;
            sketch: Sketched SGD, Ivkin et al., arXiv 1903.04488, Alg. 1) and zeroes ``v`` where
            it was sent. Sparsifying the momentum-corrected ``v`` rather than ``g`` is what keeps
            Top-K at 1% close to dense momentum SGD; error feedback on ``g`` with the optimizer's
            momentum applied after sparsification loses accuracy (measured: 8 points on the
            benchmark MLP, docs/compression.md). Tensors below ``min_compression_size`` and
            warm-up steps send ``u`` itself (plain momentum SGD), so biases and norms get the
            momentum too. **Set the optimizer's momentum to 0** (``torch.optim.SGD(momentum=0)``):
            :class:`~lightning_compress.CompressedDDP` warns at setup when it is not. 0 (default)
            turns it off (a count sketch then still accumulates ``v``); 0.9 is what both papers use.
        momentum_masking: factor masking (arXiv 1712.01887, Sec. 3.2; Alg. 1 line 11 of
            arXiv 1903.04488): also zero ``u`` at the coordinates just sent, so that momentum
            built up while a coordinate waited is not applied a second time after it was sent
            (stale momentum). On by default, as in both papers; only meaningful with
            ``momentum > 0``. Off, a coordinate keeps its momentum, and with ``k = d`` the
            exchange equals dense momentum SGD exactly.
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
        sketch_momentum: deprecated alias of ``momentum`` for a count sketch (warns); raises for
            other codecs, where it used to be ignored.

    """

    def __init__(
        self,
        compressor: str | Compressor = "qsgd",
        error_feedback: bool | None = None,
        min_compression_size: int = 1024,
        warmup_steps: int = 0,
        momentum: float = 0.0,
        seed: int = 0,
        nonfinite: str = "skip",
        process_group: dist.ProcessGroup | None = None,
        *,
        momentum_masking: bool = True,
        sketch_momentum: float | None = None,
    ) -> None:
        self.compressor = resolve_compressor(compressor)
        #: the frozen settings (validated here, at construction)
        self.config = ExchangeConfig.resolve(
            self.compressor,
            error_feedback=error_feedback,
            min_compression_size=min_compression_size,
            warmup_steps=warmup_steps,
            momentum=momentum,
            momentum_masking=momentum_masking,
            seed=seed,
            nonfinite=nonfinite,
            sketch_momentum=sketch_momentum,
        )
        self.ledger = BitLedger()
        #: ``v`` (error-feedback residual / accumulated ``v``) and the momentum ``u``, per parameter
        self.exchange_memory = ExchangeMemory()
        self.rng = RankGenerator()
        # -- declared per-rank state (checkpointed; see lightning_compress.state) --
        #: exchanges run (one per backward that reached the last bucket), identical on every rank
        self.add_state("step", 0)
        self.add_state("skipped_steps", 0)
        #: the pre-compression L2 norm of the last exchanged gradient (its compressed part), reduced
        #: across ranks: ``sqrt(mean over ranks of ||g_r||²)``. Identical on every rank; what a
        #: policy decides from (not the decoded average, whose norm quantization noise inflates).
        self.add_state("last_grad_norm", None)
        # -- bound to this process (not saved; back at the default when pickled for spawn) --
        self.add_transient("process_group")
        self.process_group = process_group
        #: the ``torch.amp.GradScaler`` whose loss scale the gradients carry (float16 mixed
        #: precision; set by :class:`~lightning_compress.CompressedDDP`, or by a user of the bare
        #: hook). The exchange then runs in unscaled units, and a skipped step hands the scaler
        #: Inf gradients, so that it skips the optimizer step and backs off its scale.
        self.add_transient("scaler")
        self.add_transient("names", factory=dict)
        self.add_transient("_pending", factory=list)  # parked buckets: (buffer, params, future)
        self.add_transient("_inflight", factory=list)  # plain allreduce: the works of this step's buckets
        #: where each compressed parameter lies in the fused vector, learnt from a fused step
        #: (:class:`~lightning_compress.comm.stream.StreamPlan`); ``None`` until then
        self.add_transient("_plan")
        self.add_transient("_stream")  # this step's GradientStream, from the first bucket to the last
        #: chunks of the last exchange put on the wire before its last bucket arrived, while
        #: backward ran (0: the fused exchange, or a single DDP bucket)
        self.early_chunks = 0
        #: stream a quantizer's chunks onto the wire as DDP's buckets arrive, while backward runs
        #: (:mod:`lightning_compress.comm.stream`); False exchanges the fused gradient at the last
        #: bucket. Both give bit-identical results; streaming needs several DDP buckets to gain.
        self.overlap_backward = True
        #: a per-step policy (:mod:`lightning_compress.policies`), set by the
        #: :class:`~lightning_compress.CommunicationMonitor`: decided on every rank at every
        #: compressed exchange, from this step's reduced norm, before the codec runs.
        self.policy: Any = None
        #: set by a sync schedule: False skips the exchange (local steps) and leaves gradients local.
        self.communicate = True
        #: whether the last step's exchange sent gradients through the codec (not warm-up or local)
        self.last_compressed = False
        #: whether the last exchange found non-finite gradients on some rank (and was skipped)
        self.last_step_skipped = False
        #: whether the hook closes the ledger's step after each exchange (the bare hook, the
        #: monitor on stock DDP); :class:`~lightning_compress.CompressedDDP` sets it to False and
        #: closes the step itself once per optimizer step, whatever the schedule did in it
        self.closes_steps = True

    # -- settings (read-only views of the frozen configuration) -------------------------------
    @property
    def error_feedback(self) -> bool:
        return self.config.error_feedback

    @property
    def min_compression_size(self) -> int:
        return self.config.min_compression_size

    @property
    def warmup_steps(self) -> int:
        return self.config.warmup_steps

    @property
    def momentum(self) -> float:
        """Momentum ``m`` applied in the exchange (0: off); see the class docstring."""
        return self.config.momentum

    @property
    def momentum_masking(self) -> bool:
        return self.config.momentum_masking

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def nonfinite(self) -> str:
        return self.config.nonfinite

    @property
    def memory(self) -> ErrorFeedback:
        """``v``: the error-feedback residual of the compressed part (key ``"compressed"``)."""
        return self.exchange_memory.v

    @property
    def velocity(self) -> ErrorFeedback:
        """``u``: the momentum, key ``"compressed"`` for the large tensors, ``"dense"`` for the rest."""
        return self.exchange_memory.u

    # -- binding -----------------------------------------------------------------------------
    def bind(self, named_parameters: Iterable[tuple[str, Tensor]]) -> None:
        """Learn parameter names and model order (stable across bucket rebuilds and resumes)."""
        self.names = {id(p): (i, name) for i, (name, p) in enumerate(named_parameters)}
        self._plan = None

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.process_group)

    @property
    def uses_sketch(self) -> bool:
        return self.compressor.exchange == "sketch"

    @property
    def sketch_momentum(self) -> float:
        """Deprecated alias of :attr:`momentum` (read-only)."""
        return self.momentum

    def generator(self, device: torch.device) -> torch.Generator:
        """This rank's rounding generator on ``device`` (``seed + rank``; restored on resume)."""
        return self.rng.get(device, self.seed, self.process_group)

    # -- the exchange ------------------------------------------------------------------------
    def park(self, bucket: dist.GradBucket) -> torch.futures.Future:
        buffer = bucket.buffer()
        # a future that will hold a CUDA tensor names its device: it then records the current
        # stream when completed, and DDP's wait orders its stream after that (not a host sync)
        fut: torch.futures.Future = torch.futures.Future(devices=[buffer.device] if buffer.is_cuda else None)
        if self.plain_allreduce and self.communicate:
            return self._allreduce_now(bucket, fut)
        params = list(bucket.parameters())
        if not self._pending:  # the step's first bucket
            self._stream = self._open_stream(buffer.device)
        self._pending.append((buffer, params, fut))
        if self._stream is not None:
            if bucket.is_last():
                self.early_chunks = self._stream.engine.issued
            try:
                self._stream.add(params, buffer)
            except BaseException as err:  # the futures handed out so far must not wait forever
                self._fail_pending(err)
                raise
        if bucket.is_last():
            self.flush()
        return fut

    def _fail_pending(self, err: BaseException) -> None:
        pending, self._pending, self._stream = self._pending, [], None
        for _, _, fut in pending:
            if not fut.done():
                fut.set_exception(err)

    @property
    def plain_allreduce(self) -> bool:
        """Whether the exchange is DDP's own: a float allreduce per bucket, nothing to decide.

        True for :class:`~lightning_compress.compressors.NoCompression` without exchange momentum
        or a policy (the monitor metering stock DDP, ``CompressedDDP(compressor="none")``). Then
        each bucket's allreduce starts as soon as DDP hands the bucket over, while backward goes
        on, as with DDP's default hook; one allreduce per bucket, issued from the autograd thread
        in bucket order, is the same order on every rank.
        """
        return isinstance(self.compressor, NoCompression) and self.momentum == 0.0 and self.policy is None

    def _allreduce_now(self, bucket: dist.GradBucket, fut: torch.futures.Future) -> torch.futures.Future:
        """Start this bucket's averaging allreduce now; at the last bucket, wait and complete all.

        The futures complete at the last bucket, once the step's non-finite check is done, so a
        skipped step zeroes every bucket (fills it with Inf for a GradScaler) before DDP reads any
        of them. Waiting there costs
        nothing: backward is over when the last bucket is ready, and DDP would wait for the same
        allreduces. The check reads the *averages*: a NaN or Inf on any rank makes them non-finite
        on every rank (finite values cannot overflow, being divided before the sum), so every rank
        decides the same without a flag in the collective; the bytes are exactly DDP's.
        """
        buffer, world = bucket.buffer(), self.world_size
        buffer.div_(world)  # divided before the sum, as DDP's default hook does
        nbytes = buffer.numel() * buffer.element_size()
        self.ledger.record_coords(buffer.numel(), nbytes, world)
        self.ledger.record(nbytes, allreduce_wire_bytes(nbytes, world))
        self._inflight.append(dist.all_reduce(buffer, group=self.process_group, async_op=True))
        self._pending.append((buffer, list(bucket.parameters()), fut))
        if not bucket.is_last():
            return fut
        pending, self._pending = self._pending, []
        inflight, self._inflight = self._inflight, []
        self.last_compressed = False

        def finish() -> None:
            for work in inflight:
                work.wait()
            buffers = [b for b, _, _ in pending]
            self.last_step_skipped = self.nonfinite != "ignore" and bool(nonfinite_flag(buffers))
            if self.last_step_skipped:  # the step's one host sync is the read above
                self._on_nonfinite(None, buffers)
            self.close_step()

        self._settle(pending, finish)
        return fut

    def flush(self) -> None:
        """Exchange every parked bucket (see the module docstring, step 2) and complete futures."""
        pending, self._pending = self._pending, []
        stream, self._stream = self._stream, None
        self.last_compressed = False
        if stream is None:
            self.early_chunks = 0

        def exchange_parked() -> None:  # not `exchange`: that name is the collective's
            if self.communicate:
                if stream is not None:
                    self._finish_stream(pending, stream)
                else:
                    self._exchange(pending)
                self.close_step()

        self._settle(pending, exchange_parked)

    def _settle(self, pending: list[tuple[Tensor, list[Tensor], torch.futures.Future]], run: Any) -> None:
        """Run the step's exchange, then complete every bucket's future, and count the step."""
        try:
            run()
            for buffer, _, fut in pending:
                fut.set_result(buffer)
        except BaseException as err:  # never leave DDP waiting on a future that cannot complete
            for _, _, fut in pending:
                if not fut.done():
                    fut.set_exception(err)
            raise
        finally:
            self.step += 1

    def _split(self, pending: list[tuple[Tensor, list[Tensor], torch.futures.Future]], warm: bool) -> tuple[
        list[tuple[int, Tensor, str, int]], list[tuple[int, Tensor, str, int]]
    ]:
        """The parked buckets' views ``(index, view, name, id)``: sent dense, and compressed.

        Model order, not bucket order: DDP rebuilds its buckets after the first iteration (and a
        resumed run starts with the initial ones again); the fused vector, and so every
        quantization bucket and random draw, must not depend on that.
        """
        small: list[tuple[int, Tensor, str, int]] = []
        large: list[tuple[int, Tensor, str, int]] = []
        unbound = len(self.names)  # parameters the state was not bound to keep their bucket order
        for buffer, params, _ in pending:
            offset = 0
            for p in params:
                view = buffer[offset : offset + p.numel()]
                offset += p.numel()
                index, name = self.names.get(id(p), (unbound, f"unbound{unbound}"))
                unbound += id(p) not in self.names
                part = small if warm or p.numel() < self.min_compression_size else large
                part.append((index, view, name, id(p)))
        small.sort(key=lambda t: t[0])
        large.sort(key=lambda t: t[0])
        return small, large

    # -- streaming: the compressed chunks on the wire while backward runs --------------------
    def _streamable(self) -> bool:
        """Whether this exchange can stream (a fixed-size codec, nothing decided from the step).

        A policy decides this step's setting from this step's reduced norm, known only once the
        whole gradient is: it keeps the fused exchange. So do sparsifiers and sketches, which
        select over the whole vector, and exchange momentum (Top-K and sketches only).
        """
        return (
            self.overlap_backward
            and self.compressor.exchange == "two_phase"
            and self.policy is None
            and not self.config.accumulates
            and self.momentum == 0.0
        )

    def _open_stream(self, device: torch.device) -> GradientStream | None:
        """This step's stream, at its first bucket (``None``: the fused exchange at the last)."""
        plan = self._plan
        if plan is None or not self.communicate or self.step < self.warmup_steps or not self._streamable():
            return None
        self._lay_out(plan.layout, plan.dense_layout, device)
        scale = self.loss_scale(device)
        error_feedback = self.config.error_feedback
        residual = self.exchange_memory.v.residuals.get(COMPRESSED) if error_feedback else None

        def prepare(start: int, values: Tensor) -> None:
            # the fused exchange's p = g / S + e, element by element (bit-identical)
            if scale is not None:
                values.div_(scale)
            if residual is not None:
                values.add_(residual[start : start + values.numel()])

        engine = PipelinedExchange(self.compressor, self.process_group, self.ledger, self.generator(device))
        return GradientStream(plan, engine, device, prepare, want_local=error_feedback)

    def _finish_stream(
        self, pending: list[tuple[Tensor, list[Tensor], torch.futures.Future]], stream: GradientStream
    ) -> None:
        """The last bucket arrived: the dense part and the flag ride the last collective.

        The compressed chunks are all on the wire by now. The dense allreduce (small tensors and
        the non-finite flag) is issued after them and awaited after they are decoded, so decoding
        overlaps it. The outcome is committed only then: a non-finite step discards the decoded
        average and leaves the error-feedback memory untouched, as the fused exchange does.
        """
        small, large = self._split(pending, warm=False)
        small_views = [v for _, v, _, _ in small]
        large_views = [v for _, v, _, _ in large]
        device = stream.flat.device
        check = self.nonfinite != "ignore"
        scale = self.loss_scale(device)
        self.last_grad_norm = None
        self.last_compressed = True
        parts: list[Tensor] = []
        if small:
            dense = torch.cat([t.reshape(-1).to(torch.float32) for t in small_views])
            if scale is not None:
                dense.div_(scale)
            parts.append(dense)
        if check:
            parts.append(nonfinite_flag([*parts, stream.flat], device))
        flat, work = None, None
        if parts:
            flat = torch.cat(parts)
            self.ledger.record_coords(flat.numel() - int(check), 4 * flat.numel(), self.world_size)
            work = start_allreduce_mean(flat, self.process_group, self.ledger)
        average, local = stream.finish()
        if work is not None:
            work.wait()
        if check:
            assert flat is not None
            bad_ranks = round(flat[-1].item() * self.world_size)  # the step's one device sync
            self.last_step_skipped = bad_ranks > 0
            if self.last_step_skipped:
                self._on_nonfinite(bad_ranks, small_views + large_views)
                return
        if self.config.error_feedback:
            assert local is not None
            self.exchange_memory.v.update(COMPRESSED, stream.flat, local)
        if small:
            assert flat is not None
            averages = flat[: flat.numel() - int(check)]
            if scale is not None:
                averages.mul_(scale)
            write_flat_(small_views, averages, saturate=check)
        if scale is not None:
            average = average * scale
        write_flat_(large_views, average, saturate=check)  # finite by construction: see _exchange

    def _exchange(self, pending: list[tuple[Tensor, list[Tensor], torch.futures.Future]]) -> None:
        warm = self.step < self.warmup_steps
        small, large = self._split(pending, warm)
        small_views = [v for _, v, _, _ in small]
        large_views = [v for _, v, _, _ in large]
        large_layout = tuple((name, v.numel()) for _, v, name, _ in large)
        momentum = self.momentum > 0.0
        dense_layout = tuple((name, v.numel()) for _, v, name, _ in small) if momentum else ()
        if not warm and large and self._streamable():
            # what the next steps need to stream their buckets in (the layout does not change)
            self._plan = StreamPlan.from_parameters(
                [(pid, name, v.numel()) for _, v, name, pid in large], dense_layout
            )
        device = (small_views + large_views)[0].device if small or large else None
        if device is not None:
            self._lay_out(large_layout, dense_layout, device)

        # 1. The dense allreduce of the small tensors carries up to two extra elements: how many
        #    ranks hold non-finite gradients (every rank then knows it, so all skip or raise
        #    together and no rank is left alone in the compressed exchange below), and this
        #    rank's squared pre-compression norm of the large part, with a policy only (its mean
        #    over ranks is what the policy decides this step's setting from, on every rank alike).
        check = self.nonfinite != "ignore"
        dense = torch.cat([t.reshape(-1).to(torch.float32) for t in small_views]) if small else None
        grad = torch.cat([t.reshape(-1).to(torch.float32) for t in large_views]) if large else None
        # 1.0 Under a GradScaler (float16 mixed precision) the gradients carry the loss scale S:
        #     the exchange divides it out and multiplies the averages by it again (exact for
        #     GradScaler's default power-of-2 scales), so memories, the policy's norm and float16
        #     payloads are in true units whatever S does.
        scale = self.loss_scale(device)
        for part in (dense, grad):
            if scale is not None and part is not None:
                part.div_(scale)
        # the norm is sent only for a policy; with nonfinite="ignore" and no policy nothing extra
        # is sent (the monitor's metering of stock DDP stays exact)
        track = grad is not None and self.policy is not None
        if not track:
            self.last_grad_norm = None  # never a stale (or restored) norm next to this step's setting
        extra = int(check) + int(track)
        parts: list[Tensor] = []
        dense_u = None
        if dense is not None:
            if momentum:
                # 1.1 Momentum on every coordinate: what travels dense (small tensors, warm-up
                #     steps) is u ← m·u + g itself, plain momentum SGD (no sparsification, so no
                #     masking); stored only once the step is known to be finite.
                dense = dense_u = self.exchange_memory.dense_momentum(dense, self.momentum)
            parts.append(dense)
        if check:
            parts.append(nonfinite_flag([t for t in (dense, grad) if t is not None], device))
        if track:
            assert grad is not None
            parts.append(torch.linalg.vector_norm(grad).square().reshape(1))
        if parts:
            flat = torch.cat(parts)
            self.ledger.record_coords(flat.numel() - extra, 4 * flat.numel(), self.world_size)
            flat = allreduce_mean(flat, self.process_group, self.ledger)
            # the flag and the norm are read to the host together: the step's one device sync
            tail = flat[flat.numel() - extra :].tolist() if extra else []
            if check:
                bad_ranks = round(tail[0] * self.world_size)
                self.last_step_skipped = bad_ranks > 0
                if self.last_step_skipped:
                    self._on_nonfinite(bad_ranks, small_views + large_views)
                    return
            if track:
                self.last_grad_norm = math.sqrt(tail[-1])
            if dense_u is not None:
                self.exchange_memory.keep_dense_momentum(dense_u)
            averages = flat[: flat.numel() - extra]
            if scale is not None:
                averages.mul_(scale)
            # less the flag and the norm; saturate: every input is finite (just checked), so a
            # value past the dtype's range is rounding (or a float16 bucket), never a real Inf
            write_flat_(small_views, averages, saturate=check)

        # 2. One compressed exchange for all large tensors, with the setting the policy picks
        #    for this step (on every rank, from the same reduced norm).
        if grad is not None:
            if not warm:
                self.decide(self.last_grad_norm if track else None)
                self.last_compressed = True
            if getattr(self.compressor, "per_layer", False):
                # per-layer selection needs the parameters' sizes in the fused vector (same on every rank)
                self.compressor.segments = tuple(numel for _, numel in large_layout)  # type: ignore[attr-defined]
            average = compressed_average(
                grad,
                self.compressor,
                self.config,
                self.exchange_memory,
                self.process_group,
                self.ledger,
                self.generator(grad.device),
            )
            if scale is not None:
                average = average * scale
            # 2.1 Finite inputs give a finite average by construction: every collective divides
            #     by W before summing, and the saturated write clamps what the codec's estimate
            #     or rounding put past the range of the bucket's dtype (an L2-scaled QSGD level
            #     above float16's 65504). So no second check, and no second device sync, is
            #     needed; with nonfinite="ignore" values are written as they come, like DDP.
            write_flat_(large_views, average, saturate=check)

    # -- what the exchange's owners report (the only writers of the per-step outcome) ----------
    def begin_step(self, communicate: bool) -> None:
        """Before a step's backward: whether the hook exchanges in it, and no skip decided yet."""
        self.communicate = communicate
        self.last_step_skipped = False

    def skip_step(self, counted: bool = True) -> None:
        """Drop this step's optimizer update on this rank (a schedule found NaN/Inf); count it."""
        self.last_step_skipped = True
        if counted:
            self.skipped_steps += 1

    def count_discarded(self) -> None:
        """Count steps discarded after the fact (this rank was left out of a model average)."""
        self.skipped_steps += 1

    def exchanged_elsewhere(self, step: int, compressed: bool, grad_norm: float | None = None) -> None:
        """An exchange done outside the hook (backup workers' store) ran for optimizer step ``step``.

        Keeps the hook's counters as if it had run: the exchange count, whether the codec was
        used, and the reduced pre-compression norm a policy decides from (``None``: unchanged).
        """
        self.step = step + 1
        self.last_compressed = compressed
        if grad_norm is not None:
            self.last_grad_norm = grad_norm

    def close_step(self, owner: bool = False) -> None:
        """Close the ledger's step: the only place it is closed (one step per optimizer step).

        The hook calls it after each exchange; it closes then only when no strategy owns the
        step boundary (:attr:`closes_steps`). The owner (``CompressedDDP.optimizer_step``) calls
        it with ``owner=True`` after the schedule ran, so local steps, sync points and backup
        workers' steps are closed by the same line.
        """
        if owner or self.closes_steps:
            self.ledger.end_step()

    def decide(self, grad_norm: float | None, step: int | None = None) -> None:
        """Let the policy (if any) set the codec for the compressed exchange of ``step``.

        Every caller runs it on every rank, once per compressed exchange, with a norm and a step
        (default: this hook's exchange counter) that are identical on every rank: the policy's
        state then advances identically everywhere.
        """
        if self.policy is not None:
            value = self.policy.decide(grad_norm, self.step if step is None else step)
            self.policy.apply(self.compressor, value)

    def _on_nonfinite(self, bad_ranks: int | None, views: list[Tensor]) -> None:
        where = "at least one" if bad_ranks is None else str(bad_ranks)  # None: seen in the averages
        message = f"non-finite gradients (NaN/Inf) on {where} of {self.world_size} ranks at step {self.step}"
        on_nonfinite(self.nonfinite, message, "error-feedback memory untouched")
        self.skipped_steps += 1
        # a GradScaler must see the overflow: it then skips the step and backs off its scale;
        # without one, the bare hook's users get a zero update (CompressedDDP skips the step)
        fill = math.inf if self.loss_scaled else 0.0
        for view in views:
            view.fill_(fill)

    def use_scaler(self, scaler: Any, owner: str) -> None:
        """Take the precision plugin's GradScaler (``None`` without one); see :attr:`scaler`.

        Raises:
            ValueError: with ``nonfinite="ignore"`` and memory (error feedback, exchange momentum,
                a count sketch): the scaler's routine overflow steps would put Inf into it.

        """
        self.scaler = scaler
        if not self.loss_scaled:
            return
        if self.nonfinite == "ignore" and self.config.keeps_memory:
            raise ValueError(
                f"{owner}(nonfinite='ignore') with a GradScaler (precision='16-mixed'): the scaler's routine "
                "overflow steps would put Inf into the error-feedback memory, which never recovers; use "
                "nonfinite='skip' (the default), which lets the scaler skip those steps and back off"
            )
        if self.nonfinite == "raise":
            log.warning(
                "%s(nonfinite='raise') with a GradScaler (precision='16-mixed'): the scaler's routine "
                "overflow steps, frequent early in training, will raise FloatingPointError; nonfinite='skip' "
                "lets the scaler skip them and back off",
                owner,
            )

    @property
    def loss_scaled(self) -> bool:
        """Whether the gradients carry an enabled GradScaler's loss scale (see :attr:`scaler`)."""
        return self.scaler is not None and bool(self.scaler.is_enabled())

    def loss_scale(self, device: torch.device | None) -> Tensor | None:
        """The scaler's current loss scale as a device tensor (no host sync), or ``None``.

        Read from ``GradScaler._scale`` (:func:`~lightning_compress._compat.grad_scaler_scale`):
        the public ``get_scale()`` returns a Python float, a device sync per step. The scale
        exists once ``scaler.scale(loss)`` ran, before backward.
        """
        if not self.loss_scaled:
            return None
        scale = grad_scaler_scale(self.scaler)
        if scale is None:
            return None  # nothing scaled yet
        return scale.to(device=device, dtype=torch.float32) if device is not None else scale

    # -- per-parameter memories and state ----------------------------------------------------
    def _lay_out(self, compressed: Layout, dense: Layout, device: torch.device) -> None:
        """Lay the memories out for this step's layouts (bucket rebuild, end of warm-up, resume)."""
        if not self.apply_restored(compressed, dense, device):
            self.exchange_memory.relayout(compressed, dense, device)

    def _load_state(
        self, state: dict[str, Any], compressed: Layout, dense: Layout, device: torch.device
    ) -> None:
        # the restored per-parameter memories replace the (reset) ones, laid out for this step
        pools = {kind: dict(state.get(kind, {})) for kind in ExchangeMemory.KINDS}
        self.exchange_memory.relayout(compressed, dense, device, pools=pools)

    def state_dict(self) -> dict[str, Any]:
        """This rank's state: v and u per parameter name, counters, RNG, ledger."""
        pools = self.exchange_memory.by_name()
        pending = self.pending_state or {}  # restored, not laid out yet
        state: dict[str, Any] = super().state_dict()
        state.update(
            ledger=self.ledger.state_dict(),
            residuals=detached_copy(pending.get("residuals", pools["residuals"])),
            momentum=detached_copy(pending.get("momentum", pools["momentum"])),
            compressor=self.compressor.meta(),
        )
        generator = self.rng.state()  # a CPU or a CUDA generator: resume draws the same
        if generator is not None:
            state["generator"] = generator
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; per-parameter memories are laid out at the next exchange."""
        missing = {"step", "ledger", "residuals"} - set(state)
        if missing:
            raise ValueError(
                f"compression state is missing {sorted(missing)}; was it saved by CompressionState?"
            )
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.last_grad_norm = state.get("last_grad_norm")
        self.ledger.load_state_dict(state["ledger"])
        self.exchange_memory.reset()
        self.rng.load(state.get("generator"))
        super().load_state_dict(
            {"residuals": dict(state["residuals"]), "momentum": dict(state.get("momentum", {}))}
        )


def compressed_hook(state: CompressionState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP comm hook: park the bucket; at the last bucket exchange all of them compressed."""
    return state.park(bucket)


def register_compression_hook(model: DistributedDataParallel, state: CompressionState) -> None:
    """Bind ``state`` to the model's parameter names and register :func:`compressed_hook`."""
    state.bind(model.module.named_parameters())
    model.register_comm_hook(state, compressed_hook)
