"""Momentum in the exchange: DGC's momentum correction and factor masking (arXiv 1712.01887) for
Top-K, Sketched SGD's ``u``/``v`` (arXiv 1903.04488) for the count sketch, on every coordinate."""

import warnings

import pytest
import torch
from launch import init_process_group, run_distributed
from lightning_ns import CompressedDDP
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_compress.compressors import QSGD, CountSketch, NoCompression, TopK
from lightning_compress.exchange import compressed_average
from lightning_compress.hooks import CompressionState, register_compression_hook
from lightning_compress.sync import LocalSGD

LR, M = 0.05, 0.9


def _model():
    torch.manual_seed(0)
    # weights 2048 and 4096 are compressed (min_compression_size=1000); 512 and the biases go dense
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))


def _batch(step, rank, same_data):
    g = torch.Generator().manual_seed(1000 * step + (0 if same_data else rank + 1))
    return torch.randn(16, 32, generator=g)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _loss(model, x):
    return model(x).pow(2).mean()


def _against_momentum_sgd(rank, world_size, codec, masking, warmup, steps):
    """Identical data on both ranks: the hook's run and a one-process torch.optim.SGD reference."""
    init_process_group(rank, world_size)
    ddp = DistributedDataParallel(_model(), bucket_cap_mb=0.005)
    state = CompressionState(
        codec, momentum=M, momentum_masking=masking, min_compression_size=1000, warmup_steps=warmup
    )
    register_compression_hook(ddp, state)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)  # the momentum lives in the exchange
    ref = _model()
    # with masking and k = d every compressed coordinate is sent and its momentum masked: plain
    # SGD there; what travels dense (the last weight, the biases) keeps plain momentum SGD
    compressed = [p for n, p in ref.named_parameters() if n in ("0.weight", "2.weight")]
    dense = [p for n, p in ref.named_parameters() if n not in ("0.weight", "2.weight")]
    ref_opt = torch.optim.SGD(
        [{"params": compressed, "momentum": 0.0 if masking else M}, {"params": dense}], lr=LR, momentum=M
    )
    for step in range(steps):
        x = _batch(step, rank, same_data=True)
        opt.zero_grad()
        _loss(ddp, x).backward()
        opt.step()
        ref_opt.zero_grad()
        _loss(ref, x).backward()
        ref_opt.step()
    return {"ours": _params(ddp.module), "ref": _params(ref), "compressed": state.last_compressed}


@pytest.mark.parametrize(
    "codec, masking",
    [
        (TopK(ratio=1.0), False),
        (CountSketch(rows=3, cols=64, ratio=1.0), False),
        (TopK(ratio=1.0), True),
        (TopK(ratio=1.0, per_layer=True), False),
    ],
    ids=["topk", "sketch", "topk-masking", "topk-per-layer"],
)
def test_k_equals_d_is_dense_momentum_sgd_bit_for_bit(codec, masking):
    # warm-up steps (everything dense, u sent as is), then compressed steps with u carried over.
    # The count sketch is exact at k = d whatever its table: the second round fetches the exact
    # value of every coordinate (candidates = min(d, P·k) = d).
    out = run_distributed(_against_momentum_sgd, 2, codec, masking, 0 if masking else 2, 6)
    assert out[0]["compressed"], "the last step must have gone through the codec"
    for r in out:
        for ours, ref in zip(r["ours"], r["ref"], strict=True):
            assert torch.equal(ours, ref)  # weights and biases alike


def _trace(rank, world_size, codec, masking, steps):
    """Drive the exchange directly and record u, v and the averages around every step."""
    init_process_group(rank, world_size)
    d = 3000
    state = CompressionState(codec, momentum=M, momentum_masking=masking, min_compression_size=0)
    gen = torch.Generator().manual_seed(rank)
    added, averages, records = torch.zeros(d), torch.zeros(d), []
    for _ in range(steps):
        g = torch.randn(d, generator=gen)
        u_old = state.velocity.residuals.get("compressed", torch.zeros(d)).clone()
        v_old = state.memory.residuals.get("compressed", torch.zeros(d)).clone()
        u_new = u_old * M + g
        averages += compressed_average(
            g,
            state.compressor,
            state.config,
            state.exchange_memory,
            None,
            state.ledger,
            state.generator(g.device),
        )
        added += u_new
        records.append(
            (
                u_new,
                v_old + u_new,
                state.velocity.residuals["compressed"].clone(),
                state.memory.residuals["compressed"].clone(),
            )
        )
    return {
        "added": added,
        "v": state.memory.residuals["compressed"].clone(),
        "avg": averages,
        "records": records,
        "k": codec.k_for(d),
    }


@pytest.mark.parametrize("masking", [True, False])
def test_topk_masking_and_conservation(masking):
    codec = TopK(ratio=0.02, per_layer=True)
    out = run_distributed(_trace, 2, codec, masking, 5)
    for r in out:
        for u_new, v_before, u_after, v_after in r["records"]:
            sent = (v_after == 0) & (v_before != 0)
            assert int(sent.sum()) == r["k"] == 20 + 40  # 2% of each layer
            assert torch.equal(v_after[~sent], v_before[~sent])
            if masking:
                assert torch.all(u_after[sent] == 0)
                assert torch.equal(u_after[~sent], u_new[~sent])
            else:
                assert torch.equal(u_after, u_new)
    # nothing lost: what every rank added to v is what was applied plus what is still in v
    applied = out[0]["avg"] * 2
    remaining = sum(r["added"] - r["v"] for r in out)
    torch.testing.assert_close(applied, remaining, rtol=0, atol=1e-4)


def test_sketch_masking_and_conservation():
    codec = CountSketch(rows=5, ratio=0.02, candidates=4)
    out = run_distributed(_trace, 2, codec, True, 5)
    for r in out:
        for u_new, v_before, u_after, v_after in r["records"]:
            sent = (v_after == 0) & (v_before != 0)
            assert int(sent.sum()) == r["k"]
            assert torch.all(u_after[sent] == 0)
            assert torch.equal(u_after[~sent], u_new[~sent])
    applied = out[0]["avg"] * 2
    remaining = sum(r["added"] - r["v"] for r in out)
    torch.testing.assert_close(applied, remaining, rtol=0, atol=1e-4)


def _resume(rank, world_size, codec):
    """Steps 0-5 in one go vs 0-2, state_dict/load_state_dict into fresh objects, then 3-5."""
    init_process_group(rank, world_size)

    def setup(bucket_cap_mb):
        ddp = DistributedDataParallel(_model(), bucket_cap_mb=bucket_cap_mb)
        state = CompressionState(codec, momentum=M, min_compression_size=1000, warmup_steps=1)
        register_compression_hook(ddp, state)
        return ddp, state, torch.optim.SGD(ddp.parameters(), lr=LR)

    def run(ddp, opt, steps):
        for step in steps:
            opt.zero_grad()
            _loss(ddp, _batch(step, rank, same_data=False)).backward()
            opt.step()

    ddp, state, opt = setup(0.005)
    run(ddp, opt, range(3))
    saved = {
        "model": {k: v.clone() for k, v in ddp.module.state_dict().items()},
        "comm": state.state_dict(),
    }
    run(ddp, opt, range(3, 6))
    # another bucket size: the memories are re-laid out by parameter name
    ddp2, state2, opt2 = setup(25)
    ddp2.module.load_state_dict(saved["model"])
    state2.load_state_dict(saved["comm"])
    run(ddp2, opt2, range(3, 6))
    return {"a": _params(ddp.module), "b": _params(ddp2.module), "saved": saved["comm"]}


def test_checkpoint_round_trip_gives_identical_next_steps():
    out = run_distributed(_resume, 2, TopK(ratio=0.05))
    for r in out:
        # u of every parameter (dense biases included), v of the compressed ones
        assert set(r["saved"]["momentum"]) == {f"{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
        assert set(r["saved"]["residuals"]) == {"0.weight", "2.weight"}
        for a, b in zip(r["a"], r["b"], strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("codec", [QSGD(bits=4), NoCompression()], ids=["qsgd", "none"])
def test_momentum_needs_a_sparsifying_codec(codec):
    with pytest.raises(ValueError, match=r"momentum=0.9 .*TopK and CountSketch"):
        CompressionState(codec, momentum=0.9)
    with pytest.raises(ValueError, match="momentum=0.9"):
        CompressedDDP(compressor=codec, momentum=0.9)
    CompressionState(codec, momentum=0.0)


def test_momentum_arguments_are_validated():
    for bad in (1.0, -0.1, True, "0.9"):
        with pytest.raises(ValueError, match=r"momentum must be a float in \[0, 1\)"):
            CompressionState(TopK(), momentum=bad)
    with pytest.raises(TypeError, match="momentum_masking"):
        CompressionState(TopK(), momentum=0.9, momentum_masking="yes")
    with pytest.raises(ValueError, match="error_feedback=False"):
        CompressedDDP(compressor=TopK(), momentum=0.9, error_feedback=False)
    with pytest.raises(ValueError, match="sync=LocalSGD"):
        CompressedDDP(compressor=TopK(), momentum=0.9, sync=LocalSGD(period=4))
    assert CompressionState(TopK(), momentum=0.9).error_feedback is True


def test_sketch_momentum_is_a_deprecated_alias():
    with pytest.warns(FutureWarning, match="sketch_momentum is deprecated"):
        strategy = CompressedDDP(compressor=CountSketch(), sketch_momentum=0.9)
    assert strategy.comm_state.momentum == strategy.comm_state.sketch_momentum == 0.9
    with pytest.raises(ValueError, match=r"sketch_momentum must be a float in \[0, 1\), got 1.5"):
        CompressedDDP(compressor=CountSketch(), sketch_momentum=1.5)
    with pytest.raises(ValueError, match="CountSketch only"), pytest.warns(FutureWarning):
        CompressionState(TopK(), sketch_momentum=0.9)
    with pytest.raises(ValueError, match="disagree"), pytest.warns(FutureWarning):
        CompressionState(CountSketch(), momentum=0.5, sketch_momentum=0.9)


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), "SGD(momentum=0.9)"),
        (lambda ps: torch.optim.Adam(ps), "Adam(betas=(0.9, 0.999)"),
        (lambda ps: torch.optim.SGD(ps, lr=0.1), None),
    ],
    ids=["sgd", "adam", "no-momentum"],
)
def test_double_momentum_warning(make, expected):
    strategy = CompressedDDP(compressor=TopK(), momentum=0.9)
    strategy.optimizers = [make(nn.Linear(2, 2).parameters())]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        strategy._warn_double_momentum()
    messages = [str(w.message) for w in caught]
    if expected is None:
        assert not messages
    else:
        assert len(messages) == 1
        assert "CompressedDDP(momentum=0.9)" in messages[0] and expected in messages[0]
        assert "applied twice" in messages[0] and "momentum to 0" in messages[0]


def _fit_warns(rank, world_size, momentum):
    from lightning_ns import pl
    from models import ToyClassifier, trainer_kwargs

    pl.seed_everything(0, verbose=False)
    strategy = CompressedDDP(compressor=TopK(ratio=0.05), momentum=0.9, min_compression_size=256)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pl.Trainer(**trainer_kwargs(world_size, strategy=strategy, max_steps=2)).fit(
            ToyClassifier(momentum=momentum)
        )
    return [str(w.message) for w in caught if "applied twice" in str(w.message)]


def test_warning_fires_at_setup_in_a_real_fit():
    out = run_distributed(_fit_warns, 2, 0.9)
    assert len(out[0]) == 1 and "SGD(momentum=0.9)" in out[0][0]
    assert out[1] == []  # rank zero only
    assert run_distributed(_fit_warns, 2, 0.0)[0] == []


def _per_layer_bytes(rank, world_size):
    init_process_group(rank, world_size)
    ddp = DistributedDataParallel(_model(), bucket_cap_mb=0.005)
    state = CompressionState(TopK(ratio=0.01, per_layer=True), momentum=M, min_compression_size=1000)
    register_compression_hook(ddp, state)
    _loss(ddp, _batch(0, rank, same_data=False)).backward()
    return {"last": state.ledger.last, "segments": state.compressor.segments}


def test_per_layer_payload_size_is_exact_in_the_hook():
    out = run_distributed(_per_layer_bytes, 2)
    # compressed: 0.weight (2048) and 2.weight (4096); 1% of each, rounded up: 21 + 41 coordinates,
    # float32 values and int16 indices (6144 <= 2**15); dense: 512 + 64 + 64 + 8 floats, plus the
    # non-finite flag riding the same allreduce (no policy: no squared norm)
    topk = (21 + 41) * (4 + 2)
    for r in out:
        assert r["segments"] == (2048, 4096)
        assert TopK(ratio=0.01, per_layer=True).payload_nbytes(6144) == 62 * 6  # one layer: 62 too here
        assert r["last"].payload_bytes == topk + 4 * (512 + 64 + 64 + 8 + 1)


def _topk_mc():
    return CompressedDDP(compressor=TopK(ratio=0.05), momentum=0.9, min_compression_size=256, warmup_steps=3)


def _sketch_mc():
    return CompressedDDP(compressor=CountSketch(rows=3, ratio=0.05), momentum=0.9, min_compression_size=256)


def _trainer_resume(rank, world_size, ckpt_dir, factory):
    import os

    from lightning_ns import pl
    from models import ToyClassifier, flat_params, trainer_kwargs

    def fit(max_epochs, ckpt_path=None):
        pl.seed_everything(0, verbose=False)  # DistributedSampler reads PL_GLOBAL_SEED
        model = ToyClassifier(n=1024, momentum=0.0)
        trainer = pl.Trainer(
            **trainer_kwargs(world_size, strategy=factory(), max_epochs=max_epochs, max_steps=-1)
        )
        trainer.fit(model, ckpt_path=ckpt_path)
        return model, trainer

    full, _ = fit(2)
    _, trainer = fit(1)
    path = os.path.join(ckpt_dir, "half.ckpt")
    trainer.save_checkpoint(path)
    resumed, _ = fit(2, path)
    saved = torch.load(path, weights_only=False)["lightning_compress"]["ranks"][rank]["comm"]
    return {
        "full": flat_params(full),
        "resumed": flat_params(resumed),
        "u_norm": float(sum(v.norm() for v in saved["momentum"].values())),
        "u_names": set(saved["momentum"]),
    }


@pytest.mark.parametrize("factory", [_topk_mc, _sketch_mc], ids=["topk", "sketch"])
def test_trainer_resume_with_momentum_equals_uninterrupted(tmp_path, factory):
    out = run_distributed(_trainer_resume, 2, str(tmp_path), factory)
    for r in out:
        assert torch.equal(r["full"], r["resumed"]), (r["full"] - r["resumed"]).abs().max()
        assert r["u_norm"] > 0 and {"net.0.bias", "net.4.weight", "net.2.weight"} <= r["u_names"]
