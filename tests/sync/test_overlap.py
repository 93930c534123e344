"""Overlap-Local-SGD's averaging really runs in the background: launching it does not block.

Shown without clocks. The launch: the peer rank is held back, through a store, from joining the
averaging allreduce until this rank has finished computing; the collective cannot complete before
the peer joins, so this rank provably computed while it was in flight (a launch that blocked would
wait for the peer until the store's timeout fails the test). The schedule, in a real fit: the
average launched at a sync point is waited on only at the next one, after the local steps'
compute. Timing figures belong in benchmarks.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from launch import init_process_group, run_distributed
from lightning_ns import CompressedDDP, pl
from models import ToyClassifier, trainer_kwargs

import lightning_compress.sync.overlap as overlap
from lightning_compress.comm import BitLedger
from lightning_compress.comm.ledger import allreduce_wire_bytes
from lightning_compress.compressors import NoCompression
from lightning_compress.sync import OverlapLocalSGD
from lightning_compress.sync.overlap import launch_allreduce

N = 1 << 12
WAIT = datetime.timedelta(seconds=60)  # how long a held-back rank waits before the test fails


def _store(path, world_size):
    store = dist.FileStore(path, world_size)
    store.set_timeout(WAIT)
    return store


def _launch(rank, world_size, path):
    init_process_group(rank, world_size)
    store = _store(path, world_size)
    buf = torch.full((N,), float(rank + 1))
    if rank == 1:
        store.wait(["computed"])  # join only once rank 0 has computed with its allreduce launched
        launch_allreduce(buf, None, None).wait()
        return None
    ledger = BitLedger()
    work = launch_allreduce(buf, None, ledger)
    assert not work.is_completed()  # rank 1 has not joined: it cannot have completed
    assert ledger.current.payload_bytes == 4 * N  # the bytes are recorded at launch
    a = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    for _ in range(10):
        a = torch.tanh(a @ a)
    assert not work.is_completed()  # the compute ran while the allreduce was in flight
    store.set("computed", "1")
    work.wait()
    ledger.end_step()
    return {"sum_ok": bool(torch.all(buf == 3.0)), "last": ledger.last, "finite": bool(a.isfinite().all())}


def test_launch_returns_before_the_allreduce_completes(tmp_path):
    res = run_distributed(_launch, 2, os.fspath(tmp_path / "store"))[0]
    assert res["sum_ok"] and res["finite"]
    assert res["last"].payload_bytes == 4 * N
    assert res["last"].wire_bytes == allreduce_wire_bytes(4 * N, 2)


class _RecordedWork:
    """The real work handle of an averaging allreduce, noting in ``events`` when it is waited on."""

    def __init__(self, work, events, index):
        self.work, self.events, self.index = work, events, index

    def wait(self, *args, **kwargs):
        self.events.append(("wait", self.index))
        return self.work.wait(*args, **kwargs)

    def is_completed(self):
        return self.work.is_completed()


class _Steps(pl.Callback):
    def __init__(self, events):
        self.events = events

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.events.append(("step", trainer.global_step))

    def on_train_end(self, trainer, pl_module):
        self.events.append(("end", trainer.global_step))


def _fit(rank, world_size):
    events: list[tuple[str, int]] = []
    real = overlap.launch_allreduce

    def recorded_launch(buffer, group, ledger, extra=0):
        work = real(buffer, group, ledger, extra)  # the real non-blocking collective
        launched = sum(kind == "launch" for kind, _ in events)
        events.append(("launch", launched))
        return _RecordedWork(work, events, launched)

    overlap.launch_allreduce = recorded_launch
    pl.seed_everything(0, verbose=False)
    model = ToyClassifier()
    model.net.register_forward_pre_hook(lambda module, args: events.append(("forward", -1)))
    strategy = CompressedDDP(compressor=NoCompression(), sync=OverlapLocalSGD(period=2))
    trainer = pl.Trainer(
        **trainer_kwargs(world_size, strategy=strategy, max_steps=6, callbacks=[_Steps(events)])
    )
    trainer.fit(model)
    return events


def test_schedule_computes_local_steps_before_waiting_for_the_average():
    out = run_distributed(_fit, 2)
    assert out[0] == out[1]
    events = out[0]
    # sync points after steps 1, 3 and 5: each launches one average, waited on once, later
    launches = [events.index(("launch", i)) for i in range(3)]
    waits = [events.index(("wait", i)) for i in range(3)]
    assert [e for e in events if e[0] in ("launch", "wait")] == [
        ("launch", 0),
        ("wait", 0),
        ("launch", 1),
        ("wait", 1),
        ("launch", 2),
        ("wait", 2),
    ]
    # the average launched after step 1 is waited on at the next sync point, after step 3: the
    # whole of step 2 and step 3's forward ran with it outstanding; likewise for the second one
    for i, step in enumerate((2, 4)):
        between = events[launches[i] : waits[i]]
        assert ("step", step) in between and ("step", step + 1) in between, events
        assert sum(kind == "forward" for kind, _ in between) == 2, events
    # the last one is completed when fit ends, after step 5's compute
    assert waits[2] > launches[2] and ("end", 6) in events[launches[2] :], events
