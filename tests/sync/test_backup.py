"""BackupWorkers (Chen et al., arXiv 1604.00981) on real gloo groups and real Trainers.

Stragglers are injected by sleeping 1.5 s on chosen (step, rank) pairs, far longer than a step
(~10-30 ms here), so which rank is late at those steps is deterministic.
"""

from __future__ import annotations

import datetime
import pickle
import time

import pytest
import torch
import torch.distributed as dist
from launch import init_process_group, run_distributed
from lightning_ns import CompressedDDP, pl
from models import ToyClassifier, flat_params, trainer_kwargs

from lightning_compress.comm.first_n import FirstNExchange
from lightning_compress.compressors import QSGD, CountSketch, NoCompression, TopK
from lightning_compress.sync import BackupWorkers

DELAY = 1.5


class SleepyClassifier(ToyClassifier):
    """ToyClassifier whose training_step sleeps on chosen (step, rank) pairs: late, but computed."""

    def __init__(self, sleep_in_step=(), nan_steps=(), **kwargs):
        super().__init__(**kwargs)
        self.sleep_in_step = set(sleep_in_step)
        self.nan_steps = set(nan_steps)

    def training_step(self, batch, batch_idx):
        if (self.trainer.global_step, self.global_rank) in self.sleep_in_step:
            time.sleep(DELAY)
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step in self.nan_steps else loss


class Probe(pl.Callback):
    """Per step: sleeps before the batch (injected stragglers), records params, grads and the schedule."""

    def __init__(self, sleep_before=(), grads=False):
        # (step, rank) sleeps DELAY; (step, rank, seconds) sleeps that long
        self.sleep_before = {(e[0], e[1]): (e[2] if len(e) > 2 else DELAY) for e in sleep_before}
        self.grads = grads
        self.rows: dict[int, dict] = {}
        self.local: dict[int, torch.Tensor] = {}
        self.applied: dict[int, torch.Tensor] = {}
        self.started: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        if (step, trainer.global_rank) in self.sleep_before:
            time.sleep(self.sleep_before[step, trainer.global_rank])
        self.started[step] = time.monotonic()

    def on_after_backward(self, trainer, pl_module):
        if self.grads:  # the DDP hook left this rank's own gradient
            self.local[trainer.global_step] = _grads(pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads:  # what the optimizer applies
            self.applied[trainer.global_step] = _grads(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1  # the optimizer step just taken
        sync = trainer.strategy.sync
        self.rows[step] = {
            "params": flat_params(pl_module),
            "contributors": getattr(sync, "last_contributors", None),
            "dropped": getattr(sync, "last_dropped", None),
            "skipped": getattr(sync, "last_skipped", None),
            "seconds": time.monotonic() - self.started[step],
            "metrics": sync.metrics() if isinstance(sync, BackupWorkers) else None,
        }


def _grads(module):
    return torch.cat([p.grad.reshape(-1).clone() for p in module.parameters()])


def _fit(rank, world_size, strategy_factory, steps, sleep_before=(), sleep_in_step=(), grads=False,
         nan_steps=()):
    pl.seed_everything(0, verbose=False)
    model = SleepyClassifier(sleep_in_step=sleep_in_step, nan_steps=nan_steps)
    strategy = strategy_factory()
    probe = Probe(sleep_before, grads)
    trainer = pl.Trainer(**trainer_kwargs(world_size, strategy=strategy, max_steps=steps, callbacks=[probe]))
    trainer.fit(model)
    ledger = strategy.comm_state.ledger
    sync = strategy.sync
    return {
        "params": flat_params(model),
        "acc": model.accuracy(),
        "rows": probe.rows,
        "local": probe.local,
        "applied": probe.applied,
        "ledger_steps": ledger.steps,
        "bytes": ledger.total.payload_bytes,
        "wire": ledger.total.wire_bytes,
        "two_phase": getattr(sync, "two_phase", None),
        "dropped_total": getattr(sync, "dropped_total", None),
        "skipped_total": getattr(sync, "skipped_total", None),
    }


def backup_none():
    return CompressedDDP(compressor=NoCompression(), min_compression_size=256,
                         sync=BackupWorkers(backups=1, timeout=60, skip_late_steps=True))


def backup_qsgd():
    return CompressedDDP(compressor=QSGD(bits=4), min_compression_size=256,
                         sync=BackupWorkers(backups=1, timeout=60, skip_late_steps=True))


def backup_topk_ef():
    return CompressedDDP(compressor=TopK(ratio=0.05), error_feedback=True, min_compression_size=256,
                         sync=BackupWorkers(backups=1, timeout=60, skip_late_steps=True))


def _check_identical_steps(results, steps, contributors):
    """Every rank saw the same contributors and holds the same parameters after every step."""
    world = len(results)
    for s in range(steps):
        rows = [r["rows"][s] for r in results]
        for row in rows[1:]:
            assert torch.equal(row["params"], rows[0]["params"]), f"ranks diverged at step {s}"
            assert row["contributors"] == rows[0]["contributors"], f"ranks disagree at step {s}"
        assert len(rows[0]["contributors"]) == contributors, (s, rows[0])
        assert set(rows[0]["contributors"]) | set(rows[0]["dropped"]) == set(range(world))
    for r in results:
        assert r["ledger_steps"] == steps
        assert r["dropped_total"] == (world - contributors) * steps


STEPS = 96
LATE_BEFORE = (10, 2)  # rank 2 sleeps before step 10's batch: it is late and skips the step's compute
# rank 1 sleeps inside step 70's training_step: it computes a gradient that is dropped. Far enough from
# step 10 that rank 2 has caught up again (the fast ranks wait for it at step 10 + max_lag = 42).
LATE_IN_STEP = (70, 1)
# with 3 processes on 2 cores one rank is naturally a step behind now and then; if rank 1 were, it
# would find step 70 already closed and skip it. The other ranks pause briefly before step 70, so
# rank 1 starts it on time and is late only through its in-step sleep.
HOLD = [(LATE_IN_STEP[0], r, DELAY / 3) for r in range(3) if r != LATE_IN_STEP[1]]


def test_straggler_is_dropped_no_hang_identical_and_converges():
    results = run_distributed(
        _fit, 3, backup_none, STEPS, [LATE_BEFORE, *HOLD], [LATE_IN_STEP], True, timeout=120
    )
    _check_identical_steps(results, STEPS, contributors=2)
    rows = results[0]["rows"]
    # the injected stragglers are exactly the dropped ranks at their steps
    assert rows[LATE_BEFORE[0]]["dropped"] == (LATE_BEFORE[1],)
    assert rows[LATE_IN_STEP[0]]["dropped"] == (LATE_IN_STEP[1],)
    # a rank already late when the step starts skips forward/backward; one late inside the step computed
    assert results[LATE_BEFORE[1]]["rows"][LATE_BEFORE[0]]["skipped"]
    assert LATE_BEFORE[0] not in results[LATE_BEFORE[1]]["local"]
    assert LATE_IN_STEP[0] in results[LATE_IN_STEP[1]]["local"]
    # what every rank applied is the mean of exactly the contributors' gradients of that step
    for s in range(STEPS):
        contributors = rows[s]["contributors"]
        expected = torch.zeros_like(results[contributors[0]]["local"][s])
        for c in contributors:
            expected += results[c]["local"][s]
        expected /= len(contributors)
        for r in results:
            torch.testing.assert_close(r["applied"][s], expected, rtol=0, atol=1e-7)
    # the ranks that were on time did not wait for the straggler
    for s, late in (LATE_BEFORE, LATE_IN_STEP):
        for r in range(3):
            if r != late:
                assert results[r]["rows"][s]["seconds"] < DELAY / 2, (s, r, results[r]["rows"][s]["seconds"])
    metrics = rows[STEPS - 1]["metrics"]
    assert metrics["backup/contributions"] == 2.0 and metrics["backup/dropped"] == 1.0
    assert metrics["backup/dropped_total"] == float(STEPS)
    assert results[0]["acc"] > 0.7, results[0]["acc"]


@pytest.mark.parametrize("factory", [backup_qsgd, backup_topk_ef], ids=["qsgd4", "topk_ef"])
def test_compressed_payloads_with_straggler(factory):
    steps = 16
    late = (6, 3)
    nan_step = 10  # every rank's gradient is NaN: whoever contributes, every rank skips the step
    results = run_distributed(_fit, 4, factory, steps, [late], (), False, [nan_step], timeout=120)
    _check_identical_steps(results, steps, contributors=3)
    assert results[0]["rows"][late[0]]["dropped"] == (late[1],)
    rows = results[0]["rows"]
    assert torch.equal(rows[nan_step]["params"], rows[nan_step - 1]["params"])
    assert not torch.equal(rows[nan_step + 1]["params"], rows[nan_step]["params"])
    assert torch.isfinite(results[0]["params"]).all()
    # a contributor sends its encoded gradient once per step; 18 k coordinates at 4 bits or 5 % Top-K
    numel = results[0]["params"].numel()
    per_step = max(r["bytes"] for r in results) / steps
    assert 0 < per_step < 4 * numel / 2, (per_step, numel)
    # QSGD among 4 ranks: the two-phase exchange, 2·(3/4) of a payload of about numel/2 bytes
    # sent per rank and step, plus headers and shards' padding (the all-gather: 3 payloads)
    wire = max(r["wire"] for r in results) / steps
    if factory is backup_qsgd:
        assert all(r["two_phase"] for r in results)
        assert 0.75 * numel < wire < numel, (wire, numel)
    else:
        assert not any(r["two_phase"] for r in results)


def plain_sync():
    return CompressedDDP(compressor=NoCompression(), min_compression_size=256)


def backup_zero():
    return CompressedDDP(compressor=NoCompression(), min_compression_size=256, sync=BackupWorkers(backups=0))


def test_zero_backups_is_plain_synchronous_training():
    plain = run_distributed(_fit, 2, plain_sync, 12, timeout=120)
    zero = run_distributed(_fit, 2, backup_zero, 12, timeout=120)
    assert torch.equal(plain[0]["params"], zero[0]["params"])
    assert torch.equal(zero[0]["params"], zero[1]["params"])
    assert zero[0]["rows"][11]["metrics"] == {}  # nothing dropped, no backup figures


@pytest.mark.parametrize("n", [1, 511, 2049, 2100, 6000, 18944])
def test_two_phase_encoding_gives_every_rank_a_shard_and_conserves_the_residual(n):
    from lightning_compress.exchange import ExchangeConfig, ExchangeMemory, encode_with_feedback

    sync = BackupWorkers(backups=1)
    sync._world_size = 4
    codec = QSGD(bits=4)  # shards of whole buckets: multiples of lcm(512, 8) = 512 elements
    _, shard, _ = sync._shards(0, n, codec)
    assert shard % 512 == 0 and 4 * shard >= n > 4 * (shard - 512)
    config = ExchangeConfig.resolve(codec, error_feedback=True)
    memory = ExchangeMemory()
    memory.relayout((("w", n),), (), torch.device("cpu"))
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    rounding = torch.Generator().manual_seed(0)
    payloads, commit = encode_with_feedback(x, codec, config, memory, rounding, (4, shard))
    assert len(payloads) == 4  # one slot per rank, even when n fills fewer than 4 shards
    assert all(q.nbytes == codec.payload_nbytes(shard) for q in payloads)
    commit()
    decoded = torch.cat([codec.decompress(q).reshape(-1) for q in payloads])
    assert not decoded[n:].any()  # the padding decodes to zeros
    # error feedback conserves the gradient: what was sent plus what is kept is what was given
    torch.testing.assert_close(decoded[:n] + memory.v.residuals["compressed"], x, rtol=0, atol=1e-6)


def test_negative_backups_rejected_at_construction():
    with pytest.raises(ValueError, match="backups must be an integer >= 0"):
        BackupWorkers(backups=-1)
    with pytest.raises(ValueError, match="max_lag"):
        BackupWorkers(max_lag=0)
    with pytest.raises(ValueError, match="timeout"):
        BackupWorkers(timeout=-1.0)
    sync = pickle.loads(pickle.dumps(BackupWorkers(backups=2, timeout=datetime.timedelta(seconds=5))))
    assert sync.backups == 2 and sync.timeout == 5.0


def too_many_backups():
    return CompressedDDP(compressor=NoCompression(), sync=BackupWorkers(backups=2))


def with_sketch():
    return CompressedDDP(compressor=CountSketch(), sync=BackupWorkers(backups=1))


def _fit_error(rank, world_size, factory):
    try:
        _fit(rank, world_size, factory, 2)
    except ValueError as err:
        return str(err)
    return None


@pytest.mark.parametrize(
    "factory, message",
    [(too_many_backups, "needs more ranks than backups"), (with_sketch, "does not support CountSketch")],
    ids=["backups>=world", "sketch"],
)
def test_setup_errors_on_every_rank(factory, message):
    errors = run_distributed(_fit_error, 2, factory, timeout=120)
    assert all(e is not None and message in e for e in errors), errors


def _exchange_with_dead_ranks(rank, world_size, two_phase):
    """Rank 2 joins the groups and then never takes part; ranks 0 and 1 run the protocol."""
    init_process_group(rank, world_size)
    store = dist.PrefixStore("test/", dist.distributed_c10d._get_default_store())
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=2))
    reduce = (lambda step, rows: rows[0].clone()) if two_phase else None
    ex = FirstNExchange(store, rank, world_size, contributors=2, timeout=2.0, max_lag=2, group=group,
                        reduce=reduce)
    if rank == 2:
        time.sleep(8)  # alive, but its communication thread never joins a step
        return None
    message = None
    start = time.monotonic()
    ex.start(0)
    try:
        for step in range(10):
            ex.wait_lag(step)
            ex.arrive(step, torch.full((12,), rank, dtype=torch.uint8))  # 3 slots of 4 bytes
            ex.collect(step)
            ex.finish(step)
    except RuntimeError as err:
        message = (step, str(err), time.monotonic() - start)
    ex.stop()
    return message


@pytest.mark.parametrize("two_phase", [False, True], ids=["allgather", "two_phase"])
def test_a_rank_that_never_joins_fails_loudly_instead_of_hanging(two_phase):
    results = run_distributed(_exchange_with_dead_ranks, 3, two_phase, timeout=60)
    for step, message, seconds in results[:2]:
        # step 0 closes (two tickets), but its collective needs rank 2's slot: it times out
        assert step == 0, message
        assert "step 0" in message, message
        assert seconds < 10


def _first_n_rows(rank, world_size, size):
    """Three steps of the exchange among 3 ranks, N = 2; rank 2 is late at step 1."""
    init_process_group(rank, world_size)
    store = dist.PrefixStore(f"rows{size}/", dist.distributed_c10d._get_default_store())
    group = dist.new_group(backend="gloo")
    ex = FirstNExchange(store, rank, world_size, contributors=2, timeout=30.0, max_lag=4, group=group)
    ex.start(0)
    out = []
    for step in range(3):
        ex.wait_lag(step)
        if step == 1 and rank == 2:
            while not ex.closed(step):  # late: the others have closed the step
                time.sleep(0.01)
        if step == 1 or rank != 2:  # rank 2 sits out steps 0 and 2
            ticket = ex.arrive(step, torch.full((size,), 10 * step + rank + 1, dtype=torch.uint8))
        else:
            ticket = None
        rows, _ = ex.collect(step)
        out.append((ticket, rows.clone()))
        ex.finish(step)
    ex.stop()
    dist.barrier()
    return {"steps": out, "store_bytes": ex.store_bytes}


def test_payloads_travel_by_all_gather_not_through_the_store():
    small = run_distributed(_first_n_rows, 3, 64)
    large = run_distributed(_first_n_rows, 3, 1 << 20)
    for results, size in ((small, 64), (large, 1 << 20)):
        for step in range(3):
            rows = [r["steps"][step][1] for r in results]
            for other in rows[1:]:
                assert torch.equal(other, rows[0])  # the same rows on every rank
            assert rows[0].shape == (3, size)
            contributors = [r for r in range(3) if rows[0][r].any()]
            assert len(contributors) == 2 and 2 not in contributors, (step, contributors)
            for r in contributors:
                assert torch.equal(rows[0][r], torch.full((size,), 10 * step + r + 1, dtype=torch.uint8))
        assert results[2]["steps"][1][0] == 3  # rank 2 arrived at step 1 third: dropped
    # what the store carried does not depend on the payload size (16384x larger here); which rank
    # writes a step's "closed" and "done" keys depends on timing, so the total is compared
    assert sum(r["store_bytes"] for r in small) == sum(r["store_bytes"] for r in large)
    assert sum(r["store_bytes"] for r in large) < 3 * 200


def _first_n_two_phase(rank, world_size, size):
    """The two-phase exchange among 3 ranks, N = 2, rank 2 late at step 1; ``reduce`` sums slots."""
    init_process_group(rank, world_size)
    store = dist.PrefixStore(f"two{size}/", dist.distributed_c10d._get_default_store())
    group = dist.new_group(backend="gloo")
    seen = {}

    def reduce(step, rows):
        seen[step] = rows.clone()
        return rows.sum(dim=0, dtype=torch.uint8)[:8].clone()  # 8 bytes of this rank's share

    ex = FirstNExchange(store, rank, world_size, contributors=2, timeout=30.0, max_lag=4, group=group,
                        reduce=reduce)
    ex.start(0)
    out = []
    for step in range(3):
        ex.wait_lag(step)
        if step == 1 and rank == 2:
            while not ex.closed(step):
                time.sleep(0.01)
        if step == 1 or rank != 2:
            # slot r (for rank r) holds 10·step + 3·sender + r + 1
            payload = torch.cat([torch.full((size,), 10 * step + 3 * rank + r + 1, dtype=torch.uint8)
                                 for r in range(world_size)])
            ex.arrive(step, payload)
        rows, reduced = ex.collect(step)
        out.append((rows.clone(), reduced.clone()))
        ex.finish(step)
    ex.stop()
    dist.barrier()
    return {"steps": out, "seen": seen, "store_bytes": ex.store_bytes}


def test_two_phase_exchange_hands_each_rank_its_slots_and_gathers_the_reductions():
    small = run_distributed(_first_n_two_phase, 3, 64)
    large = run_distributed(_first_n_two_phase, 3, (1 << 18) + 1000)  # two pieces per slot
    for results, size in ((small, 64), (large, (1 << 18) + 1000)):
        for step in range(3):
            contributors = [s for s in range(3) if results[0]["steps"][step][0][s].any()]
            assert contributors == [0, 1], (step, contributors)  # rank 2 late or sitting out
            for r, res in enumerate(results):
                rows, reduced = res["steps"][step]
                assert torch.equal(rows, res["seen"][step])  # reduce saw what collect returns
                assert rows.shape == (3, size)
                for s in contributors:  # sender s's slot for rank r
                    expected_slot = torch.full((size,), 10 * step + 3 * s + r + 1, dtype=torch.uint8)
                    assert torch.equal(rows[s], expected_slot)
                assert not rows[2].any()
                # every rank holds every rank's reduction, the same rows everywhere
                assert torch.equal(reduced, results[0]["steps"][step][1])
                expected = sum(10 * step + 3 * s + r + 1 for s in contributors)
                assert torch.equal(reduced[r], torch.full((8,), expected, dtype=torch.uint8))
    assert sum(r["store_bytes"] for r in small) == sum(r["store_bytes"] for r in large)


def _monitored(rank, world_size, log_dir):
    import csv
    import glob
    import os

    from lightning_ns import CommunicationMonitor, CSVLogger

    pl.seed_everything(0, verbose=False)
    strategy = CompressedDDP(compressor=QSGD(bits=4), min_compression_size=256, sync=BackupWorkers(backups=1))
    kwargs = trainer_kwargs(world_size, strategy=strategy, max_steps=4, callbacks=[CommunicationMonitor()])
    kwargs["log_every_n_steps"] = 1
    kwargs["logger"] = CSVLogger(log_dir, name="backup")
    pl.Trainer(**kwargs).fit(ToyClassifier())
    if rank != 0:
        return None
    [path] = glob.glob(os.path.join(log_dir, "backup", "*", "metrics.csv"))
    with open(path) as f:
        return list(csv.DictReader(f))


def test_monitor_logs_contributions_and_dropped_ranks(tmp_path):
    rows = run_distributed(_monitored, 3, str(tmp_path))[0]
    logged = [r for r in rows if r.get("backup/contributions")]
    assert logged, "the monitor did not log the schedule's metrics"
    assert all(float(r["backup/contributions"]) == 2.0 and float(r["backup/dropped"]) == 1.0 for r in logged)
    # the store exchange went through the codec: the monitor logs its setting as for the hook
    assert all(float(r["comm/bit_width"]) == 4.0 for r in logged), logged[0]


def backup_qsgd_ef():
    return CompressedDDP(compressor=QSGD(bits=4), error_feedback=True, min_compression_size=256,
                         sync=BackupWorkers(backups=1, timeout=60))


def _fit_and_resume(rank, world_size, ckpt_dir):
    """Fit 6 steps and save; a new Trainer resumes from the checkpoint and fits to step 12."""
    import os

    pl.seed_everything(0, verbose=False)
    path = os.path.join(ckpt_dir, "six.ckpt")
    first = pl.Trainer(**trainer_kwargs(world_size, strategy=backup_qsgd_ef(), max_steps=6))
    first.fit(SleepyClassifier())
    first.save_checkpoint(path)
    residual = first.strategy.sync.state_dict()["residual"].clone()
    strategy = backup_qsgd_ef()
    probe = Probe()
    second = pl.Trainer(**trainer_kwargs(world_size, strategy=strategy, max_steps=12, callbacks=[probe]))
    model = SleepyClassifier()
    second.fit(model, ckpt_path=path)
    return {"residual": residual, "steps": sorted(probe.rows), "two_phase": strategy.sync.two_phase,
            "params": flat_params(model), "ledger_steps": strategy.comm_state.ledger.steps}


def test_resume_with_the_two_phase_exchange(tmp_path):
    results = run_distributed(_fit_and_resume, 3, str(tmp_path), timeout=180)
    for r in results:
        assert r["two_phase"]
        assert r["residual"].abs().sum() > 0  # error feedback had something to carry
        assert r["steps"] == list(range(6, 12))  # resumed at step 6, not from scratch
        assert torch.isfinite(r["params"]).all()
        assert torch.equal(r["params"], results[0]["params"])


class LoggingClassifier(SleepyClassifier):
    """Logs its loss from training_step (``sync_dist`` as given); ``metric`` adds a torchmetrics object."""

    def __init__(self, sync_dist=False, metric=False, on_epoch_only=False):
        super().__init__()
        self.sync_dist = sync_dist
        self.on_epoch_only = on_epoch_only
        if metric:
            from torchmetrics.classification import MulticlassAccuracy

            self.train_acc = MulticlassAccuracy(num_classes=4)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.on_epoch_only:  # synced at the epoch's end only: no collective inside the step
            self.log("train_loss", loss, sync_dist=self.sync_dist, on_step=False, on_epoch=True)
        else:
            self.log("train_loss", loss, sync_dist=self.sync_dist)
        return loss


def _fit_auto_skip(rank, world_size, variant, steps):
    pl.seed_everything(0, verbose=False)
    model = LoggingClassifier(sync_dist=variant in ("sync_dist", "epoch_sync_dist"),
                              metric=variant == "metric", on_epoch_only=variant == "epoch_sync_dist")
    strategy = CompressedDDP(compressor=NoCompression(), min_compression_size=256,
                             sync=BackupWorkers(backups=1, timeout=60))  # skip_late_steps=None
    probe = Probe([LATE_BEFORE])
    trainer = pl.Trainer(**trainer_kwargs(world_size, strategy=strategy, max_steps=steps, callbacks=[probe]))
    trainer.fit(model)
    skipped = [s for s, row in probe.rows.items() if row["skipped"]]
    return {"skipped": skipped, "may_skip": strategy.sync._may_skip, "params": flat_params(model)}


@pytest.mark.parametrize("variant", ["plain", "sync_dist", "epoch_sync_dist", "metric"])
def test_late_ranks_skip_by_default_unless_training_step_may_sync(variant):
    steps = LATE_BEFORE[0] + 4
    results = run_distributed(_fit_auto_skip, 3, variant, steps, timeout=120)
    for r in results[1:]:
        assert torch.equal(r["params"], results[0]["params"])
    late = results[LATE_BEFORE[1]]
    if variant == "plain":
        # a training_step without collectives: the late rank catches up by skipping its compute
        assert LATE_BEFORE[0] in late["skipped"], late["skipped"]
        assert all(r["may_skip"] for r in results)
    else:
        # self.log(sync_dist=True), on step (a reduce inside training_step) or on epoch only (seen
        # in Lightning's results), switched skipping off at the first step; a torchmetrics object
        # kept it off from setup: no rank skipped a step, and the run did not hang
        assert all(not r["skipped"] and not r["may_skip"] for r in results), results


class _RecordingDQ:
    """A DQPolicy factory whose instances remember every (step, norm, bits) decision."""

    @staticmethod
    def make():
        from lightning_compress.policies import DQPolicy

        class Recording(DQPolicy):
            def __init__(self):
                super().__init__(mean_bits=4.0)
                self.records = []

            def decide(self, grad_norm, step=0):
                bits = super().decide(grad_norm, step)
                self.records.append((step, grad_norm, bits))
                return bits

        return Recording()


def _fit_with_policy(rank, world_size, steps, late):
    from lightning_ns import CommunicationMonitor

    pl.seed_everything(0, verbose=False)
    policy = _RecordingDQ.make()
    probe = Probe([late])
    trainer = pl.Trainer(**trainer_kwargs(world_size, strategy=backup_qsgd(), max_steps=steps,
                                          callbacks=[probe, CommunicationMonitor(policy=policy)]))
    model = SleepyClassifier()
    trainer.fit(model)
    skipped = [s for s, row in probe.rows.items() if row["skipped"]]
    return {"records": policy.records, "state": policy.state_dict(), "skipped": skipped,
            "params": flat_params(model)}


def test_policy_state_identical_on_every_rank_when_a_rank_skips_steps():
    steps, late = 24, (10, 2)  # rank 2 is late before step 10: it skips that step's forward/backward
    results = run_distributed(_fit_with_policy, 3, steps, late, timeout=120)
    assert late[0] in results[late[1]]["skipped"], results[late[1]]["skipped"]
    # the skipping rank decided too, from the same norm: one decision per step on every rank
    assert [s for s, _, _ in results[0]["records"]] == list(range(steps))
    for r in results[1:]:
        assert r["records"] == results[0]["records"]
        assert r["state"] == results[0]["state"]
        assert torch.equal(r["params"], results[0]["params"])
    # from step 1 on, each decision read the contributors' pre-compression norm from the headers
    norms = [g for _, g, _ in results[0]["records"]]
    assert norms[0] is None and all(g is not None and g > 0 for g in norms[1:])
    assert len(set(norms[1:])) == steps - 1
