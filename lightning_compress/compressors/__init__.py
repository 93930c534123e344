"""Gradient codecs: tensors to packed payloads and back. No ``torch.distributed`` in here."""

from __future__ import annotations

from lightning_compress.compressors.base import Compressor, Field, NoCompression, Payload
from lightning_compress.compressors.quantize import QSGD
from lightning_compress.compressors.sketch import CountSketch
from lightning_compress.compressors.topk import TopK

ALIASES: dict[str, type[Compressor]] = {
    "qsgd": QSGD,
    "topk": TopK,
    "sketch": CountSketch,
    "none": NoCompression,
}


def resolve_compressor(compressor: str | Compressor, param: str = "compressor") -> Compressor:
    """Turn a string alias (``"qsgd"``, ``"topk"``, ``"sketch"``, ``"none"``) into a codec instance.

    Raises:
        ValueError: for an unknown alias, naming the allowed ones.
        TypeError: for anything that is neither a string nor a :class:`Compressor`.

    """
    if isinstance(compressor, Compressor):
        return compressor
    if isinstance(compressor, str):
        key = compressor.strip().lower()
        if key not in ALIASES:
            raise ValueError(
                f"{param}={compressor!r} is not a known compressor; use one of {sorted(ALIASES)}"
            )
        return ALIASES[key]()
    raise TypeError(
        f"{param} must be a Compressor instance or one of {sorted(ALIASES)}, got {type(compressor).__name__}"
    )


__all__ = [
    "ALIASES",
    "Compressor",
    "CountSketch",
    "Field",
    "NoCompression",
    "Payload",
    "QSGD",
    "TopK",
    "resolve_compressor",
]
