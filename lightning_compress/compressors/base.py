"""The codec interface: a tensor becomes a :class:`Payload` of packed wire tensors and back.

Codecs are pure tensor code. They never touch ``torch.distributed``: how a payload crosses the
network is decided by :mod:`lightning_compress.comm` from the codec's :attr:`Compressor.exchange`.

Every payload has a *layout* that both ends can compute from the number of elements alone (and
the codec's current settings, which every rank holds identically). That is what lets the
collectives move payloads as one flat ``uint8`` buffer of known size: ``Payload.to_bytes`` on the
sender, ``Compressor.from_bytes`` on the receiver.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class Field:
    """One packed tensor of a payload: its name, wire dtype and element count."""

    name: str
    dtype: torch.dtype
    count: int

    @property
    def nbytes(self) -> int:
        return self.count * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def wire_order(fields: list[Field]) -> list[Field]:
    """Order fields by decreasing item size so that every field starts aligned in a byte buffer.

    A field of item size ``s`` then starts at an offset that is a multiple of ``s`` (all the
    fields before it have item sizes that are multiples of ``s``), so the receiver can view the
    bytes as that dtype without copying.
    """
    return sorted(fields, key=lambda f: -_itemsize(f.dtype))


@dataclass
class Payload:
    """What one rank sends for one tensor: packed wire tensors plus what is needed to decode them.

    Attributes:
        data: the wire tensors, 1-D, by field name. Only these cross the network.
        shape: shape of the original tensor.
        dtype: dtype of the original tensor (restored by ``decompress``).
        meta: codec settings the receiver needs and already knows (never sent), e.g. the bit width.

    """

    data: dict[str, Tensor]
    shape: torch.Size
    dtype: torch.dtype
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes this payload occupies on the wire."""
        return sum(t.numel() * t.element_size() for t in self.data.values())

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    @property
    def device(self) -> torch.device:
        return next(iter(self.data.values())).device

    def fields(self) -> list[Field]:
        return [Field(k, v.dtype, v.numel()) for k, v in self.data.items()]

    def to_bytes(self) -> Tensor:
        """Concatenate the wire tensors into one flat ``uint8`` tensor, in wire order."""
        parts = [self.data[f.name].contiguous().view(torch.uint8) for f in wire_order(self.fields())]
        if not parts:
            return torch.empty(0, dtype=torch.uint8)
        return torch.cat(parts) if len(parts) > 1 else parts[0].reshape(-1)

    @staticmethod
    def from_bytes(
        buf: Tensor, fields: list[Field], shape: torch.Size, dtype: torch.dtype, meta: dict[str, Any]
    ) -> Payload:
        """Inverse of :meth:`to_bytes`, given the layout (which the receiver computes itself)."""
        if buf.dtype != torch.uint8 or buf.dim() != 1:
            raise ValueError(
                f"payload buffer must be a 1-D uint8 tensor, got {buf.dtype} of shape {tuple(buf.shape)}"
            )
        expected = sum(f.nbytes for f in fields)
        if buf.numel() != expected:
            raise ValueError(f"payload buffer holds {buf.numel()} bytes but the layout needs {expected}")
        data: dict[str, Tensor] = {}
        offset = 0
        for f in wire_order(fields):
            chunk = buf[offset : offset + f.nbytes]
            data[f.name] = (
                chunk.view(f.dtype)
                if chunk.storage_offset() % _itemsize(f.dtype) == 0
                else (chunk.clone().view(f.dtype))
            )
            offset += f.nbytes
        # Keep the codec's own field order (dict order) for readability.
        ordered = {f.name: data[f.name] for f in fields}
        return Payload(ordered, torch.Size(shape), dtype, dict(meta))


class Compressor(ABC):
    """A codec: ``compress(x) -> Payload`` and ``decompress(payload) -> Tensor``.

    Subclasses set :attr:`name` (the string alias) and :attr:`exchange` (how
    :mod:`lightning_compress.comm` moves their payloads between ranks):

    - ``"allreduce"``: the payload is a dense tensor; summed with one allreduce.
    - ``"two_phase"``: fixed-size payloads of a shard-able codec (quantizers), exchanged in
      pipelined chunks by :mod:`lightning_compress.comm.engine`: an all-gather of every rank's
      payload for 2 ranks; from 3 on, all-to-all of compressed shards, decode-and-sum,
      re-compress, all-gather.
    - ``"allgather"``: every rank's payload is gathered and each rank sums the decoded tensors
      (sparse codecs).
    - ``"sketch"``: linear sketches, summed with allreduce, followed by a second round for the
      exact values of the recovered coordinates.
    """

    name: ClassVar[str] = ""
    exchange: ClassVar[str] = "allgather"
    #: whether ``decompress(compress(x))`` is an unbiased estimate of ``x``.
    unbiased: ClassVar[bool] = False

    @abstractmethod
    def compress(self, x: Tensor, generator: torch.Generator | None = None) -> Payload:
        """Encode ``x`` (a float tensor of any shape, on any device)."""

    @abstractmethod
    def decompress(self, payload: Payload) -> Tensor:
        """Decode a payload to a tensor of the original shape, dtype and device."""

    @abstractmethod
    def layout(self, numel: int) -> list[Field]:
        """The wire fields of a payload for a tensor of ``numel`` elements (current settings)."""

    def payload_nbytes(self, numel: int) -> int:
        """Exact bytes on the wire for a tensor of ``numel`` elements."""
        return sum(f.nbytes for f in self.layout(numel))

    def from_bytes(self, buf: Tensor, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> Payload:
        """Rebuild a payload received as flat bytes (see :meth:`Payload.to_bytes`)."""
        shape = torch.Size(shape)
        numel = shape.numel()
        return Payload.from_bytes(buf, self.layout(numel), shape, dtype, self.payload_meta(numel))

    def alignment(self) -> int:
        """Elements a chunk of a chunked exchange should be a multiple of (current settings).

        Cutting a vector at multiples of it changes neither the payload bytes in total nor the
        codec's statistics (e.g. QSGD's buckets and bit packing stay whole). 1: any cut.
        """
        return 1

    def meta(self) -> dict[str, Any]:
        """Settings the receiver needs to decode (known on every rank, never sent)."""
        return {}

    def payload_meta(self, numel: int) -> dict[str, Any]:
        """:meth:`meta` with the settings that depend on the size resolved (e.g. ``k`` from a ratio)."""
        return self.meta()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.meta().items())
        return f"{type(self).__name__}({args})"


def check_float_input(x: Tensor, param: str = "x") -> None:
    """Raise ``TypeError`` unless ``x`` is a floating-point tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{param} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{param} must be a floating-point tensor (float32, float16, bfloat16, float64), got {x.dtype}"
        )


def index_dtype(numel: int) -> torch.dtype:
    """Narrowest signed integer dtype that holds every index of a tensor of ``numel`` elements."""
    if numel <= 2**15:
        return torch.int16
    if numel <= 2**31:
        return torch.int32
    return torch.int64


class NoCompression(Compressor):
    """The baseline: the tensor travels as dense float32, summed with one allreduce."""

    name = "none"
    exchange = "allreduce"
    unbiased = True

    def compress(self, x: Tensor, generator: torch.Generator | None = None) -> Payload:
        check_float_input(x)
        return Payload({"values": x.detach().reshape(-1).to(torch.float32)}, x.shape, x.dtype, self.meta())

    def decompress(self, payload: Payload) -> Tensor:
        return payload.data["values"].reshape(payload.shape).to(payload.dtype)

    def layout(self, numel: int) -> list[Field]:
        return [Field("values", torch.float32, numel)]

    def payload_nbytes(self, numel: int) -> int:
        return 4 * numel
