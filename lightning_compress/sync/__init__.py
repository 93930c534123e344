"""Synchronization schedules: when ranks communicate, and what they exchange."""

from lightning_compress.sync.backup import BackupWorkers
from lightning_compress.sync.base import SyncContext, SyncSchedule
from lightning_compress.sync.local_sgd import LocalSGD
from lightning_compress.sync.overlap import OverlapLocalSGD
from lightning_compress.sync.slowmo import SlowMo

__all__ = ["BackupWorkers", "LocalSGD", "OverlapLocalSGD", "SlowMo", "SyncContext", "SyncSchedule"]
