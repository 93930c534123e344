"""Count sketch of a gradient, as sent by Sketched SGD: linear, so sketches add up with allreduce."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from numbers import Integral
from typing import Any

import torch
from torch import Tensor

from lightning_compress.compressors.base import Compressor, Field, Payload, check_float_input
from lightning_compress.compressors.topk import _check_k, _check_ratio, resolve_k, topk_indices

__all__ = ["CountSketch"]

#: Hash tables kept per codec: each costs ``4 * rows`` bytes per coordinate.
_HASHES_CACHED = 4


def _check_positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or int(value) < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _row_seed(seed: int, numel: int, row: int) -> int:
    """A 63-bit generator seed from (seed, numel, row), identical on every machine and process."""
    digest = hashlib.blake2b(f"{seed}:{numel}:{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


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

    Hashes come from ``torch.Generator`` streams seeded with (``seed``, numel, row), generated
    on CPU and then moved, so every rank, whatever its device, holds the same hashes. They are
    cached per (numel, device, cols), ``4 * rows`` bytes per coordinate, for the last few sizes.

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
            64); on 10**6 Student-t (3 d.o.f.) coordinates with ``k = 1%``, cols = k, 2k, 4k,
            8k kept 46, 60, 76, 91% of the true top-k's squared mass. Set it explicitly when a
            policy changes ``k`` every step: each new width draws new hashes (about 3 ms per row
            per million coordinates on the CPU of docs/codecs.md).
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
        self._hashes: OrderedDict[tuple[int, torch.device, int], list[Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # The hash cache is large and rebuilt on demand: never pickle it (spawn, checkpoints).
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

    def _row_hashes(self, numel: int, device: torch.device, cols: int) -> list[Tensor]:
        """Per row, ``h_j(i) + cols * [s_j(i) = -1]``: bucket and sign in one int32 in [0, 2*cols)."""
        key = (numel, torch.device(device), cols)
        with self._lock:
            hashes = self._hashes.get(key)
            if hashes is None:
                hashes = []
                for row in range(self._rows):
                    generator = torch.Generator().manual_seed(_row_seed(self._seed, numel, row))
                    h = torch.randint(0, 2 * cols, (numel,), dtype=torch.int32, generator=generator)
                    hashes.append(h.to(device))
                self._hashes[key] = hashes
                while len(self._hashes) > _HASHES_CACHED:
                    self._hashes.popitem(last=False)
            else:
                self._hashes.move_to_end(key)
            return hashes

    def sketch(self, x_flat: Tensor) -> Tensor:
        """The ``(rows, cols)`` float32 count sketch of a 1-D tensor; linear in ``x_flat``."""
        check_float_input(x_flat, "x_flat")
        if x_flat.dim() != 1:
            raise ValueError(f"x_flat must be 1-D, got shape {tuple(x_flat.shape)}")
        flat = x_flat.detach().to(torch.float32)
        numel = flat.numel()
        cols = self.cols_for(numel)
        # Signs folded into the index: column h + cols collects the negated entries, and one
        # subtraction at the end replaces a per-row multiply of the whole tensor by its signs.
        table = torch.zeros(self._rows, 2 * cols, dtype=torch.float32, device=flat.device)
        for row, h in enumerate(self._row_hashes(numel, flat.device, cols)):
            table[row].index_add_(0, h, flat)
        return table[:, :cols] - table[:, cols:]

    def estimate(self, table: Tensor, numel: int) -> Tensor:
        """Estimates of all ``numel`` coordinates: the median over rows of ``s_j(i) * table[j, h_j(i)]``.

        Args:
            table: a sketch (or a sum of sketches) as returned by :meth:`sketch`, shape
                ``(rows, cols)``, or flat as in a payload.
            numel: size of the sketched tensor (it selects the hashes).

        Returns:
            1-D float32 tensor of ``numel`` estimates on ``table``'s device.

        """
        table = table.reshape(self._rows, -1).to(torch.float32)
        cols = table.shape[1]
        hashes = self._row_hashes(numel, table.device, cols)
        signed = torch.cat([table, -table], dim=1)
        return _median_([signed[row].index_select(0, h) for row, h in enumerate(hashes)])

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
