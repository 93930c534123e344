"""Synchronous SGD with backup workers (Chen, Pan, Monga, Bengio, Jozefowicz; arXiv 1604.00981).

With ``W = N + b`` ranks, every optimizer step averages the gradients of the **first** ``N`` ranks
to finish their backward pass and drops the other ``b``; a gradient computed for step ``s`` is
never applied at any other step (stale gradients are dropped, as in the paper). One slow machine
then no longer sets the pace: a step waits for the ``N``-th fastest rank, not the slowest.

Design: tickets through the store, gradients by collectives from a communication thread
======================================================================================

A plain collective waits for every member of its group, so a straggler's *training* thread must
not be a participant of any collective of the step. Its *communication* thread can be: it is
idle, and joins each step's collectives as soon as the step's contributors are known, with zeros
if its own rank is not among them. So the payloads move by collectives over a gloo group of
their own, and the store carries only who contributes (``comm/first_n.py``). The step protocol,
for optimizer step ``s``, on every rank:

0. *Bounded lag.* Wait until every rank has finished step ``s - max_lag`` (a key set by the
   last rank to finish it). Fast ranks may run up to ``max_lag`` steps ahead of a straggler;
   this bounds the aggregated steps a slow rank holds and turns a dead rank into a loud timeout.
1. *Late already?* Read the arrival counter of step ``s``. If ``N`` ranks have already arrived,
   this rank's gradient would be dropped: if skipping is on (``skip_late_steps``) it skips
   ``training_step`` and backward for this step (Lightning's closure is not run) and only
   applies the aggregate. That is how a rank that fell behind catches up, and why a persistent
   straggler does not set the pace: it replays the steps it missed at the cost of an optimizer
   step each, like a worker of the paper's parameter server that fetches the newest parameters.
   (Not in the first two steps of a fit: DDP's one-time bucket rebuild is a broadcast every rank
   must reach from a computed backward.) A skipped ``training_step`` must not hold a collective
   the other ranks wait in: by default (``skip_late_steps=None``) skipping is off for a module
   that holds torchmetrics objects, and is switched off for the rest of the fit, on every rank,
   as soon as any rank's ``training_step`` calls a collective of the strategy
   (:meth:`on_collective`: ``self.all_gather``, an on-step ``self.log(..., sync_dist=True)``) or
   logs a value with ``sync_dist=True`` (an on-epoch one syncs at the epoch's end, among the ranks
   that logged it): that rank raises a store flag before it arrives, and a rank reads the flag
   after it saw ``N`` arrivals, so it cannot skip a step whose contributors called one.
2. *Compute, encode, arrive.* Run the closure (forward and backward; the DDP comm hook leaves
   the gradients local) and encode the gradient: tensors below ``min_compression_size`` (and
   every tensor during ``warmup_steps``) as float32, the others with the strategy's codec
   (error feedback as configured), behind a header; the size depends only on the layout and
   the codec's settings, the same on every rank (for the two-phase exchange, ``W`` slots: the
   header, then shard ``r`` of the dense and of the encoded vector, encoded shard by shard).
   Offer it to the communication thread, then
   take a ticket with the store's atomic ``add(f"{s}/arrive", 1)``: tickets ``1..N`` are the
   contributors, the same set on every rank. The ``N``-th ticket closes the step and publishes
   the payload size (fixed width: the store carries the same bytes whatever the model).
3. *Exchange* (communication thread). Once step ``s`` is closed, every rank's thread joins its
   collectives: with its payload if it holds one of the ``N`` tickets, else with zeros. QSGD
   and float32 payloads from three ranks on go by the **two-phase exchange** (:attr:`two_phase`):
   an all-to-all hands rank ``r`` shard ``r`` of every payload; it decodes the contributors'
   (a zero slot is a late rank's), averages them in rank order, re-encodes the average with the
   settings in their headers, and an all-gather hands every rank every averaged shard. That is
   ``2(W−1)/W`` of a payload sent per rank, as without backups. Top-K payloads (which cannot be
   averaged shard by shard) and two ranks go by one all-gather of every payload. A late rank's
   error-feedback memory is left untouched: its gradient is dropped, not deferred. A gradient
   holding NaN/Inf is sent as flagged headers: every rank reads them, so all skip the step, or
   all raise.
4. *Aggregate.* Every rank decodes the same bytes in the same order (the averaged shards, or
   the ``N`` contributors' payloads summed **in rank order** and divided by ``N``) and writes
   the average into ``.grad``, so the parameters after ``optimizer.step`` are bit-identical
   everywhere; gradient clipping and ``on_before_optimizer_step`` see the average, as with DDP.
5. *Finish.* Count this rank as done with step ``s``; the last of the ``W`` ranks deletes the
   step's keys and marks the step finished.

Designs weighed (``docs/backup_workers.md``): contributors allreducing in a sub-group of the
first ``N`` (a process group per possible contributor set, ``C(W, b)`` of them); a root that
gathers and broadcasts (a broadcast waits for every receiver, the straggler included); every
payload through the store (the previous version: ``W·N·P`` bytes per step through rank 0's
process, unfit for real models); every payload all-gathered for every codec (the version
before this one: ``(W - 1)·P`` per rank, ``W/2`` times the bytes of ``backups=0``; measured
slower than ``backups=0`` with a straggler, ``docs/backup_workers.md``).

Costs, honestly:

- **Bytes.** Two-phase: ``2(W - 1)/W·P`` per rank (``P``: one encoded gradient), as the
  exchange of ``backups=0``, plus a header per slot and the padding of the shards to whole
  buckets; a second rounding of the averaged shards (unbiased, not error-fed back), as there.
  All-gather (Top-K, two ranks): ``(W - 1)·P`` per rank. The ledger counts what is sent.
- **CPU.** The communication thread decodes ``N`` shards and encodes one per step, on the host
  (a ``1/W`` share of decoding every payload).
- **Latency.** A few store round trips per step (lag check, peek, ticket, finish, SIGTERM flag),
  tens of microseconds each on one host, ~0.1-1 ms on a cluster.
- **Wasted work.** ``b`` gradients per step are computed and dropped (unless a rank is late
  enough to skip), so each step averages ``N`` gradients: the effective batch is ``N·B``.
- **Memory.** A rank that is behind holds up to ``max_lag`` exchanged steps (``W·P`` bytes each
  for an all-gather, about ``2P`` for the two-phase exchange).
- **GPU (NCCL).** Payloads go device → host → gloo → host → device: the communication thread
  runs gloo on CPU bytes whatever the device (tested on CPU/gloo only).

What else must not couple the ranks: Lightning (2.6) broadcasts a SIGTERM flag from rank 0 at
every training batch, and gloo's broadcast blocks the root until every rank has joined, which
would make the straggler set the pace again. :meth:`BackupWorkers.setup` replaces that broadcast
with a store flag (same behaviour: every rank raises ``SIGTERMException`` once rank 0 received
SIGTERM); and ``fit`` ends by stopping the communication thread and a barrier, so that rank 0,
which serves the store, does not leave while a slower rank still reads its last steps. DDP's
buffer broadcast before every forward (models with buffers, e.g. BatchNorm, under
``broadcast_buffers=True``), ``self.log(..., sync_dist=True)`` in ``training_step``,
``SyncBatchNorm`` and the ``Timer`` callback are collectives too: they do not deadlock (every
rank issues them in the same order, and skipping stops once ``training_step`` calls one, see
step 1), but the fast ranks wait for the slow one there. A warning names the buffer case at
setup.
"""

from __future__ import annotations

import ast
import copy
import datetime
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric

from lightning_compress._compat import (
    default_store,
    logs_with_sync,
    mark_closure_skipped,
    replace_sigterm_broadcast,
)
from lightning_compress._lightning import namespace_of
from lightning_compress.comm.collectives import nonfinite_flag
from lightning_compress.comm.engine import choose_collective
from lightning_compress.comm.first_n import (
    EMPTY,
    HEADER,
    MAGIC,
    NO_SKIP_STEPS,
    NONFINITE,
    WARM,
    FirstNExchange,
    seconds,
)
from lightning_compress.comm.ledger import all_gather_wire_bytes, all_to_all_wire_bytes
from lightning_compress.exchange import (
    COMPRESSED,
    ExchangeMemory,
    Layout,
    encode_with_feedback,
    on_nonfinite,
    split_by_size,
)
from lightning_compress.sync.base import SyncContext, SyncSchedule

if TYPE_CHECKING:
    from torch.optim import Optimizer

    from lightning_compress.compressors import Compressor
    from lightning_compress.hooks import CompressionState

log = logging.getLogger(__name__)

class BackupWorkers(SyncSchedule):
    """Synchronous SGD with ``backups`` backup workers (Chen et al., arXiv 1604.00981).

    With ``W`` ranks, each optimizer step averages the gradients of the first ``N = W - backups``
    ranks to finish their backward pass; the other ``backups`` gradients are dropped, never
    applied later. Every rank, dropped or not, applies the same average, so parameters stay
    identical. How it works and what it costs: see the module docstring.

    Args:
        backups: ``b``, gradients dropped per step. More backups make a step wait for a faster
            quantile of the ranks (the ``N``-th fastest of ``N + b``) but average fewer gradients
            (effective batch ``N·B``) and compute ``b`` gradients for nothing. The paper found
            ``b`` around 4-6 % of the workers best (e.g. 96 + 4 on Inception); with few ranks,
            ``b = 1``. ``0`` is plain synchronous training through the normal compressed
            exchange. Must be smaller than the world size (checked at setup).
        timeout: seconds a rank waits for contributions (or for a lagging rank, see ``max_lag``)
            before failing with an error naming the step and the ranks behind. ``None`` uses the
            process group's timeout (``CompressedDDP(timeout=...)``, 30 min by default). Lower it
            to fail fast when a machine dies; keep it well above the slowest expected step.
        max_lag: how many steps the fastest ranks may run ahead of the slowest before waiting
            for it. Higher absorbs longer stalls (a stall longer than ``max_lag`` fast steps
            paces the others again); lower caps the aggregated steps a slow rank holds
            (``max_lag`` exchanged steps, about ``2P`` bytes each for the two-phase exchange,
            ``W·P`` for the all-gather) and detects a dead rank sooner. Typical 8-64.
        skip_late_steps: whether a rank that is already late when a step starts (``N`` ranks
            have arrived) skips ``training_step`` and backward for that step and only applies
            the average: how it catches up after a stall, and what keeps a persistent straggler
            from setting the pace. A skipped step leaves any collective of ``training_step``
            unmatched on the other ranks (``self.log(..., sync_dist=True)``, torchmetrics
            objects that sync), which would hang the run. ``None`` (default): on, except for a
            module that holds torchmetrics objects, and switched off for the rest of the fit on
            every rank once a ``training_step`` calls a collective through the strategy or logs
            with ``sync_dist=True`` (with a warning). ``True``: always on (you know
            ``training_step`` issues no collective).
            ``False``: never (a persistent straggler then sets the pace once it is ``max_lag``
            steps behind).

    Attributes:
        last_step: the last optimizer step aggregated (-1 before the first).
        last_contributors: ranks whose gradients that step averaged, sorted.
        last_dropped: ranks that straggled at that step (their gradients were dropped), sorted.
        last_skipped: whether this rank skipped forward and backward at that step.
        last_wait_s: seconds this rank waited for the ``N`` contributions at that step.
        dropped_total: gradients dropped so far over all ranks (identical on every rank).
        straggled_total: steps this rank was dropped; skipped_total: steps it skipped.

    Example::

        trainer = pl.Trainer(accelerator="cpu", devices=4,
                             strategy=CompressedDDP(compressor=QSGD(bits=8), sync=BackupWorkers(backups=1)))

    """

    def __init__(
        self,
        backups: int = 1,
        timeout: float | datetime.timedelta | None = None,
        max_lag: int = 32,
        skip_late_steps: bool | None = None,
    ) -> None:
        if isinstance(backups, bool) or not isinstance(backups, int) or backups < 0:
            raise ValueError(f"backups must be an integer >= 0 (and < the number of ranks), got {backups!r}")
        if isinstance(max_lag, bool) or not isinstance(max_lag, int) or max_lag < 1:
            raise ValueError(f"max_lag must be an integer >= 1, got {max_lag!r}")
        if skip_late_steps is not None and not isinstance(skip_late_steps, bool):
            raise TypeError(f"skip_late_steps must be True, False or None (auto), got {skip_late_steps!r}")
        self.backups = backups
        self.timeout = seconds(timeout)
        self.max_lag = max_lag
        self.skip_late_steps = skip_late_steps

        self.last_step = -1
        self.last_contributors: tuple[int, ...] = ()
        self.last_dropped: tuple[int, ...] = ()
        self.last_skipped = False
        self.last_wait_s = 0.0
        self.dropped_total = 0
        self.straggled_total = 0
        self.skipped_total = 0
        #: error-feedback memory of the compressed part (per parameter name)
        self.memory = ExchangeMemory()
        # commits this step's error-feedback update once the step is known to be applied
        self.add_transient("_pending")
        self.add_transient("_exchange")
        self._world_size = 1
        self._rank = 0
        self._names: dict[int, str] = {}
        self._running: int | None = None
        self._fit_steps = 0
        self._may_skip = False  # this fit: skip_late_steps resolved (None: until a collective is seen)
        self._in_closure = False
        self._codec: Compressor | None = None
        self._codecs: dict[bytes, Compressor] = {}  # by the settings in the headers (both threads)
        self._seed = 0

    @property
    def contributors(self) -> int:
        """``N``: gradients averaged per step (``world size - backups``; known after setup)."""
        return self._world_size - self.backups

    @property
    def active(self) -> bool:
        """Whether steps go through the first-N exchange (``backups > 0`` on more than one rank)."""
        return self._exchange is not None

    @property
    def two_phase(self) -> bool:
        """Whether payloads go by the two-phase exchange (shards averaged and re-encoded) or an all-gather.

        Two-phase for codecs whose payload can be cut into shards and averaged shard by shard
        (quantizers, float32) from three ranks on, where it sends ``2(W−1)/W`` of a payload per
        rank against the all-gather's ``W−1``; all-gather for Top-K and for two ranks (the same
        bytes in one collective, no second rounding). Known after setup.
        """
        codec = self._codec
        shardable = codec is not None and codec.exchange in ("two_phase", "allreduce")
        return shardable and choose_collective(self._world_size) == "two_phase"

    # -- SyncSchedule ----------------------------------------------------------------------------
    def setup(self, ctx: SyncContext) -> None:
        world = ctx.world_size
        # Every rank evaluates the same condition on the same configuration: all raise together.
        if self.backups >= world:
            raise ValueError(
                f"BackupWorkers(backups={self.backups}) needs more ranks than backups: world size is "
                f"{world}; use backups in [0, {world - 1}]"
            )
        self._world_size = world
        self._rank = ctx.rank
        self._exchange = None
        self._fit_steps = 0
        self._running = None
        self._may_skip = False
        if self.backups == 0 or world == 1:
            return
        comm = ctx.comm
        if comm.uses_sketch:
            raise ValueError(
                "BackupWorkers does not support CountSketch: Sketched SGD's exchange needs a second round "
                "among the same ranks; use QSGD, TopK or NoCompression (or backups=0)"
            )
        if ctx.comm.scaler is not None:
            raise ValueError(
                "BackupWorkers does not support precision='16-mixed' (its GradScaler skips steps per rank, "
                "so ranks would diverge); use '32-true' or 'bf16-mixed'"
            )
        model = ctx.module
        self._names = {id(p): name for name, p in model.named_parameters()}
        store = default_store()
        base = dist.PrefixStore("lightning_compress/backup/", store)
        # Each fit adds W to the counter: the same generation on every rank, fresh keys per fit.
        generation = (int(base.add("generation", 1)) - 1) // world
        timeout = self.timeout if self.timeout is not None else store.timeout.total_seconds()
        run_store = dist.PrefixStore(f"{generation}/", base)
        n = world - self.backups
        # the payloads' collectives run from a thread of its own, on a gloo group of its own (CPU
        # bytes whatever the device; never queued behind the training thread's collectives)
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout))
        self._codec, self._codecs, self._seed = comm.compressor, {}, comm.seed
        reduce = self._reduce if self.two_phase else None
        self._exchange = FirstNExchange(run_store, self._rank, world, n, timeout, self.max_lag, group, reduce)
        self._replace_sigterm_broadcast(ctx.trainer)
        self._may_skip = self._resolve_skipping(ctx)
        ddp = ctx.model
        if getattr(ddp, "broadcast_buffers", False) and any(True for _ in model.buffers()):
            log.warning(
                "BackupWorkers: the model has buffers and DDP broadcasts them from rank 0 before every "
                "forward; that broadcast waits for the slowest rank, so stragglers set the pace again. Pass "
                "CompressedDDP(..., broadcast_buffers=False) to avoid it (buffers then stay per rank)."
            )
        log.debug(f"{type(self).__name__}: {n} of {world} ranks per step, generation {generation}")

    def _resolve_skipping(self, ctx: SyncContext) -> bool:
        """Whether late ranks may skip their compute in this fit (the same answer on every rank)."""
        if self.skip_late_steps is not None:
            return self.skip_late_steps
        metrics = sorted({type(m).__name__ for m in ctx.module.modules() if isinstance(m, Metric)})
        if metrics:
            log.info(
                f"BackupWorkers: late ranks do not skip steps: the module holds torchmetrics objects "
                f"({', '.join(metrics)}), whose synchronization needs every rank's training_step. Pass "
                "skip_late_steps=True if they never sync during training."
            )
            return False
        return True

    def on_collective(self, name: str) -> None:
        """A collective of the strategy was called: inside ``training_step``, skipping ends for this fit."""
        exchange = self._exchange
        if not self._in_closure or self.skip_late_steps is not None or exchange is None:
            return
        if self._may_skip:
            self._may_skip = False
            exchange.raise_flag(COLLECTIVE_FLAG)  # before this rank arrives at the step
            log.warning(
                f"BackupWorkers: training_step calls a collective ({name}); late ranks stop skipping "
                "steps, on every rank, so a persistent straggler sets the pace once it is max_lag steps "
                "behind. Log without sync_dist in training_step to keep skipping, or pass "
                "skip_late_steps=False to silence this."
            )

    def communicates(self, step: int) -> bool:
        # With backups, the DDP hook leaves gradients local; run_closure exchanges them.
        return self._exchange is None

    def run_closure(
        self, ctx: SyncContext, optimizer: Optimizer, closure: Callable[[], Any], step: int
    ) -> Any:
        exchange = self._exchange
        if exchange is None:
            return closure()
        if self._running == step:
            raise RuntimeError(
                "BackupWorkers: the optimizer evaluated its closure twice in one step (LBFGS?); backup "
                "workers need optimizers that evaluate it once per step"
            )
        self._running = step
        if not exchange.running:
            exchange.start(step)  # every rank starts at the same step (the fit's first, or the restored one)
        exchange.wait_lag(step)  # 0.
        params = self._params(optimizer)
        comm = ctx.comm
        _, large, warm = self._split(ctx, params, step)
        compressed = bool(large) and not warm
        if compressed:
            # every rank, contributing, late or skipped, before any compute: the policy's state
            # advances identically, from the norm in the last applied step's headers (the same
            # bytes on every rank) and this step's number
            comm.decide(comm.last_grad_norm, step)
        skipped = False
        self._fit_steps += 1
        if self._may_skip and self._fit_steps > NO_SKIP_STEPS and exchange.closed(step):  # 1.
            # the flag is read after the arrivals: a contributor that called a collective in this
            # step's training_step raised it before it arrived
            if self.skip_late_steps or not exchange.flagged(COLLECTIVE_FLAG):
                skipped = mark_closure_skipped(closure)
        self._in_closure = True
        try:
            output = None if skipped else closure()
            watch = self._may_skip and self.skip_late_steps is None
            if not skipped and watch and logs_with_sync(ctx.trainer):
                # self.log(..., sync_dist=True) syncs on-epoch values at the epoch's end, on the
                # ranks that logged them: one that skipped the epoch's steps would not join
                self.on_collective("self.log(..., sync_dist=True)")
        finally:
            self._in_closure = False
        if not skipped:
            payload, coords_sent = self._encode(ctx, params, step)  # 3. (offered before the ticket)
            ticket = exchange.arrive(step, payload)  # 2.
            if ticket <= exchange.contributors:
                for coords, nbytes in coords_sent:
                    comm.ledger.record_coords(coords, nbytes, self._world_size)
            else:
                self._pending = None  # dropped: this rank's error-feedback memory stays as it was
        start = time.perf_counter()
        rows, reduced = exchange.collect(step)  # 4.
        self.last_wait_s = time.perf_counter() - start
        try:
            contributors, grad_norm = self._decode_into(ctx, params, step, rows, reduced)
        finally:
            exchange.finish(step)  # 5. (also when every rank raises for non-finite gradients)

        # every rank's slots crossed the wire (a late rank's as zeros); the strategy closes the step
        world = self._world_size
        if reduced is None:
            comm.ledger.record(rows.shape[1], all_gather_wire_bytes(rows.shape[1], world))
        else:
            comm.ledger.record(rows.numel(), all_to_all_wire_bytes(rows.numel(), world))
            comm.ledger.record(reduced.shape[1], all_gather_wire_bytes(reduced.shape[1], world))
        # the hook counts its flushes; a skipped step had none, and every rank must agree on it
        comm.exchanged_elsewhere(step, compressed, grad_norm)
        self.last_step = step
        self.last_contributors = contributors
        self.last_dropped = tuple(r for r in range(self._world_size) if r not in contributors)
        self.last_skipped = skipped
        self.dropped_total += len(self.last_dropped)
        self.straggled_total += int(self._rank in self.last_dropped)
        self.skipped_total += int(skipped)
        return output

    def on_train_end(self, ctx: SyncContext) -> None:
        # Rank 0 hosts the store: it must not leave while a slower rank still reads its last steps.
        self.teardown()
        if self._exchange is not None and dist.is_initialized():
            dist.barrier()

    def teardown(self) -> None:
        # also after a failure: ends this rank's communication thread and tells the others
        if self._exchange is not None:
            self._exchange.stop()

    # -- encoding ----------------------------------------------------------------------------------
    def _params(self, optimizer: Optimizer) -> list[tuple[str, Tensor]]:
        seen: set[int] = set()
        params = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append((self._names.get(id(p), f"param{len(params)}"), p))
        return params

    def _split(
        self, ctx: SyncContext, params: list[tuple[str, Tensor]], step: int
    ) -> tuple[list, list, bool]:
        comm = ctx.comm
        warm = step < comm.warmup_steps
        dense, large = split_by_size(params, lambda item: item[1].numel(), comm.min_compression_size, warm)
        return dense, large, warm

    def _memory_for(self, large: list[tuple[str, Tensor]], device: torch.device) -> ExchangeMemory:
        """The error-feedback memory laid out over ``large`` (a restored residual placed by name)."""
        layout = tuple((n, p.numel()) for n, p in large)
        if not self.apply_restored(layout, device):
            self.memory.relayout(layout, (), device)
        return self.memory

    def _load_state(self, state: dict[str, Any], layout: Layout, device: torch.device) -> None:
        # a loaded residual goes back where its parameter names still fit this step's layout
        flat, names = state["residual"], tuple(state["residual_layout"])
        self.memory.reset()
        fits = names == tuple(n for n, _ in layout) and flat is not None
        if fits and flat.numel() == sum(m for _, m in layout):
            parts = flat.to(device=device, dtype=torch.float32).split([m for _, m in layout])
            pools = {"residuals": dict(zip(names, parts, strict=True))}
            self.memory.relayout(layout, (), device, pools=pools)
        else:
            self.memory.relayout(layout, (), device)

    def _shards(self, n_dense: int, n_large: int, codec: Compressor) -> tuple[int, int, int]:
        """Two-phase: ``(dense, large, bytes)`` elements per shard and bytes of an averaged shard.

        ``W`` shards of each part, the compressed part's a multiple of the codec's alignment
        (whole buckets and bytes of codes); the vectors are padded with zeros to ``W`` shards.
        """
        world = self._world_size
        unit = codec.alignment()
        dense, large = -(-n_dense // world), -(-n_large // (world * unit)) * unit
        return dense, large, 4 * dense + (codec.payload_nbytes(large) if large else 0)

    def _codec_for(self, meta: bytes) -> Compressor:
        """The strategy's codec with the settings ``meta`` (a header's): what those bytes were encoded with.

        A policy changes the live codec's settings on the training thread while the communication
        thread may still decode and re-encode an earlier step; so both threads decode with the
        settings the payloads carry, from a copy per setting.
        """
        codec = self._codecs.get(meta)
        if codec is None:
            assert self._codec is not None
            codec = copy.copy(self._codec)
            for key, value in ast.literal_eval(meta.decode()).items():
                setattr(codec, key, value)
            self._codecs[meta] = codec
        return codec

    def _encode(
        self, ctx: SyncContext, params: list[tuple[str, Tensor]], step: int
    ) -> tuple[Tensor, list[tuple[int, int]]]:
        """This rank's payload of ``step`` and the ``(coordinates, bytes)`` of each of its parts.

        A payload is a header, the codec settings, the dense float32 tensors and the codec
        payload; the ledger records the coded parts if the rank contributes. Two-phase, it is
        ``W`` equal slots, each the header and settings, then shard ``r`` of the dense vector and
        of the encoded one. The payload is a 1-D ``uint8`` CPU tensor whose size depends only on
        the layout and the codec's settings (the same on every rank), so it fills one slot of the
        collectives; a non-finite gradient is sent as its headers and zeros.
        """
        comm = ctx.comm
        dense, large, warm = self._split(ctx, params, step)
        device = params[0][1].device if params else torch.device("cpu")
        dense_flat = _flat_grads(dense, device)
        large_flat = _flat_grads(large, device)
        codec = comm.compressor
        meta = repr(codec.meta()).encode()
        sizes = (dense_flat.numel(), large_flat.numel())
        flags = WARM if warm else 0
        self._pending = None
        coords: list[tuple[int, int]] = []
        slots, shard = 1, None
        dense_bytes = 4 * dense_flat.numel()
        large_bytes = codec.payload_nbytes(large_flat.numel()) if large else 0
        if self.two_phase:
            slots = self._world_size
            d, shard, _ = self._shards(*sizes, codec)
            dense_bytes, large_bytes = 4 * d, codec.payload_nbytes(shard) if large else 0
            dense_flat = torch.nn.functional.pad(dense_flat, (0, slots * d - dense_flat.numel()))
        size = slots * (HEADER.size + len(meta) + dense_bytes + large_bytes)
        check = comm.config.checks
        # the norm and the non-finite flag are read to the host together: one device sync
        norm_sq_t = torch.linalg.vector_norm(large_flat).square().reshape(1)
        flag = nonfinite_flag([dense_flat, large_flat], device) if check else torch.zeros(1, device=device)
        norm_sq, nonfinite = torch.cat([norm_sq_t, flag]).tolist()
        if check and nonfinite:
            # every rank reads this flag from the same headers: all skip (or raise) together
            packed = HEADER.pack(MAGIC, step, self._rank, flags | NONFINITE, *sizes, len(meta), 0.0)
            head = _from_bytes(packed + meta)
            out = torch.zeros(slots, size // slots, dtype=torch.uint8)
            out[:, : head.numel()] = head
            return out.view(-1), coords
        encoded: list[Tensor] = []
        if large:
            # p = g + e, C(p); e ← p - C(p) (arXiv 1901.09847, Alg. 2) is committed once the step is
            # known to be applied (see _decode_into); a rank whose ticket comes too late drops it,
            # so its gradient is dropped whole, not carried into a later step through this memory.
            memory = self._memory_for(large, device)
            shards = None if shard is None else (slots, shard)
            payloads, self._pending = encode_with_feedback(
                large_flat, codec, comm.config, memory, comm.generator(large_flat.device), shards
            )
            encoded = [_to_bytes(q.to_bytes()) for q in payloads]
            coords.append((large_flat.numel(), sum(q.nbytes for q in payloads)))
        if dense:
            coords.append((sizes[0], 4 * sizes[0]))
        head = _from_bytes(HEADER.pack(MAGIC, step, self._rank, flags, *sizes, len(meta), norm_sq) + meta)
        dense_parts = _to_bytes(dense_flat).chunk(slots) if dense_bytes else [head[:0]] * slots
        out = torch.cat([t for r in range(slots) for t in (head, dense_parts[r], *encoded[r : r + 1])])
        if out.numel() != size:
            raise RuntimeError(
                f"BackupWorkers: the payload of step {step} has {out.numel()} bytes, its layout says {size}"
            )
        return out, coords

    def _reduce(self, step: int, rows: Tensor) -> Tensor:
        """Two-phase, on the communication thread: this rank's shard averaged over the contributors.

        ``rows[j]`` is rank ``j``'s slot for this rank (zeros if ``j`` is late). The contributors'
        shards are decoded and averaged in rank order (divided by their number before adding, as
        DDP does) and the average is re-encoded with the settings in their headers (stochastic
        rounding keeps it unbiased; the generator is seeded by seed, step and rank, so a resumed
        run draws the same). Decided from the headers alone, which every rank sees alike: if they
        disagree, or a contributor's gradient is non-finite, every rank returns zeros of the same
        size and the training threads raise or skip the step together (:meth:`_decode_into`).
        """
        heads = []
        for row in rows:
            head = row[: HEADER.size].numpy().tobytes()
            if head[:4] != EMPTY:
                magic, _, _, flags, n_dense, n_large, meta_len, _ = HEADER.unpack(head)
                meta = row[HEADER.size : HEADER.size + meta_len].numpy().tobytes()
                body = row[HEADER.size + meta_len :]
                heads.append(((magic, flags & WARM, n_dense, n_large, meta), flags, body))
        if not heads or len({key for key, _, _ in heads}) != 1 or heads[0][0][0] != MAGIC:
            return torch.zeros(1, dtype=torch.uint8)  # every rank raises in _decode_into
        (_, _, n_dense, n_large, meta), _, _ = heads[0]
        codec = self._codec_for(meta)
        d, shard, nbytes = self._shards(n_dense, n_large, codec)
        if any(flags & NONFINITE for _, flags, _ in heads):
            return torch.zeros(nbytes, dtype=torch.uint8)
        dense_sum = torch.zeros(d, dtype=torch.float32)
        large_sum = torch.zeros(shard, dtype=torch.float32)
        count = len(heads)
        for _, _, body in heads:
            buf = body.clone()  # a fresh, aligned buffer (a row slice is not)
            dense_sum.add_(buf[: 4 * d].view(torch.float32), alpha=1.0 / count)
            if shard:
                payload = codec.from_bytes(buf[4 * d :], (shard,), torch.float32)
                large_sum.add_(codec.decompress(payload).reshape(-1).to(torch.float32), alpha=1.0 / count)
        parts = [_to_bytes(dense_sum)]
        if shard:
            seed = ((self._seed * 1_000_003 + step) * self._world_size + self._rank) % (1 << 62)
            generator = torch.Generator().manual_seed(seed)
            parts.append(_to_bytes(codec.compress(large_sum, generator).to_bytes()))
        return torch.cat(parts)

    def _decode_into(
        self,
        ctx: SyncContext,
        params: list[tuple[str, Tensor]],
        step: int,
        rows: Tensor,
        reduced: Tensor | None,
    ) -> tuple[tuple[int, ...], float | None]:
        comm = ctx.comm
        codec: Compressor = comm.compressor
        dense, large, warm = self._split(ctx, params, step)
        n_dense = sum(p.numel() for _, p in dense)
        n_large = sum(p.numel() for _, p in large)
        device = params[0][1].device if params else torch.device("cpu")
        meta = repr(codec.meta()).encode()
        received = []
        norms_sq: list[float] = []
        bad = []
        for slot, row in enumerate(rows):
            head = row[: HEADER.size].numpy().tobytes()
            if head[:4] == EMPTY:
                continue  # a rank that does not contribute to this step sent zeros
            magic, p_step, rank, flags, p_dense, p_large, meta_len, norm_sq = HEADER.unpack(head)
            p_meta = row[HEADER.size : HEADER.size + meta_len].numpy().tobytes()
            layout_ok = bool(flags & WARM) == warm and (p_dense, p_large) == (n_dense, n_large)
            if magic != MAGIC or p_step != step or rank != slot or not layout_ok:
                raise RuntimeError(
                    f"BackupWorkers: rank {rank}'s payload for step {step} does not match this rank's layout "
                    f"(step {p_step}, {p_dense}+{p_large} vs {n_dense}+{n_large} elements): ranks disagree"
                )
            if p_meta != meta:
                raise RuntimeError(
                    f"BackupWorkers: rank {rank} encoded step {step} with codec settings {p_meta.decode()} "
                    f"but this rank has {meta.decode()}; codec settings must change identically on every rank"
                )
            received.append((rank, row[HEADER.size + meta_len :]))
            norms_sq.append(norm_sq)
            if flags & NONFINITE:
                bad.append(rank)
        if len(received) != self.contributors:
            raise RuntimeError(
                f"BackupWorkers: step {step} holds {len(received)} contributions, "
                f"{self.contributors} expected"
            )
        contributors = tuple(rank for rank, _ in received)  # rank order: the same sum on every rank
        pending, self._pending = self._pending, None
        if bad:
            self._on_nonfinite(comm, step, sorted(bad))
            return contributors, None
        if pending is not None:
            pending()  # the step is applied: this contributor's error-feedback update stands
        if reduced is None:
            dense_avg, large_avg = self._average(codec, received, n_dense, n_large, device)
        else:
            dense_avg, large_avg = self._gathered(self._codec_for(meta), reduced, n_dense, n_large, device)
        _write_grads(dense, dense_avg)
        _write_grads(large, large_avg)
        # the contributors' pre-compression norm, from the same headers on every rank
        return contributors, math.sqrt(math.fsum(norms_sq) / len(received)) if n_large else None

    @staticmethod
    def _average(
        codec: Compressor,
        received: list[tuple[int, Tensor]],
        n_dense: int,
        n_large: int,
        device: torch.device,
    ) -> tuple[Tensor, Tensor]:
        """All-gather: the mean of the contributors' decoded payloads, summed in rank order."""
        count = len(received)
        dense_sum = torch.zeros(n_dense, dtype=torch.float32, device=device)
        large_sum = torch.zeros(n_large, dtype=torch.float32, device=device)
        scatter_add = getattr(codec, "scatter_add_into", None)
        # divide before summing, as DDP does: finite gradients near float32's maximum stay finite
        for _, body in received:
            buf = body.to(device, copy=True)  # a fresh, aligned buffer (a row slice is not)
            if n_dense:
                dense_sum.add_(buf[: 4 * n_dense].view(torch.float32), alpha=1.0 / count)
            if n_large:
                payload = codec.from_bytes(buf[4 * n_dense :], (n_large,), torch.float32)
                if scatter_add is not None:
                    scatter_add(large_sum, payload, alpha=1.0 / count)
                else:
                    large_sum.add_(codec.decompress(payload).reshape(-1).to(torch.float32), alpha=1.0 / count)
        return dense_sum, large_sum

    def _gathered(
        self, codec: Compressor, reduced: Tensor, n_dense: int, n_large: int, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """Two-phase: the averaged shards of every rank laid end to end, trimmed to the layout."""
        d, shard, _ = self._shards(n_dense, n_large, codec)
        buf = reduced.to(device, copy=True)  # (W, bytes): fresh and aligned
        dense_avg = buf[:, : 4 * d].contiguous().view(torch.float32).reshape(-1)[:n_dense]
        large_avg = torch.empty(self._world_size * shard, dtype=torch.float32, device=device)
        if shard:
            for r, row in enumerate(buf):
                payload = codec.from_bytes(row[4 * d :].clone(), (shard,), torch.float32)
                large_avg[r * shard : (r + 1) * shard] = codec.decompress(payload).reshape(-1)
        return dense_avg, large_avg[:n_large]

    def _on_nonfinite(self, comm: CompressionState, step: int, ranks: list[int]) -> None:
        # same contract as the DDP hook's `nonfinite` (CompressedDDP drops the step on
        # last_step_skipped), decided from the same payloads on every rank
        message = (
            f"BackupWorkers: non-finite gradients (NaN/Inf) from contributing ranks {ranks} "
            f"at step {step}"
        )
        on_nonfinite(comm.nonfinite, message, "error-feedback memory untouched")
        comm.skip_step()

    # -- Lightning's per-batch SIGTERM broadcast ---------------------------------------------------
    def _replace_sigterm_broadcast(self, trainer: Any) -> None:
        store = self._exchange.store if self._exchange is not None else None
        rank = self._rank
        # the loop catches its own namespace's exception (pytorch_lightning or lightning.pytorch)
        sigterm_exception = namespace_of(trainer).utilities.exceptions.SIGTERMException

        def sigterm_via_store() -> None:
            # Same contract as Lightning's: every rank raises once rank 0 received SIGTERM, but via a
            # store flag, because a broadcast would wait for the slowest rank at every batch.
            if store is None:
                return
            if rank == 0 and getattr(trainer, "received_sigterm", False):
                store.set("sigterm", "1")
            if store.check(["sigterm"]):
                raise sigterm_exception()

        replace_sigterm_broadcast(trainer, sigterm_via_store)

    # -- metrics and state ---------------------------------------------------------------------------
    logged_metrics = (
        "backup/contributions",
        "backup/dropped",
        "backup/straggled",
        "backup/skipped",
        "backup/wait_s",
        "backup/dropped_total",
        "backup/straggled_total",
    )

    def metrics(self) -> dict[str, float]:
        """Figures of the last step, for loggers (``CommunicationMonitor`` logs them).

        ``backup/contributions`` (gradients averaged), ``backup/dropped`` (gradients dropped),
        ``backup/straggled`` (1.0 if this rank was dropped), ``backup/skipped`` (1.0 if it skipped
        forward and backward), ``backup/wait_s``, ``backup/dropped_total`` and
        ``backup/straggled_total``. Empty before the first step and without backups.
        """
        if self.last_step < 0:
            return {}
        return {
            "backup/contributions": float(len(self.last_contributors)),
            "backup/dropped": float(len(self.last_dropped)),
            "backup/straggled": float(self._rank in self.last_dropped),
            "backup/skipped": float(self.last_skipped),
            "backup/wait_s": float(self.last_wait_s),
            "backup/dropped_total": float(self.dropped_total),
            "backup/straggled_total": float(self.straggled_total),
        }

    def state_dict(self) -> dict[str, Any]:
        residual = self.memory.v.residuals.get(COMPRESSED)
        names = tuple(n for n, _ in self.memory.layout)
        pending = self.pending_state
        if pending is not None:  # restored, not laid out yet
            residual, names = pending["residual"], tuple(pending["residual_layout"])
        return {
            "backups": self.backups,
            "residual": None if residual is None else residual.detach().clone(),
            "residual_layout": list(names),
            "dropped_total": self.dropped_total,
            "straggled_total": self.straggled_total,
            "skipped_total": self.skipped_total,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "residual" not in state:
            raise ValueError("BackupWorkers state is missing 'residual'; was it saved by BackupWorkers?")
        self.memory.reset()
        # the residual is laid out at the first encode, once the layout and the device are known
        layout = state.get("residual_layout", ())
        super().load_state_dict({"residual": state["residual"], "residual_layout": layout})
        self.dropped_total = int(state.get("dropped_total", 0))
        self.straggled_total = int(state.get("straggled_total", 0))
        self.skipped_total = int(state.get("skipped_total", 0))

    def __repr__(self) -> str:
        name = type(self).__name__
        return (
            f"{name}(backups={self.backups}, timeout={self.timeout}, max_lag={self.max_lag}, "
            f"skip_late_steps={self.skip_late_steps})"
        )


#: the store flag a rank raises when its training_step called a collective (skipping ends)
COLLECTIVE_FLAG = "collective_in_step"
def _flat_grads(params: list[tuple[str, Tensor]], device: torch.device) -> Tensor:
    """The gradients of ``params`` in one new float32 vector on ``device`` (zeros for a missing one)."""
    if not params:
        return torch.zeros(0, dtype=torch.float32, device=device)
    return torch.cat(
        [
            torch.zeros(p.numel(), device=p.device) if p.grad is None else p.grad.reshape(-1).float()
            for _, p in params
        ]
    )


def _to_bytes(t: Tensor) -> Tensor:
    """``t``'s bytes as a 1-D ``uint8`` CPU tensor."""
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8)


def _from_bytes(b: bytes) -> Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


def _write_grads(params: list[tuple[str, Tensor]], flat: Tensor) -> None:
    offset = 0
    for _, p in params:
        n = p.numel()
        value = flat[offset : offset + n].view_as(p).to(p.dtype)
        if p.grad is None:
            p.grad = value.clone()
        else:
            p.grad.copy_(value)
        offset += n


__all__ = ["BackupWorkers", "FirstNExchange"]
