"""Collectives that move compressed payloads between ranks, and the bit ledger."""

from lightning_compress.comm.collectives import (
    ExchangeResult,
    allreduce_mean,
    exchange,
    sketch_allreduce,
    sparse_allgather,
    two_phase_allreduce,
)
from lightning_compress.comm.ledger import BitLedger, StepRecord

__all__ = [
    "BitLedger",
    "ExchangeResult",
    "StepRecord",
    "allreduce_mean",
    "exchange",
    "sketch_allreduce",
    "sparse_allgather",
    "two_phase_allreduce",
]
