"""Schedules see a SyncContext, not the strategy: one can drive them without a Trainer."""

from __future__ import annotations

import torch
from launch import init_process_group, run_distributed
from torch import nn

from lightning_compress.hooks import CompressionState
from lightning_compress.sync import BackupWorkers, LocalSGD, SyncContext, SyncSchedule


def _context(comm, module, optimizers, rank, world, steps):
    return SyncContext(
        comm=comm,
        module=module,
        model=module,
        rank=rank,
        world_size=world,
        trainer=None,
        _optimizers=lambda: optimizers,
        _steps_done=lambda: steps[0],
    )


def _drive_local_sgd(rank, world):
    init_process_group(rank, world)
    torch.manual_seed(0)
    module = nn.Linear(4, 2)
    start = module.weight.detach().clone()
    comm = CompressionState("none")
    optimizers: list = []  # created after setup, as Lightning does: the context reads them live
    steps = [0]
    ctx = _context(comm, module, optimizers, rank, world, steps)
    schedule = LocalSGD(period=2)
    schedule.setup(ctx)
    optimizers.append(torch.optim.SGD(module.parameters(), lr=0.1))
    weights = []
    for step in range(4):
        for p in module.parameters():
            p.grad = torch.full_like(p, float(rank + 1))  # every rank walks its own way
        optimizers[0].step()
        schedule.after_optimizer_step(ctx, optimizers[0], step)
        comm.close_step(owner=True)
        steps[0] = step + 1
        weights.append(module.weight.detach().clone())
    ledger = comm.ledger
    return {"start": start, "weights": weights, "ledger_steps": ledger.steps, "steps": ledger.exchanges}


def test_local_sgd_runs_from_a_context_alone():
    out = run_distributed(_drive_local_sgd, 2)
    mean_grad = 1.5  # (1 + 2) / 2
    for r, res in enumerate(out):
        # after local step 0 each rank moved by its own gradient; after step 1 they averaged
        assert torch.allclose(res["weights"][0], res["start"] - 0.1 * (r + 1))
        assert torch.allclose(res["weights"][1], res["start"] - 0.2 * mean_grad)
        assert torch.allclose(res["weights"][3], res["start"] - 0.4 * mean_grad)
        assert res["ledger_steps"] == 4 and res["steps"] == 2  # two sync points sent bytes
    assert torch.equal(out[0]["weights"][3], out[1]["weights"][3])


def test_context_reads_optimizers_and_steps_live():
    optimizers: list = []
    steps = [3]
    ctx = _context(CompressionState("none"), nn.Linear(1, 1), optimizers, 0, 1, steps)
    assert ctx.optimizers == [] and ctx.steps_done == 3
    optimizers.append("opt")
    steps[0] = 7
    assert ctx.optimizers == ["opt"] and ctx.steps_done == 7


def test_schedules_declare_what_they_log():
    assert SyncSchedule.logged_metrics == () and SyncSchedule().metrics() == {}
    backup = BackupWorkers(backups=1)
    assert backup.metrics() == {}  # nothing before the first step
    backup.last_step = 0
    assert set(backup.metrics()) == set(BackupWorkers.logged_metrics)


def _overlap_setup(rank, world, codec, compress_average):
    from lightning_compress.sync import OverlapLocalSGD

    init_process_group(rank, world)
    module = nn.Linear(64, 32)  # 2048 weights: compressed with min_compression_size=1024
    ctx = _context(CompressionState(codec), module, [], rank, world, [0])
    schedule = OverlapLocalSGD(compress_average=compress_average)
    try:
        schedule.setup(ctx)
    except ValueError as err:
        return str(err)
    return schedule._compress


def test_overlap_compresses_its_average_with_a_fixed_size_codec_only():
    assert run_distributed(_overlap_setup, 1, "qsgd", None) == [True]
    assert run_distributed(_overlap_setup, 1, "qsgd", False) == [False]
    assert run_distributed(_overlap_setup, 1, "topk", None) == [False]  # float32 average, with a warning
    (message,) = run_distributed(_overlap_setup, 1, "topk", True)
    assert "compress_average" in message and "QSGD" in message
