"""The end-of-fit table: this run's communication next to what float32 DDP would have needed."""

from __future__ import annotations

from typing import Any

from lightning_compress.comm.ledger import BitLedger
from lightning_compress.metrics import BIT_WIDTH


def human_bytes(nbytes: float) -> str:
    """``1,234 B``, ``12.34 KiB`` ... ``1.23 TiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024:
            return f"{nbytes:,.0f} {unit}" if unit == "B" else f"{nbytes:,.2f} {unit}"
        nbytes /= 1024
    return f"{nbytes:,.2f} TiB"


def summary_table(
    ledger: BitLedger,
    title: str,
    world_size: int,
    setting: tuple[str, float] | None = None,
    numel: int = 0,
    samples: int | None = None,
) -> Any:
    """Build the table (a ``rich.table.Table``) from one rank's ledger.

    Args:
        ledger: the rank's ledger at the end of fit.
        title: the table's title.
        world_size: ranks in the exchange (what float32 DDP's ring allreduce would have sent).
        setting: ``(metric name, mean)`` of the codec setting over the compressed steps
            (``comm/bit_width`` gives a "mean bit width" row, any other a "mean K" row), or ``None``.
        numel: coordinates that travel through the codec (the "of d coordinates" of mean K).
        samples: samples trained on, for the bytes-per-sample row (``None`` or 0: no such row).

    """
    from rich.table import Table

    total = ledger.total
    # what float32 DDP hands to its allreduce in the same optimizer steps, from the ledger's
    # baseline, which counts every step (local steps included): wire = 2(W-1)/W x payload
    dense_payload = total.dense_wire_bytes * world_size / (2 * (world_size - 1)) if world_size > 1 else 0.0
    table = Table(title=title)
    table.add_column("")
    table.add_column("this run", justify="right")
    table.add_column("float32 DDP", justify="right")
    table.add_row("optimizer steps", f"{ledger.steps:,}", f"{ledger.steps:,}")
    table.add_row("exchanges (gradients or models)", f"{ledger.exchanges:,}", f"{ledger.steps:,}")
    human = human_bytes
    table.add_row("bytes handed to collectives", human(total.payload_bytes), human(dense_payload))
    table.add_row("bytes on the wire (ring)", human(total.wire_bytes), human(total.dense_wire_bytes))
    ratio = total.compression_ratio
    table.add_row("compression ratio (wire)", f"{ratio:.2f}x" if ratio else "-", "1.00x")
    table.add_row("bits per coordinate", f"{total.bits_per_coord:.3g}", "32")
    if setting is not None:
        name, mean = setting
        if name == BIT_WIDTH:
            table.add_row("mean bit width", f"{mean:.3g}", "32")
        else:
            d = f"{numel:,}"
            table.add_row(f"mean K (of {d} coordinates)", f"{mean:,.1f}", d)
    if samples:
        per_sample = (human(total.payload_bytes / samples), human(dense_payload / samples))
        table.add_row("bytes per sample", *per_sample)
    return table


__all__ = ["human_bytes", "summary_table"]
