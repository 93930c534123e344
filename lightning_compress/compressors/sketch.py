"""Count sketch of a gradient, as sent by Sketched SGD: linear, so sketches add up with allreduce."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterator
from numbers import Integral
from typing import Any

import torch
from torch import Tensor

from lightning_compress.compressors.base import Compressor, Field, Payload, check_float_input
from lightning_compress.compressors.topk import _check_k, _check_ratio, resolve_k, topk_indices

__all__ = ["CountSketch"]

#: The Mersenne prime of the hash family. Coordinates must lie in ``[0, p)``, and with ``a < p`` and
#: ``i < p`` every ``a * i + b`` stays below ``2**62 + 2**31``: exact in int64 on every device.
_PRIME = 2**31 - 1
#: Largest tensor a sketch hashes: coordinate ``p`` would hash like coordinate 0.
_MAX_NUMEL = _PRIME
#: CPU hash tables kept per codec: each costs ``4 * rows`` bytes of host memory per coordinate.
_HASHES_CACHED = 4
#: Coordinates hashed at a time off the CPU: bounds the scratch to ``20 * _CHUNK`` bytes (160 MiB).
_CHUNK = 1 << 23


def _check_positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or int(value) < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _check_numel(numel: int) -> None:
    if numel > _MAX_NUMEL:
        raise ValueError(
            f"CountSketch hashes at most 2**31 - 1 = {_MAX_NUMEL} coordinates per tensor (the hash "
            f"works modulo the prime 2**31 - 1), got numel={numel}; sketch the tensor in smaller pieces"
        )


def _hash_rows(
    index: Tensor, constants: list[tuple[int, int]], cols: int, wide: Tensor, out: Tensor
) -> Iterator[Tensor]:
    """Each row's hashes of ``index`` in turn, all written into ``out``: one row is valid at a time."""
    for a, b in constants:
        yield _hash_into(index, a, b, cols, wide, out)


def _caches_hashes(device: torch.device) -> bool:
    """Whether hash tables are cached on ``device`` (CPU only: integer division is slow there)."""
    return device.type == "cpu"


def _row_constants(seed: int, numel: int, row: int) -> tuple[int, int]:
    """``(a, b)`` with ``a`` in ``[1, p)`` and ``b`` in ``[0, p)``, fixed by (seed, numel, row).

    BLAKE2b of the three numbers, so every rank, process and Python version derives the same
    constants (``random.Random`` promises a stable stream for ``random()`` only). Reducing 64
    random bits modulo ``p`` leaves a bias below ``2**-32``.
    """
    digest = hashlib.blake2b(f"{seed}:{numel}:{row}".encode(), digest_size=16).digest()
    a = 1 + int.from_bytes(digest[:8], "little") % (_PRIME - 1)
    b = int.from_bytes(digest[8:], "little") % _PRIME
    return a, b


def _hash_into(index: Tensor, a: int, b: int, cols: int, wide: Tensor, out: Tensor) -> Tensor:
    """``((a * i + b) mod p) mod (2 * cols)`` of every int64 coordinate ``i`` of ``index``, into ``out``.

    The Carter-Wegman family: for ``i != j`` below ``p`` and ``(a, b)`` uniform, ``g(i)`` and
    ``g(j)`` collide with probability at most ``1 / (2 * cols)``. That pairwise independence is what
    the count sketch's guarantees rest on (Charikar et al.). ``wide`` is int64 scratch and ``out``
    int32, both shaped like ``index``; integer arithmetic is exact, so every device gives the same
    values.
    """
    torch.mul(index, a, out=wide)
    wide.add_(b).remainder_(_PRIME).remainder_(2 * cols)
    # int32 halves the bytes that index_add_ and index_select read (and the CPU cache holds)
    return out.copy_(wide)


def _median_(rows: list[Tensor]) -> Tensor:
    """Elementwise median of equally shaped tensors (mean of the middle two for an even count).

    Overwrites the tensors in ``rows``. ``torch.median(dim=0)`` on a (5, 4M) CPU tensor takes
    about 30x longer than these elementwise ``minimum``/``maximum`` networks, which also write
    into existing buffers instead of allocating (fresh pages are a large part of the cost).
    """
    r = len(rows)
    if r == 1:
        return rows[0]
    spare = torch.empty_like(rows[0])
    if r == 5:
        # Median of 5 in 10 ops: drop the smaller of the two pair minima and the larger of the
        # two pair maxima (neither can be the median), then take the median of the three left.
        a, b, c, d, e = rows
        torch.minimum(a, b, out=spare)  # lo1
        torch.maximum(a, b, out=b)  # hi1
        torch.minimum(d, e, out=a)  # lo2
        torch.maximum(d, e, out=e)  # hi2
        torch.maximum(spare, a, out=d)  # larger of the minima
        torch.minimum(b, e, out=spare)  # smaller of the maxima
        torch.minimum(d, spare, out=a)
        torch.maximum(d, spare, out=b)
        torch.minimum(b, c, out=b)
        return torch.maximum(a, b, out=a)
    s = list(rows)
    # Odd-even transposition sort: r phases of compare-exchanges sort any r inputs.
    for phase in range(r):
        for i in range(phase % 2, r - 1, 2):
            torch.minimum(s[i], s[i + 1], out=spare)
            torch.maximum(s[i], s[i + 1], out=s[i + 1])
            s[i], spare = spare, s[i]
    if r % 2:
        return s[r // 2]
    return s[r // 2 - 1].add_(s[r // 2]).mul_(0.5)


class CountSketch(Compressor):
    """Count sketch (Charikar et al.) as used by Sketched SGD (Ivkin et al., arXiv 1903.04488).

    Row ``j`` of the ``rows x cols`` table adds ``s_j(i) * x_i`` into column ``h_j(i)``, with a
    bucket hash ``h_j(i)`` in ``[0, cols)`` and a sign hash ``s_j(i)`` in ``{-1, +1}``. The sketch is
    linear, so the sum of every rank's sketch, one allreduce, is the sketch of the summed gradient.
    ``s_j(i) * table[j, h_j(i)]`` estimates ``x_i``, and the median over rows is robust to the
    collisions of a few rows. Sketched SGD then takes the top ``candidates * k`` coordinates by
    estimated magnitude, fetches their exact summed values in a second round (an allreduce of
    ``candidates * k`` values) and applies the top ``k`` of those: :meth:`sketch`,
    :meth:`estimate`, :meth:`candidates` and :meth:`k_for` are the pieces that exchange uses.
    Used alone, :meth:`decompress` returns the top ``k`` estimates (one round, less accurate).

    Hashes are computed from the coordinate index, not drawn and stored. Row ``j`` folds bucket and
    sign into one value ``g_j(i) = ((a_j * i + b_j) mod p) mod (2 * cols)`` with ``p = 2**31 - 1``,
    Carter and Wegman's 2-universal family: ``h_j(i) = g_j(i) mod cols``, and ``s_j(i) = -1``
    exactly when ``g_j(i) >= cols``. Two distinct coordinates get the same ``g_j`` with
    probability at most ``1 / (2 * cols)`` over the constants; pairwise independence is all that
    the count sketch's error bounds need (Charikar et al.; Sketched SGD, arXiv 1903.04488, uses
    their sketch unchanged). The constants ``a_j`` in ``[1, p)`` and ``b_j`` in ``[0, p)`` come
    from a BLAKE2b digest of (``seed``, numel, row), and the arithmetic is exact int64
    (``a_j * i + b_j < 2**63``), so every rank, whatever its device, computes the same hashes.
    Tensors are limited to ``2**31 - 1`` elements.

    Memory: on CPU, where the integer division costs about 30 ms per row per 4M coordinates, the
    int32 tables of the last four (numel, cols) pairs are cached in host memory, ``4 * rows``
    bytes per coordinate each. On any other device nothing of the tensor's size is kept: every
    :meth:`sketch` and :meth:`estimate` recomputes the hashes, ``2**23`` coordinates at a time
    (a few passes at memory bandwidth), in 20 bytes of scratch per coordinate of a chunk, at
    most 160 MiB, freed on return.

    Args:
        rows: independent hash rows. More rows make the median more robust to collisions and
            cost ``cols`` floats each (and one more pass over the tensor to sketch and to
            estimate); 3-7 is typical, 5 by default.
        cols: columns per row: the table costs ``4 * rows * cols`` bytes. Estimation noise per
            coordinate falls as ``1 / sqrt(cols)`` (Charikar et al.). Default
            ``max(256, candidates * k)``: a table narrower than the ``candidates * k``
            coordinates it must rank cannot separate them, and with few heavy coordinates in a
            large tensor a narrow table lets many small coordinates collide with them in most
            rows. Measured here (rows=5, second round on the candidates): 10 planted heavy
            coordinates among 10**5 were all among the 40 candidates for cols >= 256 (35% at
            64, over 20 draws); on 10**6 Student-t (3 d.o.f.) coordinates with ``k = 1%``,
            cols = k, 2k, 4k, 8k kept 48, 62, 78, 92% of the true top-k's squared mass. Set it
            explicitly when a policy changes ``k`` every step: on CPU each new width builds new
            hash tables (about 7 ms per row per million coordinates, single-threaded, on a 2-core
            x86_64 machine).
        k: coordinates applied per step; overrides ``ratio`` when given. Mutable; setting it
            clears ``ratio``.
        ratio: fraction of coordinates applied, ``k = max(1, ceil(ratio * numel))`` (default 0.01).
        candidates: ``P``; the second round fetches ``P * k`` exact values. Larger ``P`` recovers
            more of the true top-k from a noisy sketch at ``P * k`` more values per step; 2-10.
        seed: hash seed; must be the same on every rank.

    """

    name = "sketch"
    exchange = "sketch"
    unbiased = False

    def __init__(
        self,
        rows: int = 5,
        cols: int | None = None,
        k: int | None = None,
        ratio: float | None = 0.01,
        candidates: int = 4,
        seed: int = 0,
    ) -> None:
        self._rows = _check_positive("rows", rows)
        self._cols = None if cols is None else _check_positive("cols", cols)
        if k is not None:
            self._k, self._ratio = _check_k(k), None
        else:
            self._k, self._ratio = None, _check_ratio(0.01 if ratio is None else ratio)
        self._candidates = _check_positive("candidates", candidates)
        if isinstance(seed, bool) or not isinstance(seed, Integral):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self._seed = int(seed)
        # CPU hash tables by (numel, cols); other devices compute their hashes on every call
        self._hashes: OrderedDict[tuple[int, int], list[Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # The CPU hash cache is large and rebuilt on demand from the seed: never pickle it (spawn,
        # checkpoints). The hashes depend on (seed, numel, row) only, so a clone hashes identically.
        state = self.__dict__.copy()
        del state["_hashes"], state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._hashes = OrderedDict()
        self._lock = threading.Lock()

    @property
    def rows(self) -> int:
        return self._rows

    @property
    def cols(self) -> int | None:
        """Columns per row as configured; ``None`` means ``max(256, candidates * k)`` per tensor."""
        return self._cols

    @property
    def k(self) -> int | None:
        """Coordinates applied per step, or ``None`` when ``ratio`` is in use. Setting it clears ``ratio``."""
        return self._k

    @k.setter
    def k(self, value: int) -> None:
        self._k = _check_k(value)
        self._ratio = None

    @property
    def ratio(self) -> float | None:
        """Fraction of coordinates applied, or ``None`` when ``k`` is in use. Setting it clears ``k``."""
        return self._ratio

    @ratio.setter
    def ratio(self, value: float) -> None:
        self._ratio = _check_ratio(value)
        self._k = None

    @property
    def num_candidates(self) -> int:
        """``P``: the second round fetches ``P * k`` coordinates."""
        return self._candidates

    @property
    def seed(self) -> int:
        return self._seed

    def k_for(self, numel: int) -> int:
        """``k`` for a tensor of ``numel`` elements under the current settings."""
        return resolve_k(numel, self._k, self._ratio)

    def cols_for(self, numel: int) -> int:
        """Columns of the table for a tensor of ``numel`` elements."""
        if self._cols is not None:
            return self._cols
        return max(256, self._candidates * self.k_for(numel))

    def meta(self) -> dict[str, Any]:
        return {
            "rows": self._rows,
            "cols": self._cols,
            "k": self._k,
            "ratio": self._ratio,
            "candidates": self._candidates,
            "seed": self._seed,
        }

    def payload_meta(self, numel: int) -> dict[str, Any]:
        """:meth:`meta` with ``cols`` and ``k`` resolved for ``numel`` elements, as in a payload."""
        return {**self.meta(), "cols": self.cols_for(numel), "k": self.k_for(numel)}

    def layout(self, numel: int) -> list[Field]:
        return [Field("table", torch.float32, self._rows * self.cols_for(numel))]

    def _constants(self, numel: int) -> list[tuple[int, int]]:
        """``(a_j, b_j)`` of every row for a tensor of ``numel`` elements."""
        return [_row_constants(self._seed, numel, row) for row in range(self._rows)]

    def _cpu_hashes(self, numel: int, cols: int) -> list[Tensor]:
        """Per row, the int32 table of ``g_j`` over ``[0, numel)`` on CPU, cached for the last few sizes."""
        key = (numel, cols)
        with self._lock:
            hashes = self._hashes.get(key)
            if hashes is None:
                index = torch.arange(numel, dtype=torch.int64)
                wide = torch.empty_like(index)
                hashes = [
                    _hash_into(index, a, b, cols, wide, torch.empty(numel, dtype=torch.int32))
                    for a, b in self._constants(numel)
                ]
                self._hashes[key] = hashes
                while len(self._hashes) > _HASHES_CACHED:
                    self._hashes.popitem(last=False)
            else:
                self._hashes.move_to_end(key)
            return hashes

    def _hash_chunks(
        self, numel: int, device: torch.device, cols: int
    ) -> Iterator[tuple[slice, Iterator[Tensor]]]:
        """Spans of coordinates, each with an iterator over the rows' int32 hashes ``g_j`` on that span.

        On CPU one span covers the tensor and the rows come from the cache. Elsewhere the spans
        are ``_CHUNK`` coordinates long and every row's hash is computed into the same buffer when
        it is drawn: use it before drawing the next row.
        """
        _check_numel(numel)
        if _caches_hashes(device):
            yield slice(0, numel), iter(self._cpu_hashes(numel, cols))
            return
        constants = self._constants(numel)
        size = min(numel, _CHUNK)
        wide = torch.empty(size, dtype=torch.int64, device=device)
        out = torch.empty(size, dtype=torch.int32, device=device)
        for start in range(0, numel, _CHUNK):
            stop = min(numel, start + _CHUNK)
            index = torch.arange(start, stop, dtype=torch.int64, device=device)
            n = stop - start
            yield slice(start, stop), _hash_rows(index, constants, cols, wide[:n], out[:n])

    def _row_hashes(self, numel: int, device: torch.device | str, cols: int) -> list[Tensor]:
        """Per row, the int32 hashes ``g_j`` of every coordinate, in ``[0, 2 * cols)`` (for tests and tools).

        On CPU these are the cached tables; elsewhere they are computed for this call only.
        """
        device = torch.device(device)
        if _caches_hashes(device):
            _check_numel(numel)
            return list(self._cpu_hashes(numel, cols))
        parts: list[list[Tensor]] = [[] for _ in range(self._rows)]
        for _, hashes in self._hash_chunks(numel, device, cols):
            for row, h in enumerate(hashes):
                parts[row].append(h.clone())
        return [torch.cat(p) if p else torch.empty(0, dtype=torch.int32, device=device) for p in parts]

    def sketch(self, x_flat: Tensor) -> Tensor:
        """The ``(rows, cols)`` float32 count sketch of a 1-D tensor; linear in ``x_flat``.

        Raises:
            ValueError: if ``x_flat`` is not 1-D or has ``2**31`` elements or more.

        """
        check_float_input(x_flat, "x_flat")
        if x_flat.dim() != 1:
            raise ValueError(f"x_flat must be 1-D, got shape {tuple(x_flat.shape)}")
        numel = x_flat.numel()
        _check_numel(numel)
        flat = x_flat.detach().to(torch.float32)
        cols = self.cols_for(numel)
        # Signs folded into the index: column h + cols collects the negated entries, and one
        # subtraction at the end replaces a per-row multiply of the whole tensor by its signs.
        table = torch.zeros(self._rows, 2 * cols, dtype=torch.float32, device=flat.device)
        for span, hashes in self._hash_chunks(numel, flat.device, cols):
            values = flat[span]
            for row, h in enumerate(hashes):
                table[row].index_add_(0, h, values)
        return table[:, :cols] - table[:, cols:]

    def estimate(self, table: Tensor, numel: int) -> Tensor:
        """Estimates of all ``numel`` coordinates: the median over rows of ``s_j(i) * table[j, h_j(i)]``.

        Args:
            table: a sketch (or a sum of sketches) as returned by :meth:`sketch`, shape
                ``(rows, cols)``, or flat as in a payload.
            numel: size of the sketched tensor (it selects the hashes); below ``2**31``.

        Returns:
            1-D float32 tensor of ``numel`` estimates on ``table``'s device.

        """
        _check_numel(numel)
        table = table.reshape(self._rows, -1).to(torch.float32)
        cols = table.shape[1]
        # column g of [table, -table] is s(i) * table[h(i)] for g = h(i) + cols * [s(i) = -1]
        signed = torch.cat([table, -table], dim=1)
        out: Tensor | None = None
        for span, hashes in self._hash_chunks(numel, table.device, cols):
            median = _median_([signed[row].index_select(0, h) for row, h in enumerate(hashes)])
            if span.stop - span.start == numel:
                return median
            if out is None:
                out = torch.empty(numel, dtype=torch.float32, device=table.device)
            out[span] = median
        return out if out is not None else torch.empty(0, dtype=torch.float32, device=table.device)

    def candidates(self, table: Tensor, numel: int) -> Tensor:
        """Sorted int64 indices of the top ``candidates * k`` coordinates (capped at numel) by |estimate|."""
        count = min(numel, self._candidates * self.k_for(numel))
        return topk_indices(self.estimate(table, numel), count)

    def compress(self, x: Tensor, generator: torch.Generator | None = None) -> Payload:
        """Sketch ``x``; the hashes are fixed by ``seed``, so ``generator`` is ignored."""
        check_float_input(x)
        table = self.sketch(x.detach().reshape(-1))
        return Payload({"table": table.reshape(-1)}, x.shape, x.dtype, self.payload_meta(x.numel()))

    def decompress(self, payload: Payload) -> Tensor:
        """Dense tensor: the top ``k`` coordinates by |estimate| hold their estimates, zeros elsewhere.

        Estimates are clamped to the finite range of the original dtype (see the comment below).
        """
        numel = payload.numel
        table = payload.data["table"].view(payload.meta["rows"], payload.meta["cols"])
        estimates = self.estimate(table, numel)
        keep = topk_indices(estimates, payload.meta["k"])
        out = torch.zeros(numel, dtype=torch.float32, device=table.device)
        # A table cell sums every coordinate hashed to it, so an estimate can exceed the range of
        # the input's dtype (float16: 65504) although every coordinate lies within it; clamping
        # to that range moves such an estimate towards its true value, and the cast cannot
        # produce Inf. NaN stays NaN.
        limit = min(torch.finfo(payload.dtype).max, torch.finfo(torch.float32).max)
        out[keep] = estimates[keep].clamp(-limit, limit)
        return out.view(payload.shape).to(payload.dtype)
