"""Bit packing of ``B``-bit codes (``B`` in 1..8) into ``uint8``, with no Python loop over elements.

Wire format: the packed bytes are the little-endian bit stream of the codes. Code ``i`` occupies
bits ``[i*B, (i+1)*B)`` of the stream, and stream bit ``j`` is bit ``j % 8`` of byte ``j // 8``.
Codes are taken 8 at a time (the tail is padded with zero codes) and a group of 8 codes fills
exactly ``B`` bytes, so ``count`` codes take ``ceil(count / 8) * B`` bytes for every ``B``.
Consequence the exchange layer can rely on: codes ``[8a, 8b)`` are bytes ``[a*B, b*B)``, so a
slice of a packed buffer on a group boundary is the packed form of the same slice of codes.

How: with one code per byte, a pair of neighbouring codes is one ``int16`` lane ``lo + hi * 2**8``;
``lane - (lane >> 8) * (2**8 - 2**B)`` turns it into ``lo + hi * 2**B``, both fields side by side.
The same merge on ``int32`` then ``int64`` lanes (bytes are little-endian on every platform torch
supports) leaves each group of 8 codes as the low ``8*B`` bits of one ``int64``, from which the first
``B`` bytes are kept. For ``B`` in 1, 2, 4 the merge stops as soon as a lane holds one full byte
and a narrowing cast keeps it. Each merge is two whole-tensor integer ops; unpacking runs the
merges backwards. (Masked shift-and-or rounds need twice the ops; strided byte copies of whole
rows are slow on CPU, hence the column-by-column copies below.)
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pack_bits", "packed_nbytes", "unpack_bits"]

_LANES = (torch.int16, torch.int32, torch.int64)


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits take once packed: ``ceil(count / 8) * bits``."""
    _check_bits(bits)
    return -(-count // 8) * bits


def _merges(bits: int) -> list[tuple[torch.dtype, int, int]]:
    """(lane dtype, half-lane bits, field bits) of each merge, until a lane is one byte or 8 codes."""
    merges = []
    width, half = bits, 8
    for lane in _LANES:
        merges.append((lane, half, width))
        width, half = 2 * width, 2 * half
        if width == 8:
            break
    return merges


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack ``B``-bit codes into bytes (see the module docstring for the wire format).

    Args:
        codes: ``uint8`` tensor of any shape (flattened in row-major order), every value below
            ``2**bits``. Larger values are not checked (that would cost a pass and, on an
            accelerator, a host sync); they corrupt their neighbours.
        bits: code width ``B``, 1..8.

    Returns:
        1-D ``uint8`` tensor of ``ceil(codes.numel() / 8) * bits`` bytes on ``codes.device``. With
        ``bits=8`` and a length that is a multiple of 8 it is a view of ``codes``, not a copy.

    """
    _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be a uint8 tensor, got {codes.dtype}")
    flat = codes.reshape(-1)
    count = flat.numel()
    pad = -count % 8
    if pad or flat.storage_offset() % 8:
        padded = torch.zeros(count + pad, dtype=torch.uint8, device=flat.device)
        padded[:count] = flat
        flat = padded
    if bits == 8:
        return flat
    words = flat
    for lane, half, width in _merges(bits):
        # Codes are < 2**bits <= 2**7, so no lane ever has its sign bit set: >> is a logical shift.
        words = words.view(lane)
        words = torch.sub(words, words >> half, alpha=(1 << half) - (1 << width))
    if bits in (1, 2, 4):
        return words.to(torch.uint8)
    lanes = words.view(torch.uint8).view(-1, 8)
    out = torch.empty(lanes.shape[0], bits, dtype=torch.uint8, device=flat.device)
    for j in range(bits):
        out[:, j] = lanes[:, j]
    return out.view(-1)


def unpack_bits(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` codes of a packed buffer.

    Args:
        packed: 1-D ``uint8`` tensor of exactly ``ceil(count / 8) * bits`` bytes.
        bits: code width ``B``, 1..8.
        count: number of codes to return.

    Returns:
        1-D ``uint8`` tensor of ``count`` codes, each below ``2**bits``, on ``packed.device``. With
        ``bits=8`` it is a view of ``packed``.

    """
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a uint8 tensor, got {packed.dtype}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be a non-negative integer, got {count!r}")
    groups = -(-count // 8)
    if packed.numel() != groups * bits:
        raise ValueError(
            f"packed holds {packed.numel()} bytes but {count} codes of {bits} bits need {groups * bits}"
        )
    packed = packed.reshape(-1)
    if bits == 8:
        return packed[:count]
    merges = _merges(bits)
    if bits in (1, 2, 4):
        words = packed.to(merges[-1][0])
    else:
        spread = torch.zeros(groups, 8, dtype=torch.uint8, device=packed.device)
        rows = packed.view(groups, bits)
        for j in range(bits):
            spread[:, j] = rows[:, j]
        words = spread.view(torch.int64).view(-1)
    for k in range(len(merges) - 1, -1, -1):
        _, half, width = merges[k]
        words = torch.add(words, words >> width, alpha=(1 << half) - (1 << width))
        words = words.view(_LANES[k - 1] if k else torch.uint8)
    return words[:count]
