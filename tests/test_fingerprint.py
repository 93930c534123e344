"""Settings that differ across ranks fail at set-up, on every rank, naming the field (issue 13, item 3)."""

from __future__ import annotations

import datetime
import time

import pytest
import torch
import torch.distributed as dist
from launch import init_process_group, run_distributed
from lightning_ns import CompressedDDP, pl
from models import ToyClassifier, trainer_kwargs

from lightning_compress.compressors import QSGD, CountSketch, NoCompression, TopK
from lightning_compress.fingerprint import check_settings_agree, describe_differences, settings_of
from lightning_compress.hooks import CompressionState
from lightning_compress.policies import AdaptiveTopKPolicy, DQPolicy
from lightning_compress.sync import BackupWorkers, LocalSGD, OverlapLocalSGD, SlowMo

# -- settings_of: one process ----------------------------------------------------------------------


def test_qsgd_strategy_fields():
    s = settings_of(CompressedDDP(compressor=QSGD(bits=4, bucket_size=256), min_compression_size=512))
    assert s["compressor"] == "QSGD"
    assert (s["compressor.bits"], s["compressor.bucket_size"], s["compressor.norm"]) == (4, 256, "max")
    assert s["error_feedback"] is False  # resolved: off for an unbiased codec
    assert s["min_compression_size"] == 512
    assert (s["warmup_steps"], s["momentum"], s["momentum_masking"], s["nonfinite"]) == (0, 0.0, True, "skip")
    assert s["sync"] == "SyncSchedule" and s["policy"] is None
    assert all(v is None or isinstance(v, (str, int, float, bool)) for v in s.values())


def test_topk_and_count_sketch_fields():
    s = settings_of(CompressedDDP(compressor=TopK(ratio=0.05, value_dtype=torch.float16)))
    assert s["compressor"] == "TopK" and s["compressor.ratio"] == 0.05 and s["compressor.k"] is None
    assert s["compressor.value_dtype"] == "torch.float16" and s["compressor.per_layer"] is False
    assert s["error_feedback"] is True  # resolved: on for a biased codec
    s = settings_of(CountSketch(rows=3, k=10, candidates=2, seed=7))
    assert s == {
        "compressor": "CountSketch",
        "compressor.rows": 3,
        "compressor.cols": None,
        "compressor.k": 10,
        "compressor.ratio": None,
        "compressor.candidates": 2,  # stored as _candidates, next to a candidates() method
        "compressor.seed": 7,  # the hash seed must agree, unlike the exchange's rounding seed
    }


def test_schedule_fields():
    s = settings_of(CompressedDDP(compressor="none", sync=LocalSGD(period=3, warmup_steps=2)))
    assert s["sync"] == "LocalSGD" and s["compressor"] == "NoCompression"
    assert (s["sync.period"], s["sync.warmup_steps"], s["sync.compress_average"]) == (3, 2, None)
    s = settings_of(SlowMo(period=4, momentum=0.6, lr=2.0, base="local_sgd"))
    assert (s["sync"], s["sync.period"], s["sync.momentum"], s["sync.lr"]) == ("SlowMo", 4, 0.6, 2.0)
    assert s["sync.base"] == "local_sgd" and s["sync.momentum_buffers"] == "zero"
    s = settings_of(OverlapLocalSGD(period=2, pullback=0.5))
    assert (s["sync.period"], s["sync.pullback"], s["sync.momentum"]) == (2, 0.5, 0.7)
    s = settings_of(BackupWorkers(backups=1, timeout=5.0, max_lag=8))
    assert (s["sync.backups"], s["sync.max_lag"], s["sync.skip_late_steps"]) == (1, 8, None)
    assert "sync.timeout" not in s  # a local deadline, may differ per rank


def test_policy_fields_and_partial_dicts():
    s = settings_of(policy=DQPolicy(mean_bits=3.0, max_bits=6))
    assert s["policy"] == "DQPolicy" and s["policy.mean_bits"] == 3.0 and s["policy.max_bits"] == 6
    assert all(k == "policy" or k.startswith("policy.") for k in s)
    assert settings_of(policy=None) == {"policy": None}

    def schedule(step):
        return 1.0

    s = settings_of(AdaptiveTopKPolicy(mean_ratio=0.02, lr_schedule=schedule))
    assert (s["policy.mean_ratio"], s["policy.min_ratio"], s["policy.max_ratio"]) == (0.02, 0.005, 0.08)
    assert s["policy.lr_schedule"].endswith("schedule") and "0x" not in s["policy.lr_schedule"]


def test_policy_on_the_state_and_named_override():
    state = CompressionState(QSGD(bits=4))
    state.policy = DQPolicy(mean_bits=4.0)
    s = settings_of(state)
    assert s["policy"] == "DQPolicy" and s["compressor.bits"] == 4
    s = settings_of(state, policy=None)  # a later part replaces the whole field
    assert s["policy"] is None and not any(k.startswith("policy.") for k in s)


def test_per_rank_settings_are_left_out():
    # the rounding seed is combined with the rank anyway; the process group is an object
    a = settings_of(CompressedDDP(compressor=QSGD(bits=4), seed=0))
    b = settings_of(CompressedDDP(compressor=QSGD(bits=4), seed=1))
    assert a == b and "seed" not in a
    assert "process_group" not in settings_of(CompressionState(NoCompression(), process_group=None))
    # error_feedback=None and its resolved value configure the same exchange
    assert settings_of(CompressedDDP(compressor=TopK())) == settings_of(
        CompressedDDP(compressor=TopK(), error_feedback=True)
    )


def test_unknown_part_raises_type_error():
    with pytest.raises(TypeError, match="settings_of takes"):
        settings_of(object())


def test_message_groups_ranks_and_hides_children_of_a_differing_type():
    q4 = settings_of(CompressedDDP(compressor=QSGD(bits=4)))
    q8 = settings_of(CompressedDDP(compressor=QSGD(bits=8)))
    tk = settings_of(CompressedDDP(compressor=TopK()))
    msg = describe_differences([q4, q4, q4, q8])
    assert msg.startswith(
        "CompressedDDP settings differ across ranks: compressor.bits is 4 on ranks 0-2, 8 on rank 3"
    )
    msg = describe_differences([q4, tk], what="CommunicationMonitor")
    assert "compressor is QSGD on rank 0, TopK on rank 1" in msg
    assert "compressor.bits" not in msg and "compressor.ratio" not in msg
    assert "error_feedback is False on rank 0, True on rank 1" in msg
    assert "CommunicationMonitor(...)" in msg
    msg = describe_differences([{"a": 1}, {"a": 1, "b": "x"}])
    assert "b is (not set) on rank 0, 'x' on rank 1" in msg


def test_no_process_group_is_a_no_op():
    assert not dist.is_initialized()
    check_settings_agree({"compressor.bits": 4})


@pytest.mark.parametrize(
    ("backend", "expected"),
    [("gloo", "cpu"), ("cpu:gloo,cuda:nccl", "cpu"), ("mpi", "cpu"), ("nccl", "cuda"), ("xccl", "xpu")],
)
def test_exchange_device_follows_the_backend(monkeypatch, backend, expected):
    from lightning_compress import fingerprint

    monkeypatch.setattr(fingerprint.dist, "get_backend", lambda group=None: backend)
    # no accelerator in this process: an accelerator-only backend still names its device type
    monkeypatch.setattr(fingerprint.torch.accelerator, "current_accelerator", lambda *a, **k: None)
    assert fingerprint._exchange_device(None).type == expected


# -- check_settings_agree across real gloo ranks ---------------------------------------------------


def _strategy_case(rank, case):
    """Build this rank's settings for ``case`` from really constructed objects."""
    other = rank != 0
    if case == "identical":
        return settings_of(CompressedDDP(compressor=QSGD(bits=4), sync=LocalSGD(period=2)))
    if case == "seed_and_timeout":  # may differ per rank
        return settings_of(
            CompressedDDP(compressor=TopK(), seed=rank, sync=BackupWorkers(1, timeout=5.0 + rank))
        )
    if case == "bits":
        return settings_of(CompressedDDP(compressor=QSGD(bits=8 if other else 4)))
    if case == "bucket_size":
        return settings_of(CompressedDDP(compressor=QSGD(bucket_size=256 if other else 512)))
    if case == "min_compression_size":
        return settings_of(CompressedDDP(min_compression_size=512 if other else 1024))
    if case == "codec":
        return settings_of(CompressedDDP(compressor=TopK() if other else QSGD(bits=8)))
    if case == "period":
        return settings_of(CompressedDDP(compressor="none", sync=LocalSGD(period=3 if other else 2)))
    if case == "error_feedback":
        return settings_of(CompressedDDP(compressor=QSGD(bits=8), error_feedback=not other))
    if case == "policy_budget":
        return settings_of(policy=DQPolicy(mean_bits=3.0 if other else 4.0))
    if case == "policy_on_one_rank":
        strategy = CompressedDDP(compressor=QSGD(bits=4))
        return settings_of(strategy, policy=None if other else DQPolicy(mean_bits=4.0))
    raise AssertionError(case)


#: case -> (field, rank 0's value, the other ranks' value) in the message; None: must pass
CASES = {
    "identical": None,
    "seed_and_timeout": None,
    "bits": ("compressor.bits", "4", "8"),
    "bucket_size": ("compressor.bucket_size", "512", "256"),
    "min_compression_size": ("min_compression_size", "1024", "512"),
    "codec": ("compressor", "QSGD", "TopK"),
    "period": ("sync.period", "2", "3"),
    "error_feedback": ("error_feedback", "True", "False"),
    "policy_budget": ("policy.mean_bits", "4.0", "3.0"),
    "policy_on_one_rank": ("policy", "DQPolicy", "None"),
}


def _all_cases(rank, world_size):
    # a short process-group timeout: a check that hung would fail in seconds, not 30 minutes
    init_process_group(rank, world_size, timeout_s=30.0)
    out = {}
    for case in CASES:
        settings = _strategy_case(rank, case)
        start = time.perf_counter()
        try:
            check_settings_agree(settings)
            out[case] = (None, time.perf_counter() - start)
        except ValueError as err:
            out[case] = (str(err), time.perf_counter() - start)
    return out


@pytest.fixture(scope="module")
def two_rank_results():
    return run_distributed(_all_cases, 2, timeout=120)


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks(two_rank_results, case):
    expected = CASES[case]
    messages = [r[case][0] for r in two_rank_results]
    for _, elapsed in (r[case] for r in two_rank_results):
        assert elapsed < 20.0
    if expected is None:
        assert messages == [None, None]
        return
    field, mine, theirs = expected
    assert messages[0] is not None and messages[0] == messages[1], "every rank raises the same error"
    assert f"{field} is {mine} on rank 0, {theirs} on rank 1" in messages[0]
    assert messages[0].startswith("CompressedDDP settings differ across ranks: ")


def _three_ranks(rank, world_size):
    init_process_group(rank, world_size, timeout_s=30.0)
    out = {}
    check_settings_agree(_strategy_case(rank, "identical"))
    period = 3 if rank == 2 else 2
    start = time.perf_counter()
    try:
        check_settings_agree(settings_of(LocalSGD(period=period)), what="CompressedDDP")
    except ValueError as err:
        out["default"] = (str(err), time.perf_counter() - start)
    # a subgroup of ranks 1 and 2: messages name global ranks; rank 0 is not involved
    group = dist.new_group([1, 2], timeout=datetime.timedelta(seconds=30))
    if rank != 0:
        try:
            check_settings_agree(settings_of(LocalSGD(period=period)), group=group, what="Sub")
        except ValueError as err:
            out["sub"] = str(err)
    dist.barrier()
    return out


def test_three_ranks_and_a_subgroup():
    out = run_distributed(_three_ranks, 3, timeout=120)
    messages = {r["default"][0] for r in out}
    assert len(messages) == 1
    assert "sync.period is 2 on ranks 0-1, 3 on rank 2" in messages.pop()
    assert all(r["default"][1] < 20.0 for r in out)
    assert "sub" not in out[0]
    assert out[1]["sub"] == out[2]["sub"]
    assert "Sub settings differ across ranks: sync.period is 2 on rank 1, 3 on rank 2" in out[1]["sub"]


# -- through a real Trainer (once the strategy and the monitor call the check) ---------------------


def _fit_until_it_raises(world_size, strategy, callbacks=()):
    pl.seed_everything(0, verbose=False)
    kwargs = trainer_kwargs(world_size, strategy=strategy, max_steps=4, callbacks=list(callbacks))
    trainer = pl.Trainer(**kwargs)
    start = time.perf_counter()
    try:
        trainer.fit(ToyClassifier())
    except ValueError as err:
        return {"raised": str(err), "elapsed": time.perf_counter() - start}
    return {"raised": None, "elapsed": time.perf_counter() - start}


def _fit_bits(rank, world_size):
    bits = 4 if rank == 0 else 8
    strategy = CompressedDDP(compressor=QSGD(bits=bits), timeout=datetime.timedelta(seconds=60))
    return _fit_until_it_raises(world_size, strategy)


def _fit_policy(rank, world_size):
    from lightning_ns import CommunicationMonitor

    monitor = CommunicationMonitor(policy=DQPolicy(mean_bits=4.0 if rank == 0 else 3.0), summary=False)
    return _fit_until_it_raises(world_size, "ddp", [monitor])


@pytest.mark.parametrize(
    "fit, message",
    [
        (_fit_bits, "compressor.bits is 4 on rank 0, 8 on rank 1"),
        (_fit_policy, "policy.mean_bits is 4.0 on rank 0, 3.0 on rank 1"),
    ],
    ids=["strategy_bits", "monitor_policy"],
)
def test_trainer_with_settings_that_differ_fails_on_every_rank(fit, message):
    out = run_distributed(fit, 2, timeout=180)
    for r in out:
        assert r["raised"] is not None and message in r["raised"]
        assert r["elapsed"] < 20.0
