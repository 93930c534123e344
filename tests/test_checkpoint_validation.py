"""A malformed ``"lightning_compress"`` checkpoint entry: one clear error naming the field, on every rank."""

from __future__ import annotations

import copy
import datetime
import os
import re
import time
from types import SimpleNamespace

import pytest
import torch
from launch import run_distributed
from lightning_ns import CompressedDDP, pl
from models import ToyClassifier, trainer_kwargs

from lightning_compress.checkpoint_schema import validate_entry
from lightning_compress.compressors import QSGD, NoCompression, TopK
from lightning_compress.strategy import CHECKPOINT_KEY
from lightning_compress.sync import BackupWorkers, LocalSGD, OverlapLocalSGD, SlowMo

ROOT = "checkpoint['lightning_compress']"
STEPS = 6  # mid-period for period 4 and 2-with-warm-up: the per-rank "local" state is saved too


# -- real entries, written by real 2-rank runs -------------------------------------------------
def qsgd():
    return CompressedDDP(compressor=QSGD(bits=4), min_compression_size=256)


def topk_momentum():
    return CompressedDDP(compressor=TopK(ratio=0.05), momentum=0.9, min_compression_size=256)


def local_qsgd_ef():
    return CompressedDDP(
        compressor=QSGD(bits=4), error_feedback=True, min_compression_size=256, sync=LocalSGD(period=4)
    )


def slowmo():
    return CompressedDDP(compressor=NoCompression(), sync=SlowMo(period=4, momentum=0.6))


def overlap():
    return CompressedDDP(compressor=NoCompression(), sync=OverlapLocalSGD(period=4))


def backup():
    return CompressedDDP(
        compressor=QSGD(bits=4),
        error_feedback=True,
        min_compression_size=256,
        sync=BackupWorkers(backups=1, timeout=60),
    )


FACTORIES = {
    "qsgd": (qsgd, 0.9),
    "topk_momentum": (topk_momentum, 0.0),  # momentum in the exchange: none in the optimizer
    "local_qsgd_ef": (local_qsgd_ef, 0.9),  # base momentum: per-rank optimizer states are saved
    "slowmo": (slowmo, 0.9),
    "overlap": (overlap, 0.0),
    "backup": (backup, 0.0),
}


def _save(rank, world_size, ckpt_dir, factory, momentum):
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(world_size, strategy=factory(), max_steps=STEPS))
    trainer.fit(ToyClassifier(momentum=momentum))
    path = os.path.join(ckpt_dir, f"{factory.__name__}.ckpt")
    trainer.save_checkpoint(path)  # ends with a barrier: the file is there for every rank
    return path


def _write_all(rank, world_size, ckpt_dir):
    entries = {}
    for name, (factory, momentum) in FACTORIES.items():
        path = _save(rank, world_size, ckpt_dir, factory, momentum)
        entries[name] = torch.load(path, weights_only=False)[CHECKPOINT_KEY]
    return entries


@pytest.fixture(scope="module")
def entries(tmp_path_factory):
    return run_distributed(_write_all, 2, str(tmp_path_factory.mktemp("ckpt")))[0]


@pytest.fixture
def entry(entries):
    return copy.deepcopy(entries["local_qsgd_ef"])  # the richest: comm and schedule state


def _error(entry) -> str:
    with pytest.raises(ValueError) as info:
        validate_entry(entry)
    return str(info.value)


def _assert_names(message: str, path: str, found: str | None = None) -> None:
    assert message.startswith(f"{path}: expected "), message
    if found is not None:
        assert f", got {found};" in message, message
    assert message.count("corrupted or was written by another version") == 1
    assert "del ckpt['lightning_compress']" in message  # how to resume without it


# -- valid entries pass, and every loader then accepts them ----------------------------------
@pytest.mark.parametrize("name", list(FACTORIES))
def test_real_entries_pass(entries, name):
    entry = entries[name]
    assert entry["world_size"] == 2
    validate_entry(entry)
    _load_everything(entry, FACTORIES[name][0])


def test_real_entries_hold_what_the_schema_checks(entries):
    comm = entries["topk_momentum"]["ranks"][1]["comm"]
    assert comm["residuals"] and comm["momentum"] and comm["ledger"]["steps"] == STEPS
    assert "generator" in entries["qsgd"]["ranks"][0]["comm"]
    sync = entries["local_qsgd_ef"]["ranks"][0]["sync"]
    assert {"layout", "local", "optimizer_states", "x0", "residual", "generator"} <= set(sync)
    assert {"u", "x0"} <= set(entries["slowmo"]["ranks"][0]["sync"])
    assert {"z", "v"} <= set(entries["overlap"]["ranks"][0]["sync"])
    # a rank holds a residual once one of its payloads was taken (which rank comes first is timing)
    assert any(rank["sync"]["residual"] is not None for rank in entries["backup"]["ranks"])


def _load_everything(entry, factory) -> None:
    """Run each loader on each rank's part, as far as it goes without a process group."""
    module = ToyClassifier()
    for rank in entry["ranks"]:
        strategy = factory()
        strategy.comm_state.load_state_dict(rank["comm"])
        # the per-parameter memories are read back at the first exchange: re-lay them out now
        names = [(n, p.numel()) for n, p in module.named_parameters()]
        strategy.comm_state._lay_out(tuple(names), (), torch.device("cpu"))
        strategy.sync.load_state_dict(rank["sync"])
        loaded = getattr(strategy.sync, "_restored", None)
        if loaded and isinstance(strategy.sync, BackupWorkers):  # laid out at the first encode
            limit = strategy.comm_state.min_compression_size
            large = [(n, p) for n, p in module.named_parameters() if p.numel() >= limit]
            strategy.sync._memory_for(large, torch.device("cpu"))
        elif loaded:  # PeriodicAveraging: applied in setup, once the model is wrapped
            ctx = SimpleNamespace(comm=strategy.comm_state, model=module, optimizers=[])
            strategy.sync._bind(module, ctx)
            # False (start fresh, with a warning) when the layout is gone: allowed, not a crash
            strategy.sync._restore(loaded, ctx)


# -- every corruption names its field ---------------------------------------------------------
def _set(path, value):
    def mutate(entry):
        *parents, last = path
        target = entry
        for key in parents:
            target = target[key]
        target[last] = value
        return entry

    return mutate


def _delete(path):
    def mutate(entry):
        *parents, last = path
        target = entry
        for key in parents:
            target = target[key]
        del target[last]
        return entry

    return mutate


def _fmt(path) -> str:
    return ROOT + "".join(f"[{k!r}]" for k in path)


R1 = ("ranks", 1)
COMM = ("ranks", 0, "comm")
SYNC = ("ranks", 0, "sync")

CORRUPTIONS = {
    # the cases of the issue
    "rank_none": (_set(R1, None), R1, "None"),
    "negative_steps": (_set((*R1, "optimizer_steps"), -3), (*R1, "optimizer_steps"), "-3"),
    "unknown_version": (_set(("version",), 2), ("version",), "2"),
    # wrong types and values at each level
    "version_str": (_set(("version",), "1"), ("version",), "'1'"),
    "version_bool": (_set(("version",), True), ("version",), "True"),
    "world_size_zero": (_set(("world_size",), 0), ("world_size",), "0"),
    "world_size_str": (_set(("world_size",), "2"), ("world_size",), "'2'"),
    "world_size_mismatch": (_set(("world_size",), 3), ("world_size",), "3"),
    "ranks_dict": (_set(("ranks",), {0: {}}), ("ranks",), "a dict with keys [0]"),
    "steps_float": (_set((*R1, "optimizer_steps"), 1.5), (*R1, "optimizer_steps"), "1.5"),
    "steps_bool": (_set((*R1, "optimizer_steps"), True), (*R1, "optimizer_steps"), "True"),
    "steps_differ": (_set((*R1, "optimizer_steps"), STEPS + 1), (*R1, "optimizer_steps"), str(STEPS + 1)),
    "comm_list": (_set((*R1, "comm"), []), (*R1, "comm"), "a list of 0 items"),
    "comm_step_negative": (_set((*COMM, "step"), -1), (*COMM, "step"), "-1"),
    "skipped_str": (_set((*COMM, "skipped_steps"), "0"), (*COMM, "skipped_steps"), "'0'"),
    "grad_norm_negative": (_set((*COMM, "last_grad_norm"), -1.0), (*COMM, "last_grad_norm"), "-1.0"),
    "residuals_list": (_set((*COMM, "residuals"), [1.0]), (*COMM, "residuals"), "a list of 1 item"),
    "residual_not_tensor": (
        _set((*COMM, "residuals", "net.0.weight"), [0.0]),
        (*COMM, "residuals", "net.0.weight"),
        None,
    ),
    "residual_int_tensor": (
        _set((*COMM, "residuals", "net.0.weight"), torch.zeros(3, dtype=torch.int64)),
        (*COMM, "residuals", "net.0.weight"),
        "an int64 tensor of shape (3,)",
    ),
    "residual_key_not_str": (_set((*COMM, "residuals", 7), torch.zeros(3)), (*COMM, "residuals"), None),
    # any generator's state is accepted (CPU 5056 bytes, CUDA 16); one of another size reseeds with
    # a warning (tests/comm/test_rng.py), a tensor of another type is refused
    "generator_float": (
        _set((*COMM, "generator"), torch.zeros(16)),
        (*COMM, "generator"),
        None,
    ),
    "ledger_none": (_set((*COMM, "ledger"), None), (*COMM, "ledger"), "None"),
    "ledger_field_negative": (
        _set((*COMM, "ledger", "total", "payload_bytes"), -8),
        (*COMM, "ledger", "total", "payload_bytes"),
        "-8",
    ),
    "ledger_field_inf": (
        _set((*COMM, "ledger", "last", "wire_bytes"), float("inf")),
        (*COMM, "ledger", "last", "wire_bytes"),
        "inf",
    ),
    "ledger_field_unknown": (_set((*COMM, "ledger", "total", "bits"), 1), (*COMM, "ledger", "total"), None),
    "sync_none": (_set((*R1, "sync"), None), (*R1, "sync"), "None"),
    "sync_version": (_set((*SYNC, "version"), 9), (*SYNC, "version"), "9"),
    "sync_layout_str": (_set((*SYNC, "layout"), "net"), (*SYNC, "layout"), "'net'"),
    "sync_layout_item": (_set((*SYNC, "layout", 0), ("net.0.weight",)), (*SYNC, "layout", 0), None),
    "sync_x0_size": (_set((*SYNC, "x0"), torch.zeros(5)), (*SYNC, "x0"), "a float32 tensor of shape (5,)"),
    "sync_local_2d": (_set((*SYNC, "local"), torch.zeros(2, 2)), (*SYNC, "local"), None),
    "sync_residual_list": (_set((*SYNC, "residual"), [0.0]), (*SYNC, "residual"), "a list of 1 item"),
    "sync_generator_float": (_set((*SYNC, "generator"), torch.zeros(4)), (*SYNC, "generator"), None),
    "sync_optimizer_states": (_set((*SYNC, "optimizer_states"), {}), (*SYNC, "optimizer_states"), None),
    "sync_optimizer_state": (
        _set((*SYNC, "optimizer_states", 0), None),
        (*SYNC, "optimizer_states", 0),
        "None",
    ),
    # missing keys at each level
    **{
        f"missing_{'_'.join(map(str, path))}": (_delete(path), path, "no such key")
        for path in [
            ("version",),
            ("world_size",),
            ("ranks",),
            (*R1, "optimizer_steps"),
            (*R1, "comm"),
            (*R1, "sync"),
            (*COMM, "step"),
            (*COMM, "ledger"),
            (*COMM, "residuals"),
            (*COMM, "ledger", "total"),
            (*COMM, "ledger", "steps"),
        ]
    },
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corruption_names_the_field(entry, name):
    mutate, path, found = CORRUPTIONS[name]
    _assert_names(_error(mutate(entry)), _fmt(path), found)


def test_the_issues_example_message(entry):
    entry["ranks"][1]["optimizer_steps"] = -3
    assert _error(entry).startswith(
        "checkpoint['lightning_compress']['ranks'][1]['optimizer_steps']: expected an int >= 0, got -3; "
    )


@pytest.mark.parametrize("entry_value", [None, [], "garbage", 1])
def test_not_a_dict(entry_value):
    _assert_names(_error(entry_value), ROOT)


def test_backup_workers_state_needs_its_residual(entries):
    entry = copy.deepcopy(entries["backup"])
    del entry["ranks"][1]["sync"]["residual"]
    _assert_names(_error(entry), _fmt((*R1, "sync", "residual")), "no such key")


def test_an_unknown_version_is_reported_before_anything_else(entry):
    entry["version"] = 2
    entry["ranks"] = None  # a newer layout: the version, not this, is what the user must hear about
    assert _error(entry).startswith(f"{ROOT}['version']: expected 1 ")


# -- the schema covers every field that state_dict writes -------------------------------------
FREE_FORM = {"compressor", "optimizer_states"}  # written for the record / checked as a whole


def _leaves(obj, path=()):
    """Paths of every value the schema should check (into dicts, and lists of dicts)."""
    if isinstance(obj, dict) and (not path or path[-1] not in FREE_FORM):
        for k, v in obj.items():
            yield from _leaves(v, (*path, k))
    elif (
        isinstance(obj, list) and obj and all(isinstance(v, dict) for v in obj) and path[-1] not in FREE_FORM
    ):
        for i, v in enumerate(obj):
            yield from _leaves(v, (*path, i))
    else:
        yield path


@pytest.mark.parametrize("name", list(FACTORIES))
def test_every_written_field_is_checked(entries, name):
    # a field state_dict writes that the schema does not know would accept anything: object() here
    paths = list(_leaves(entries[name]))
    assert len(paths) > 20
    for path in paths:
        entry = _set(path, object())(copy.deepcopy(entries[name]))
        _assert_names(_error(entry), _fmt(path))


def _dict_keys(obj, path=()):
    if isinstance(obj, dict) and (not path or path[-1] not in FREE_FORM):
        for k, v in obj.items():
            yield (*path, k)
            yield from _dict_keys(v, (*path, k))
    elif isinstance(obj, list) and path and path[-1] == "ranks":
        for i, v in enumerate(obj):
            yield from _dict_keys(v, (*path, i))


@pytest.mark.parametrize("name", list(FACTORIES))
def test_a_missing_key_is_named_or_the_loaders_do_without_it(entries, name):
    """Required keys (those the loaders index) are named; the others the loaders default."""
    for path in _dict_keys(entries[name]):
        entry = _delete(path)(copy.deepcopy(entries[name]))
        try:
            validate_entry(entry)
        except ValueError as err:
            _assert_names(str(err), _fmt(path), "no such key")
            continue
        _load_everything(entry, FACTORIES[name][0])


# -- end to end: a 2-rank resume from a corrupted checkpoint ----------------------------------
def _resume_corrupted(rank, world_size, ckpt_dir):
    path = _save(rank, world_size, ckpt_dir, qsgd, 0.9)
    checkpoint = torch.load(path, weights_only=False)
    checkpoint[CHECKPOINT_KEY]["ranks"][1] = None
    bad = os.path.join(ckpt_dir, f"bad{rank}.ckpt")  # each rank its own copy: no write race
    torch.save(checkpoint, bad)

    pl.seed_everything(0, verbose=False)
    strategy = CompressedDDP(
        compressor=QSGD(bits=4), min_compression_size=256, timeout=datetime.timedelta(seconds=60)
    )
    trainer = pl.Trainer(**trainer_kwargs(world_size, strategy=strategy, max_steps=2 * STEPS))
    start = time.monotonic()
    try:
        trainer.fit(ToyClassifier(momentum=0.9), ckpt_path=bad)
    except ValueError as err:
        return {"error": str(err), "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}


def test_resume_from_a_corrupted_checkpoint_fails_clearly_on_every_rank(tmp_path):
    import lightning_compress.strategy as strategy_module

    source = open(strategy_module.__file__).read()
    if "checkpoint_schema" not in source:
        pytest.skip("wired by strategy")
    results = run_distributed(_resume_corrupted, 2, str(tmp_path), timeout=180)
    for rank, res in enumerate(results):
        assert res["error"] is not None, f"rank {rank} resumed from a corrupted checkpoint"
        assert res["error"].startswith(f"{ROOT}['ranks'][1]: expected a dict"), (rank, res["error"])
        assert "connection closed" not in res["error"].lower()
        assert res["seconds"] < 30, (rank, res["seconds"])  # raised, not timed out in a collective
    assert re.sub(r"\s+", " ", results[0]["error"]) == re.sub(r"\s+", " ", results[1]["error"])
