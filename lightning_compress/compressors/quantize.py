"""QSGD: stochastic uniform quantization to ``B``-bit codes, one float32 scale per bucket."""

from __future__ import annotations

import math
from numbers import Integral
from typing import Any

import torch
from torch import Tensor

from lightning_compress.compressors.base import Compressor, Field, Payload, check_float_input
from lightning_compress.compressors.pack import pack_bits, packed_nbytes, unpack_bits

__all__ = ["QSGD"]

_NORMS = ("max", "l2")

#: Smallest scale the encoder divides by. ``levels / 2**-120 < 2**127`` stays finite in float32 for
#: every bit width, so buckets of tiny or denormal values never produce inf or NaN; a bucket whose
#: scale is below it is quantized against this floor instead (still unbiased, only coarser).
_SCALE_FLOOR = 2.0**-120
_FLOAT32_MAX = torch.finfo(torch.float32).max
#: Per level count ``s``, the largest float32 step ``scale / s`` whose multiples up to ``s`` stay
#: finite: ``fl(MAX / s) * s`` rounds to inf for s = 31 and 127 (see :func:`_max_step`).
_MAX_STEPS: dict[int, float] = {}

#: Random numbers come 15 bits at a time: ``Tensor.random_()`` on int64 fills [0, 2**63) (one
#: generator call per 64 bits, the cheapest way torch offers), and masking each 16-bit quarter to 15
#: bits keeps the quarters independent and uniform. The rounding offset ``(r + 0.5) / 2**15`` is
#: then uniform on a grid of 2**15 points in (0, 1), so rounding up happens with probability within
#: 2**-15 of the exact one: any bias is below 2**-15 of one quantization step.
_RANDOM_BITS = 15
_RANDOM_MASK = 0x7FFF7FFF7FFF7FFF


def _check_bits(bits: Any) -> int:
    if isinstance(bits, bool) or not isinstance(bits, Integral) or not 1 <= int(bits) <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")
    return int(bits)


def _levels(bits: int) -> int:
    """``s``, the number of positive quantization levels; 1 for the 1-bit scaled sign."""
    return max(1, 2 ** (bits - 1) - 1)


def _offset(bits: int) -> float:
    """The code of the value 0: ``s`` for ``B >= 2``; 0.5 for ``B = 1`` (codes 0 and 1 are -M, +M)."""
    return 0.5 if bits == 1 else float(_levels(bits))


def _buckets(t: Tensor, bucket_size: int) -> list[tuple[Tensor, slice]]:
    """Views of a flat tensor as (buckets, bucket_size) rows, plus the shorter last bucket if any."""
    n = t.numel()
    full = n // bucket_size
    parts = []
    if full:
        parts.append((t[: full * bucket_size].view(full, bucket_size), slice(0, full)))
    if n % bucket_size:
        parts.append((t[full * bucket_size :].view(1, n - full * bucket_size), slice(full, full + 1)))
    return parts


class QSGD(Compressor):
    """Stochastic uniform quantization of the QSGD family (Alistarh et al., arXiv 1610.02132).

    The flattened tensor is cut into buckets of ``bucket_size`` elements (the last one may be
    shorter). Each bucket sends one float32 scale and one ``B``-bit code per element, so a tensor
    of ``n`` elements costs ``4 * ceil(n / bucket_size) + ceil(n / 8) * B`` bytes.

    For ``B >= 2`` there are ``s = 2**(B-1) - 1`` levels per sign. With ``l = floor(s|v_i| / scale)``
    the level is ``l + 1`` with probability ``s|v_i| / scale - l``, else ``l`` (arXiv 1610.02132,
    Sec. 3.1), so ``E[Q(v)] = v``. The code is ``sign * level + s`` in ``[0, 2s]``; it decodes to
    ``(code - s) / s * scale``. For ``B = 1`` the code is an unbiased scaled sign: with the bucket's
    max-abs ``M``, code 1 (``+M``) with probability ``(1 + v_i / M) / 2``, else code 0 (``-M``).

    Args:
        bits: bits per coordinate ``B``, 1..8. Trades bytes for variance: the variance bound
            ``min(n/s**2, sqrt(n)/s) * ||v||**2`` falls 2-4x per extra bit. Measured on Gaussian
            buckets of 64 with max-abs scales, ``E||Q(v)-v||**2 / ||v||**2`` is 1.1 at 2 bits,
            0.14 at 3, 0.02 at 4 and 8e-5 at 8: 4 bits (about 8x fewer bytes than float32) is
            the usual starting point, 8 bits is close to lossless. Mutable: a policy (e.g.
            DQ-SGD, arXiv 2107.14575) may change it every step.
        bucket_size: elements per scale. Smaller buckets track local magnitudes (less variance)
            at 32 bits of overhead each; 512-4096 is typical, and at 512 the scales add
            ``32/512 = 0.0625`` bits per coordinate.
        norm: the bucket scale. ``"max"`` (default) is the bucket's max-abs: it satisfies the same
            variance bound as the L2 norm (``max|v_i| <= ||v||_2``) and in practice has far lower
            variance, since no coordinate is rounded against a scale larger than the largest one
            (in the measurement above, 10x lower at 4 bits, 5x at 2 bits).
            ``"l2"`` is the bucket's L2 norm, exactly the paper's definition. 1-bit codes always
            use max-abs.

    The random rounding draws 15-bit uniform numbers, so the estimate is unbiased up to 2**-15 of
    one quantization step. Buckets of zeros decode to exact zeros; tiny and denormal values are
    quantized against a scale of at least ``2**-120`` so the arithmetic never overflows. Scales
    never exceed the largest finite value of the input's dtype (65504 for float16): an L2 norm of
    large float16 values would otherwise decode to Inf. Any scale ``>= max|v_i|`` is unbiased, and
    a finite input's max-abs is within that range, so the cap costs no bias.

    """

    name = "qsgd"
    exchange = "two_phase"
    unbiased = True

    def __init__(self, bits: int = 8, bucket_size: int = 512, norm: str = "max") -> None:
        self.bits = bits
        self.bucket_size = bucket_size
        self.norm = norm

    @property
    def bits(self) -> int:
        """Bits per coordinate, 1..8 (settable; validated on set)."""
        return self._bits

    @bits.setter
    def bits(self, value: int) -> None:
        self._bits = _check_bits(value)

    @property
    def bucket_size(self) -> int:
        """Elements per scale, >= 1."""
        return self._bucket_size

    @bucket_size.setter
    def bucket_size(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, Integral) or int(value) < 1:
            raise ValueError(f"bucket_size must be an integer >= 1, got {value!r}")
        self._bucket_size = int(value)

    @property
    def norm(self) -> str:
        """Bucket scale: ``"max"`` (max-abs) or ``"l2"``."""
        return self._norm

    @norm.setter
    def norm(self, value: str) -> None:
        if value not in _NORMS:
            raise ValueError(f"norm must be one of {_NORMS}, got {value!r}")
        self._norm = value

    @property
    def levels(self) -> int:
        """``s = 2**(bits-1) - 1`` positive levels (1 for 1-bit codes)."""
        return _levels(self._bits)

    def alignment(self) -> int:
        """Whole buckets (one scale each) of whole bytes of codes: ``lcm(bucket_size, 8)``."""
        return math.lcm(self._bucket_size, 8)

    def meta(self) -> dict[str, Any]:
        return {"bits": self._bits, "bucket_size": self._bucket_size, "norm": self._norm}

    def layout(self, numel: int) -> list[Field]:
        return [
            Field("scales", torch.float32, -(-numel // self._bucket_size)),
            Field("codes", torch.uint8, packed_nbytes(numel, self._bits)),
        ]

    def compress(self, x: Tensor, generator: torch.Generator | None = None) -> Payload:
        """Quantize ``x``; ``generator`` (on ``x``'s device) makes the random rounding reproducible."""
        check_float_input(x)
        flat = x.detach().reshape(-1).to(torch.float32)
        # decoded values reach the scale; it must fit the dtype they are decoded to
        cap = min(torch.finfo(x.dtype).max, _FLOAT32_MAX)
        scales, codes = _encode(flat, self._bits, self._bucket_size, self._norm, generator, cap)
        return Payload({"scales": scales, "codes": codes}, x.shape, x.dtype, self.meta())

    def decompress(self, payload: Payload) -> Tensor:
        """Decode with the settings stored in ``payload.meta`` (not the codec's current ones)."""
        meta = payload.meta
        flat = _decode(
            payload.data["scales"], payload.data["codes"], payload.numel, meta["bits"], meta["bucket_size"]
        )
        return flat.view(payload.shape).to(payload.dtype)


def _bucket_scales(
    flat: Tensor, bits: int, bucket_size: int, norm: str, scratch: Tensor, cap: float = _FLOAT32_MAX
) -> Tensor:
    """Per-bucket max-abs, or L2 norm computed without overflow or underflow (``scratch`` is reused).

    The L2 norm is capped at ``cap`` (the largest finite value of the input's dtype), which is
    still >= the max-abs of a finite input.
    """
    num_buckets = -(-flat.numel() // bucket_size)
    absmax = torch.empty(num_buckets, dtype=torch.float32, device=flat.device)
    for rows, sl in _buckets(flat, bucket_size):
        # max(amax, -amin) reads the data twice but writes nothing: faster than amax(abs(v)).
        torch.amax(rows, dim=1, out=absmax[sl])
        absmax[sl] = torch.maximum(absmax[sl], torch.amin(rows, dim=1).neg_())
    if norm == "max" or bits == 1:
        return absmax
    # ||v|| = M * ||v / M||: squares of values near 1e20 overflow float32 and squares below 1e-19
    # underflow, so the sum of squares is taken on v / M, which lies in [-1, 1].
    safe = absmax.clamp(min=_SCALE_FLOOR)
    l2 = torch.empty_like(absmax)
    for rows, sl in _buckets(flat, bucket_size):
        scaled = torch.mul(
            rows, safe[sl].reciprocal().unsqueeze(1), out=scratch[: rows.numel()].view_as(rows)
        )
        torch.linalg.vector_norm(scaled, dim=1, out=l2[sl])
    # The L2 scale never falls below max-abs (rounding could make it a hair smaller) and is capped
    # at the input dtype's largest value, which is still >= max-abs, so every |v_i| / scale stays in
    # [0, 1] and every decoded value fits that dtype (||v|| of 512 float16 values near 60000 is 1.4e6).
    return torch.maximum(l2.mul_(safe), absmax).clamp_(max=cap)


def _encode(
    flat: Tensor,
    bits: int,
    bucket_size: int,
    norm: str,
    generator: torch.Generator | None,
    cap: float = _FLOAT32_MAX,
) -> tuple[Tensor, Tensor]:
    n = flat.numel()
    device = flat.device
    levels = _levels(bits)
    # 1. Bucket scales. ``work`` is scratch for the L2 norm, then holds the noise, then the codes.
    work = torch.empty(n, dtype=torch.float32, device=device)
    scale = _bucket_scales(flat, bits, bucket_size, norm, work, cap)
    safe = scale.clamp(min=_SCALE_FLOOR)
    # 1-bit: P(code 1) = (1 + v/M) / 2 = v / (2M) + 1/2; otherwise s|v| / scale (Sec. 3.1).
    mult = (0.5 if bits == 1 else float(levels)) / safe
    # A zero bucket keeps scale 0, so it decodes to exact zeros whatever its codes are. A bucket
    # holding NaN/Inf gets a NaN/Inf scale and decodes to NaN (``scale > 0`` would have zeroed it,
    # silently dropping the NaN that stock DDP spreads under nonfinite="ignore").
    scales = torch.where(scale == 0, torch.zeros((), device=device), safe)

    # 2. Uniform noise U = (r + 0.5) / 2**15 in (0, 1); code = floor(v * mult + offset + U) rounds
    #    up with probability frac(v * mult): the stochastic rounding of QSGD, sign handled for free
    #    because floor(-a + U) has the same law as -(floor(a + U)).
    words = torch.empty(-(-n // 4), dtype=torch.int64, device=device).random_(generator=generator)
    words.bitwise_and_(_RANDOM_MASK)
    work.copy_(words.view(torch.int16)[:n])
    step = 2.0**-_RANDOM_BITS
    # offset + (r + 0.5) * step in one pass (torch.full fills on the device: no host copy).
    base = torch.full((), _offset(bits) + 0.5 * step, dtype=torch.float32, device=device)
    torch.add(base, work, alpha=step, out=work)
    for (rows, sl), (values, _) in zip(_buckets(work, bucket_size), _buckets(flat, bucket_size), strict=True):
        rows.addcmul_(values, mult[sl].unsqueeze(1))

    # 3. Truncation is the floor here: the values are >= 0 up to float rounding, and one in (-1, 0)
    #    truncates to code 0, the right one. Float -> int8 is the fast cast; 8-bit codes reach 255
    #    and go through int16. Rounding can also push a value up to 2s + 1: clamp.
    padded = torch.zeros(n + (-n % 8), dtype=torch.uint8, device=device)
    if bits <= 7:
        padded[:n].view(torch.int8).copy_(work)
    else:
        padded[:n].copy_(work.to(torch.int16))
    padded.clamp_(max=1 if bits == 1 else 2 * levels)
    return scales, pack_bits(padded, bits)


def _max_step(levels: int) -> float:
    """Largest float32 ``t`` with ``fl(t * levels)`` finite (cached per level count)."""
    step = _MAX_STEPS.get(levels)
    if step is None:
        t = torch.tensor(_FLOAT32_MAX / levels, dtype=torch.float32)
        while not torch.isfinite(t * levels):
            t = torch.nextafter(t, torch.zeros(()))
        step = _MAX_STEPS[levels] = float(t)
    return step


def _decode(scales: Tensor, packed: Tensor, n: int, bits: int, bucket_size: int) -> Tensor:
    codes = unpack_bits(packed.reshape(-1), bits, n)
    out = torch.empty(n, dtype=torch.float32, device=packed.device)
    # Codes of B <= 7 bits are < 128, and int8 -> float is the faster cast.
    out.copy_(codes.view(torch.int8) if bits <= 7 else codes)
    # Codes to signed levels first, then the scale: code * scale could overflow near float32's max.
    if bits == 1:
        out.mul_(2.0).sub_(1.0)
        step = scales
    else:
        levels = _levels(bits)
        out.sub_(float(levels))
        # fl(scale / s) * s can round past the largest float32 (s = 31, 127): cap the step, a
        # one-ulp change that only a scale within an ulp of float32's maximum ever sees, and a finite
        # one (an Inf scale, from an Inf gradient under nonfinite="ignore", stays Inf: it decodes to NaN)
        step = scales / float(levels)
        step = torch.where(torch.isinf(step), step, step.clamp(max=_max_step(levels)))
    for rows, sl in _buckets(out, bucket_size):
        rows.mul_(step[sl].unsqueeze(1))
    return out
