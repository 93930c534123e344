"""First-``N``-of-``W`` exchange of byte payloads through a c10d ``Store``: no collective at all.

The transport of :class:`~lightning_compress.sync.BackupWorkers` (Chen et al., arXiv 1604.00981),
free of Lightning and codecs: a plain collective waits for every member of its group, so the
``b`` stragglers of a step must not take part in any; every payload goes through the store
instead, and the store's atomic counter decides who contributes (see ``sync/backup.py``'s module
docstring for the protocol, its design alternatives and its costs). The wire header of a
payload is defined here too.
"""

from __future__ import annotations

import datetime
import struct
from collections.abc import Callable

import torch.distributed as dist

#: the TCPStore (libuv backend) rejects messages above 8 MiB; payloads travel in chunks of this size
CHUNK = 4 << 20
MAGIC = b"BKW2"
# magic, step, rank, flags, dense numel, compressed numel, codec-settings length, and the sender's
# squared pre-compression norm of the compressed part (what a policy decides the next width from)
HEADER = struct.Struct("<4sqiiqqid")
WARM = 1  # flag: every tensor sent as float32 (warm-up step)
NONFINITE = 2  # flag: the sender's gradient holds NaN/Inf; no body follows
COUNT = struct.Struct("<q")
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
    """First-``N``-of-``W`` exchange of byte payloads through a c10d ``Store`` (no collectives).

    The protocol of :class:`BackupWorkers` (module docstring, steps 0-5) without Lightning or
    codecs, usable on any process group whose store all ranks share. Every rank calls, per step
    ``s`` and in this order: :meth:`wait_lag`, optionally :meth:`closed`, then :meth:`arrive` (or
    not, when it skips the step), :meth:`post` if its ticket is ``<= contributors``,
    :meth:`collect`, :meth:`finish`.

    Args:
        store: a store every rank reaches (e.g. ``lightning_compress._compat.default_store()``),
            already prefixed so that its keys belong to this run.
        rank: this rank.
        world_size: ``W``.
        contributors: ``N``, the number of payloads aggregated per step (``1 <= N <= W``).
        timeout: seconds any wait may take before it fails with a ``RuntimeError`` naming the
            step and the missing ranks.
        max_lag: how many steps the fastest rank may be ahead of the slowest (>= 1).

    """

    def __init__(
        self, store: dist.Store, rank: int, world_size: int, contributors: int, timeout: float, max_lag: int
    ) -> None:
        if not 1 <= contributors <= world_size:
            raise ValueError(f"contributors must be in [1, world_size={world_size}], got {contributors}")
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.contributors = contributors
        self.timeout = timeout
        self.max_lag = max_lag

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

    # 2. arrive
    def arrive(self, step: int) -> int:
        """Take a ticket for ``step``: ``1..contributors`` contribute, later tickets are dropped."""
        return int(self.store.add(f"{step}/arrive", 1))

    # 3. post
    def post(self, step: int, ticket: int, payload: bytes) -> int:
        """Publish a contributor's payload; returns the bytes sent to the store."""
        if not 1 <= ticket <= self.contributors:
            raise ValueError(f"ticket {ticket} of step {step} is not a contributor's, 1..{self.contributors}")
        chunks = [payload[i : i + CHUNK] for i in range(0, max(len(payload), 1), CHUNK)]
        for i, chunk in enumerate(chunks[1:], start=1):
            self.store.set(f"{step}/g/{ticket}/{i}", chunk)
        # the head goes last: once it exists, every chunk does
        self.store.set(f"{step}/g/{ticket}", COUNT.pack(len(chunks)) + chunks[0])
        return len(payload) + COUNT.size

    # 4. collect
    def collect(self, step: int) -> list[bytes]:
        """Wait for the ``contributors`` payloads of ``step`` and return them in ticket order."""
        heads = [f"{step}/g/{t}" for t in range(1, self.contributors + 1)]

        def what() -> str:
            arrived = self.store.add(f"{step}/arrive", 0)
            missing = [t for t, key in enumerate(heads, start=1) if not self.store.check([key])]
            return (
                f"step {step}: {min(arrived, self.contributors)} of the {self.contributors} contributions "
                f"needed arrived ({arrived} arrivals, tickets {missing} not posted); "
                f"last step finished per rank: {self.positions()}"
            )

        self._wait(heads, what)
        values = self.store.multi_get(heads)
        counts = [COUNT.unpack_from(v)[0] for v in values]
        extra = [f"{step}/g/{t}/{i}" for t, c in enumerate(counts, start=1) for i in range(1, c)]
        rest = iter(self.store.multi_get(extra) if extra else [])
        payloads = []
        for value, count in zip(values, counts, strict=True):
            parts = [value[COUNT.size :]] + [next(rest) for _ in range(count - 1)]
            payloads.append(b"".join(parts) if count > 1 else parts[0])
        self._counts = counts
        return payloads

    # 5. finish
    def finish(self, step: int) -> None:
        """Count this rank done with ``step``; the last rank cleans the step up and marks it finished."""
        self.store.set(f"pos/{self.rank}", str(step))
        if self.store.add(f"{step}/read", 1) < self.world_size:
            return
        # Every rank has read step s: nobody touches its keys again, and every rank has passed
        # its lag check on step s - max_lag (made before arriving at s).
        counts = getattr(self, "_counts", [1] * self.contributors)
        keys = [f"{step}/arrive", f"{step}/read"]
        for t, c in enumerate(counts, start=1):
            keys += [f"{step}/g/{t}"] + [f"{step}/g/{t}/{i}" for i in range(1, c)]
        if step - self.max_lag >= 0:
            keys.append(f"{step - self.max_lag}/done")
        for key in keys:
            try:
                self.store.delete_key(key)
            except (RuntimeError, NotImplementedError):  # a store without deletion only keeps more keys
                break
        self.store.set(f"{step}/done", "1")


__all__ = [
    "CHUNK",
    "COUNT",
    "HEADER",
    "MAGIC",
    "NONFINITE",
    "NO_SKIP_STEPS",
    "WARM",
    "FirstNExchange",
    "seconds",
]
