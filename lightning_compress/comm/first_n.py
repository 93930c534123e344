"""First-``N``-of-``W`` exchange: the contributors decided through a store, payloads by collectives.

The transport of :class:`~lightning_compress.sync.BackupWorkers` (Chen et al., arXiv 1604.00981),
free of Lightning and codecs. Two things move, by two routes:

* **Who contributes** (a few bytes per rank and step) goes through the process group's c10d
  ``Store``: an atomic counter hands out tickets, the first ``N`` are the contributors, and the
  ``N``-th also publishes the payload size. The store sees the same few keys whatever the model.
* **The payloads** (encoded gradients) go by collectives on a gloo group of their own, run by
  a **communication thread** on every rank. As soon as a step is closed (``N`` tickets taken),
  each rank's thread joins that step's exchange: with its payload if it holds one of the ``N``
  tickets, with zeros of the same size otherwise. A late rank's thread joins while its
  training thread is still computing (or is several steps behind), so a collective never waits
  for a straggler's compute; the straggler later finds the steps it missed already aggregated
  and applies them.

Two exchanges, both free of codecs here:

* **All-gather** (no ``reduce``): every rank receives every rank's payload, ``(W−1)·P`` bytes sent
  per rank. For payloads that cannot be cut into shards and averaged shard by shard (Top-K).
* **Two-phase** (a ``reduce`` function): the payload is ``W`` equal slots, slot ``r`` for rank
  ``r`` (an encoded shard of the gradient). An all-to-all hands every rank its slot from every
  rank; ``reduce`` turns them into one averaged, re-encoded shard (zeros from late ranks are
  skipped there); an all-gather hands every rank every averaged shard. ``2(W−1)/W·P`` bytes sent
  per rank, as in the engine's exchange without backups (``comm/engine.py``).

Every rank's thread joins the steps in order, the same collectives each, so gloo sees the same
sequence on every rank. See ``sync/backup.py``'s module docstring for the step protocol. The wire
header of a payload is defined here too.
"""

from __future__ import annotations

import datetime
import struct
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_compress.comm.engine import all_gather_in_pieces, all_to_all_in_pieces

MAGIC = b"BKW3"
#: the magic of a row of zeros: the slot of a rank that does not contribute
EMPTY = bytes(4)
# magic, step, rank, flags, dense numel, compressed numel, codec-settings length, and the sender's
# squared pre-compression norm of the compressed part (what a policy decides the next width from)
HEADER = struct.Struct("<4sqiiqqid")
WARM = 1  # flag: every tensor sent as float32 (warm-up step)
NONFINITE = 2  # flag: the sender's gradient holds NaN/Inf; its body is zeros
#: the size a stopping rank publishes for a step that will not come (see FirstNExchange.stop)
STOPPED = -1
# DDP rebuilds its buckets at the first forward after the first backward of a new wrapper, with a
# broadcast from rank 0 that every rank must join: a rank that skipped that backward would join
# one step later, while the others wait in the broadcast for it and it waits for their
# contributions. So no rank skips a step's compute during the first steps of each fit.
NO_SKIP_STEPS = 2


def seconds(timeout: float | datetime.timedelta | None) -> float | None:
    """``timeout`` in seconds (``None`` kept); refuses anything but a positive number or timedelta."""
    if timeout is None:
        return None
    if isinstance(timeout, datetime.timedelta):
        timeout = timeout.total_seconds()
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds (float or timedelta) or None, got {timeout!r}")
    return float(timeout)


class FirstNExchange:
    """First-``N``-of-``W`` exchange: tickets through a ``Store``, payloads by collectives.

    The protocol of :class:`BackupWorkers` (module docstring, steps 0-5) without Lightning or
    codecs. Every rank calls, per step ``s`` and in this order: :meth:`wait_lag`, optionally
    :meth:`closed`, then :meth:`arrive` with its payload (or not, when it skips the step),
    :meth:`collect`, :meth:`finish`. :meth:`start` starts the communication thread before the
    first step; :meth:`stop` ends it.

    Args:
        store: a store every rank reaches (e.g. ``lightning_compress._compat.default_store()``),
            already prefixed so that its keys belong to this run. The communication thread uses
            a clone of it (a store client must not be shared between threads).
        rank: this rank.
        world_size: ``W``.
        contributors: ``N``, the number of payloads aggregated per step (``1 <= N <= W``).
        timeout: seconds any wait may take before it fails with a ``RuntimeError`` naming the
            step and the missing ranks.
        max_lag: how many steps the fastest rank may be ahead of the slowest (>= 1).
        group: the gloo group the payloads travel on (its own: the thread's collectives must not
            queue behind the training thread's); ``None``: the default group.
        reduce: ``None``: payloads are all-gathered. Otherwise the two-phase exchange:
            ``reduce(step, rows)`` runs on the communication thread with ``rows`` (``(W, P/W)``
            uint8: every rank's slot for this rank, zeros from a late rank) and returns this
            rank's share of the result (1-D uint8, the same size on every rank), which is then
            all-gathered. It must decide from ``rows`` alone (every rank sees every
            contributor's header there), so that every rank returns the same size.

    Attributes:
        store_bytes: bytes this rank wrote to the store so far (keys and values): a few per
            step, whatever the payload size.

    """

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        world_size: int,
        contributors: int,
        timeout: float,
        max_lag: int,
        group: dist.ProcessGroup | None = None,
        reduce: Callable[[int, Tensor], Tensor] | None = None,
    ) -> None:
        if not 1 <= contributors <= world_size:
            raise ValueError(f"contributors must be in [1, world_size={world_size}], got {contributors}")
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.contributors = contributors
        self.timeout = timeout
        self.max_lag = max_lag
        self.group = group
        self.reduce = reduce
        self.store_bytes = 0
        self._cv = threading.Condition()
        self._offers: dict[int, Tensor] = {}  # step -> this rank's payload, until its ticket is known
        self._tickets: dict[int, int] = {}
        self._results: dict[int, tuple[Tensor, Tensor | None]] = {}
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._next = 0  # the step after the last one collected

    # -- the communication thread ------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """Whether the communication thread was started and not stopped."""
        return self._thread is not None

    def start(self, step: int) -> None:
        """Start the communication thread; it joins steps ``step, step + 1, ...`` as they close."""
        if self._thread is not None:
            raise RuntimeError("the first-N exchange's communication thread is already running")
        self._next = step
        self._thread = threading.Thread(
            target=self._serve, args=(self.store.clone(), step), name=f"first-n-rank{self.rank}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """End the communication thread: the step after the last one collected will not come.

        Marks that step closed with size :data:`STOPPED` (unless it was already closed), which
        ends every rank's thread that waits for it: at the end of a fit every rank calls this at
        the same step; after a failure it ends the other ranks' exchange at once instead of at
        their timeout.
        """
        if self._thread is None:
            return
        self.store.compare_set(f"{self._next}/closed", "", str(STOPPED))
        self._thread.join(timeout=self.timeout)
        self._thread = None

    def _serve(self, store: dist.Store, step: int) -> None:
        try:
            while True:
                key = f"{step}/closed"
                store.wait([key], datetime.timedelta(seconds=self.timeout))
                size = int(store.get(key))
                if size == STOPPED:
                    raise RuntimeError(f"a rank stopped the exchange at step {step} (fit ended or failed)")
                with self._cv:
                    # this rank's training thread is taking a ticket: its answer decides the slot
                    while step in self._offers and step not in self._tickets:
                        self._cv.wait()
                    offer = self._offers.pop(step, None)
                    mine = offer if self._tickets.get(step, 0) <= self.contributors else None
                if mine is not None and mine.numel() != size:
                    raise RuntimeError(
                        f"step {step}: this rank's payload has {mine.numel()} bytes, the step's "
                        f"closing rank announced {size}: ranks disagree on the layout or the codec"
                    )
                send = mine if mine is not None else torch.zeros(size, dtype=torch.uint8)
                if self.reduce is None:
                    result = (all_gather_in_pieces(send, self.group, None), None)
                else:
                    if size % self.world_size:
                        raise RuntimeError(f"step {step}: a two-phase payload of {size} bytes is not W slots")
                    rows = all_to_all_in_pieces(send.view(self.world_size, -1), self.group, None)
                    result = (rows, all_gather_in_pieces(self.reduce(step, rows), self.group, None))
                with self._cv:
                    self._results[step] = result
                    self._cv.notify_all()
                step += 1
        except BaseException as err:  # handed to the training thread, which raises it
            with self._cv:
                self._error = err
                self._cv.notify_all()

    def _wait(self, keys: list[str], what: Callable[[], str]) -> None:
        try:
            self.store.wait(keys, datetime.timedelta(seconds=self.timeout))
        except (dist.DistStoreError, RuntimeError) as err:
            message = f"BackupWorkers (rank {self.rank}): {what()} within {self.timeout:g} s: {err}"
            raise RuntimeError(message) from err

    def positions(self) -> dict[int, int]:
        """Return the last step each rank finished (-1: none yet), for error messages and debugging."""
        keys = [f"pos/{r}" for r in range(self.world_size)]
        out = {}
        for r, key in enumerate(keys):
            out[r] = int(self.store.get(key)) if self.store.check([key]) else -1
        return out

    # 0. bounded lag
    def wait_lag(self, step: int) -> None:
        """Block until every rank has finished step ``step - max_lag``."""
        old = step - self.max_lag
        if old < 0:
            return

        def what() -> str:
            behind = {r: p for r, p in self.positions().items() if p < old}
            return (
                f"step {step} may not start before every rank finished step {old} (max_lag={self.max_lag}); "
                f"ranks behind, with the last step they finished: {behind} (dead or stalled?)"
            )

        self._wait([f"{old}/done"], what)

    # 1. late already?
    def closed(self, step: int) -> bool:
        """Whether ``contributors`` ranks have already arrived at ``step`` (so this one would be dropped)."""
        return self.store.add(f"{step}/arrive", 0) >= self.contributors

    def raise_flag(self, name: str) -> None:
        """Set the flag ``name`` for every rank to read (it stays set for this run's keys)."""
        self._set(f"flag/{name}", "1")

    def flagged(self, name: str) -> bool:
        """Whether any rank raised the flag ``name``."""
        return self.store.check([f"flag/{name}"])

    # 2. arrive
    def arrive(self, step: int, payload: Tensor) -> int:
        """Offer ``payload`` (1-D ``uint8`` on the CPU) for ``step`` and take a ticket.

        Tickets ``1..contributors`` contribute: the communication thread sends the payload in the
        step's exchange. A later ticket's payload is dropped (the thread sends zeros). The
        ``contributors``-th ticket closes the step and publishes the payload size.
        """
        with self._cv:
            self._offers[step] = payload
        ticket = self.contributors + 1  # if the store fails, the thread must not wait for an answer
        try:
            ticket = self._add(f"{step}/arrive")
            if ticket == self.contributors:
                # compare_set: a stopped exchange's marker is not overwritten; fixed width: the
                # store carries the same bytes whatever the payload size
                size = f"{payload.numel():020d}"
                self.store.compare_set(f"{step}/closed", "", size)
                self.store_bytes += len(f"{step}/closed") + len(size)
        finally:
            with self._cv:
                self._tickets[step] = ticket
                if ticket > self.contributors:
                    self._offers.pop(step, None)  # dropped, whether or not the thread is past the step
                self._cv.notify_all()
        return ticket

    # 4. collect
    def collect(self, step: int) -> tuple[Tensor, Tensor | None]:
        """``(rows, reduced)`` of ``step``, in rank order.

        All-gather: ``rows`` is ``(W, P)``, every rank's payload, and ``reduced`` is ``None``.
        Two-phase: ``rows`` is ``(W, P/W)``, every rank's slot for this rank (its headers say
        who contributed), and ``reduced`` is ``(W, R)``, every rank's result of ``reduce``. A
        row of a rank that does not contribute is zeros (magic :data:`EMPTY`).
        """

        def what() -> str:
            arrived = self.store.add(f"{step}/arrive", 0)
            return (
                f"step {step}: {min(arrived, self.contributors)} of the {self.contributors} contributions "
                f"needed arrived ({arrived} arrivals); last step finished per rank: {self.positions()}"
            )

        deadline = time.monotonic() + self.timeout
        with self._cv:
            while step not in self._results and self._error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    message = f"BackupWorkers (rank {self.rank}): {what()} within {self.timeout:g} s"
                    raise RuntimeError(message)
                self._cv.wait(timeout=left)
            if step not in self._results:  # the thread failed (or was stopped) before this step
                raise RuntimeError(
                    f"BackupWorkers (rank {self.rank}): the exchange of step {step} failed: {self._error}"
                ) from self._error
            self._tickets.pop(step, None)
            self._next = step + 1
            return self._results.pop(step)

    # 5. finish
    def finish(self, step: int) -> None:
        """Count this rank done with ``step``; the last rank cleans the step up and marks it finished."""
        self._set(f"pos/{self.rank}", str(step))
        if self._add(f"{step}/read") < self.world_size:
            return
        # Every rank has read step s (so every communication thread is past it): nobody touches its
        # keys again, and every rank has passed its lag check on step s - max_lag.
        keys = [f"{step}/arrive", f"{step}/read", f"{step}/closed"]
        if step - self.max_lag >= 0:
            keys.append(f"{step - self.max_lag}/done")
        for key in keys:
            try:
                self.store.delete_key(key)
            except (RuntimeError, NotImplementedError):  # a store without deletion only keeps more keys
                break
        self._set(f"{step}/done", "1")

    def _set(self, key: str, value: str) -> None:
        self.store.set(key, value)
        self.store_bytes += len(key) + len(value)

    def _add(self, key: str) -> int:
        """Increment a counter by one (a key and an 8-byte integer written); its new value."""
        self.store_bytes += len(key) + 8
        return int(self.store.add(key, 1))


__all__ = [
    "EMPTY",
    "HEADER",
    "MAGIC",
    "NONFINITE",
    "NO_SKIP_STEPS",
    "STOPPED",
    "WARM",
    "FirstNExchange",
    "seconds",
]
