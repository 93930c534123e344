"""The communication metrics, built from a ledger by pure functions (no Trainer, no process group).

:class:`~lightning_compress.CommunicationMonitor` logs what these return; any other consumer (a
benchmark, a notebook reading a checkpoint's ledger) gets the same figures from the same records.
"""

from __future__ import annotations

from dataclasses import fields

from lightning_compress.comm.ledger import StepRecord
from lightning_compress.compressors import Compressor, TopK

#: names of the logged metrics (see :class:`~lightning_compress.CommunicationMonitor`)
BITS_SENT = "comm/bits_sent"
BITS_SENT_TOTAL = "comm/bits_sent_total"
COMPRESSION_RATIO = "comm/compression_ratio"
BITS_PER_COORD = "comm/bits_per_coord"
WIRE_BITS = "comm/wire_bits"
BIT_WIDTH = "comm/bit_width"
TOPK_K = "comm/topk_k"
GRAD_NORM = "comm/grad_norm"


def codec_setting(compressor: Compressor | None, numel: int) -> tuple[str, float] | None:
    """The codec's current setting as ``(metric name, value)``, or ``None`` for a codec without one.

    Top-K: ``(TOPK_K, K)`` for ``numel`` coordinates; a codec with a bit width (QSGD):
    ``(BIT_WIDTH, bits)``.
    """
    if compressor is None:
        return None
    if isinstance(compressor, TopK):
        return TOPK_K, float(compressor.k_for(numel))
    bits = getattr(compressor, "bits", None)
    return (BIT_WIDTH, float(bits)) if bits is not None else None


def record_between(start: StepRecord, end: StepRecord) -> StepRecord:
    """The figures added between two cumulative records (``end - start``, field by field)."""
    return StepRecord(**{f.name: getattr(end, f.name) - getattr(start, f.name) for f in fields(StepRecord)})


def step_metrics(
    record: StepRecord,
    total: StepRecord,
    setting: tuple[str, float] | None = None,
    grad_norm: float | None = None,
) -> dict[str, float]:
    """The metrics of one step (or of any span of steps summed into ``record``).

    Args:
        record: the span's figures (``ledger.last`` for a step, :func:`record_between` for an epoch).
        total: the cumulative figures since the start of training (``ledger.total``).
        setting: ``(name, value)`` of the codec setting to log with them (the step's, or the
            span's mean), or ``None`` when the span sent nothing compressed.
        grad_norm: the norm the setting was decided from; logged only with a setting.

    Returns:
        ``{name: value}``: ``comm/bits_sent``, ``comm/bits_sent_total``, ``comm/wire_bits``,
        ``comm/compression_ratio``, ``comm/bits_per_coord``, then the setting and
        ``comm/grad_norm`` when given.

    """
    metrics = {
        BITS_SENT: float(record.bits_sent),
        BITS_SENT_TOTAL: float(total.bits_sent),
        WIRE_BITS: 8.0 * record.wire_bytes,
        COMPRESSION_RATIO: record.compression_ratio,
        BITS_PER_COORD: record.bits_per_coord,
    }
    if setting is not None:
        metrics[setting[0]] = setting[1]
        if grad_norm is not None:
            metrics[GRAD_NORM] = grad_norm
    return metrics


__all__ = [
    "BITS_PER_COORD",
    "BITS_SENT",
    "BITS_SENT_TOTAL",
    "BIT_WIDTH",
    "COMPRESSION_RATIO",
    "GRAD_NORM",
    "TOPK_K",
    "WIRE_BITS",
    "codec_setting",
    "record_between",
    "step_metrics",
]
