"""The schedules' update math on toy tensors, against direct reference computations (no process group)."""

from __future__ import annotations

import pickle

import pytest
import torch

from lightning_compress.sync import LocalSGD, OverlapLocalSGD, SlowMo
from lightning_compress.sync.averaging import divide_by_lr, learning_rates, optimizer_buffers
from lightning_compress.sync.overlap import anchor_step_
from lightning_compress.sync.slowmo import slow_momentum_step_

D = 10
TARGETS = torch.randn(3, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def grad(x, rank):
    """Gradient of rank ``rank``'s quadratic 0.5·||x − t_rank||² (non-IID: one target per rank)."""
    return x - TARGETS[rank]


def simulate_slowmo(x_init, steps, period, lr, alpha, beta):
    """SlowMo on W simulated ranks through the package's outer step (float64)."""
    world = TARGETS.shape[0]
    x0 = x_init.clone()
    u = torch.zeros_like(x0)
    xs = [x0.clone() for _ in range(world)]
    for step in range(steps):
        xs = [x - lr * grad(x, r) for r, x in enumerate(xs)]
        if (step + 1) % period == 0:
            x_avg = torch.stack(xs).mean(0)
            slow_momentum_step_(x0, x_avg, u, lr, alpha, beta)
            xs = [x0.clone() for _ in range(world)]
    return x0


def test_slowmo_beta0_alpha1_is_the_average():
    g = torch.Generator().manual_seed(1)
    x0, x_avg = torch.randn(D, generator=g), torch.randn(D, generator=g)
    u = torch.randn(D, generator=g)
    out = slow_momentum_step_(x0.clone(), x_avg, u, 0.05, slow_lr=1.0, slow_momentum=0.0)
    torch.testing.assert_close(out, x_avg)


def test_slowmo_beta0_alpha1_equals_local_sgd():
    x_init = torch.zeros(D, dtype=torch.float64)
    world, period, lr = TARGETS.shape[0], 4, 0.1
    xs = [x_init.clone() for _ in range(world)]
    for step in range(12):
        xs = [x - lr * grad(x, r) for r, x in enumerate(xs)]
        if (step + 1) % period == 0:
            avg = torch.stack(xs).mean(0)
            xs = [avg.clone() for _ in range(world)]
    torch.testing.assert_close(simulate_slowmo(x_init, 12, period, lr, 1.0, 0.0), xs[0])


def test_slowmo_period1_alpha1_beta0_equals_synchronous_sgd():
    x_init = torch.zeros(D, dtype=torch.float64)
    x, lr = x_init.clone(), 0.1
    for _ in range(7):
        x = x - lr * torch.stack([grad(x, r) for r in range(TARGETS.shape[0])]).mean(0)
    torch.testing.assert_close(simulate_slowmo(x_init, 7, 1, lr, 1.0, 0.0), x)


def test_slowmo_matches_the_paper_recursion():
    # Algorithm 1 of arXiv 1910.00643 written out directly: u_{t+1} = β u_t + (x_{t,0} − x̄_{t,τ})/γ,
    # x_{t+1,0} = x_{t,0} − α γ u_{t+1}
    lr, alpha, beta, period = 0.05, 1.5, 0.7, 3
    x_init = torch.ones(D, dtype=torch.float64)
    x_slow, u = x_init.clone(), torch.zeros(D, dtype=torch.float64)
    for _ in range(4):
        locals_ = []
        for r in range(TARGETS.shape[0]):
            x = x_slow.clone()
            for _ in range(period):
                x = x - lr * grad(x, r)
            locals_.append(x)
        x_bar = sum(locals_) / len(locals_)
        u = beta * u + (x_slow - x_bar) / lr
        x_slow = x_slow - alpha * lr * u
    torch.testing.assert_close(simulate_slowmo(x_init, 4 * period, period, lr, alpha, beta), x_slow)
    # and the slow momentum really changes the result
    assert not torch.allclose(simulate_slowmo(x_init, 4 * period, period, lr, 1.0, 0.0), x_slow)


def test_slowmo_per_element_learning_rates_and_frozen_elements():
    x0 = torch.tensor([1.0, 2.0, 3.0])
    x_avg = torch.tensor([0.5, 1.0, 3.0])
    u = torch.tensor([1.0, 1.0, 1.0])
    lr = torch.tensor([0.1, 0.5, 0.0])  # the third element's group has lr 0: frozen
    slow_momentum_step_(x0, x_avg, u, lr, slow_lr=1.0, slow_momentum=0.5)
    torch.testing.assert_close(u, torch.tensor([0.5 + 5.0, 0.5 + 2.0, 0.5]))
    torch.testing.assert_close(x0, torch.tensor([1.0 - 0.1 * 5.5, 2.0 - 0.5 * 2.5, 3.0]))
    assert torch.isfinite(u).all()


def test_divide_by_lr_handles_zero():
    assert torch.equal(divide_by_lr(torch.ones(3), 0.0), torch.zeros(3))
    out = divide_by_lr(torch.ones(2), torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(out, torch.tensor([2.0, 0.0]))


def test_anchor_step_matches_direct_computation():
    g = torch.Generator().manual_seed(2)
    n_params, n_buffers = 6, 2
    x = torch.randn(n_params + n_buffers, generator=g)
    z = torch.randn(n_params + n_buffers, generator=g)
    v = torch.randn(n_params, generator=g)
    lr, alpha, beta = 0.1, 0.6, 0.7
    x_ref = (1 - alpha) * x + alpha * z
    v_ref = beta * v + (z[:n_params] - x_ref[:n_params]) / lr
    send_ref = torch.cat([z[:n_params] - lr * v_ref, x_ref[n_params:]])
    send = anchor_step_(x, z, v, lr, alpha, beta)
    torch.testing.assert_close(x, x_ref)
    torch.testing.assert_close(v, v_ref)
    torch.testing.assert_close(send, send_ref)


def test_anchor_step_without_momentum_sends_the_pulled_back_model():
    x, z = torch.tensor([2.0, 4.0]), torch.tensor([0.0, 0.0])
    send = anchor_step_(x, z, torch.zeros(2), 0.1, pullback=0.5, momentum=0.0)
    torch.testing.assert_close(x, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(send, x)


def test_overlap_simulation_converges_to_the_average_optimum():
    # Overlap-Local-SGD on W simulated ranks; the anchor used at a sync point is the average launched
    # at the previous one. On sum of quadratics the optimum is the mean target.
    world, period, lr = TARGETS.shape[0], 2, 0.05
    xs = [torch.zeros(D, dtype=torch.float64) for _ in range(world)]
    z = torch.zeros(D, dtype=torch.float64)
    vs = [torch.zeros(D, dtype=torch.float64) for _ in range(world)]
    pending = None
    for step in range(4000):
        xs = [x - lr * grad(x, r) for r, x in enumerate(xs)]
        if (step + 1) % period == 0:
            if pending is not None:
                z = pending
            sends = [anchor_step_(xs[r], z, vs[r], lr, 0.6, 0.7) for r in range(world)]
            pending = torch.stack(sends).mean(0)
    optimum = TARGETS.mean(0)
    assert (z - optimum).norm() < 0.05 * optimum.norm(), (z - optimum).norm()


def test_learning_rates_per_group():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.2}])
    lr = learning_rates([opt], [a, b])
    torch.testing.assert_close(lr, torch.tensor([0.1, 0.1, 0.2, 0.2, 0.2]))
    assert learning_rates([torch.optim.SGD([a, b], lr=0.3)], [a, b]) == 0.3
    frozen = torch.nn.Parameter(torch.zeros(1))
    torch.testing.assert_close(learning_rates([opt], [a, frozen]), torch.tensor([0.1, 0.1, 0.0]))


def test_optimizer_buffers_skip_step_counters():
    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.Adam([p], lr=0.1)
    p.grad = torch.ones(4)
    opt.step()
    bufs = optimizer_buffers([opt])
    assert len(bufs) == 2 and all(b.shape == p.shape for b in bufs)  # exp_avg, exp_avg_sq; not step


@pytest.mark.parametrize(
    "factory, match",
    [
        (lambda: LocalSGD(period=0), "period"),
        (lambda: LocalSGD(period=2.5), "period"),
        (lambda: LocalSGD(warmup_steps=-1), "warmup_steps"),
        (lambda: LocalSGD(compress_average="yes"), "compress_average"),
        (lambda: SlowMo(momentum=1.0), "momentum"),
        (lambda: SlowMo(momentum=-0.1), "momentum"),
        (lambda: SlowMo(lr=0.0), "lr"),
        (lambda: SlowMo(base="sgp"), "base"),
        (lambda: SlowMo(momentum_buffers="reset"), "momentum_buffers"),
        (lambda: OverlapLocalSGD(pullback=0.0), "pullback"),
        (lambda: OverlapLocalSGD(pullback=1.5), "pullback"),
        (lambda: OverlapLocalSGD(momentum=1.0), "momentum"),
        (lambda: OverlapLocalSGD(period=True), "period"),
        (lambda: OverlapLocalSGD(compress_average=1), "compress_average"),
    ],
)
def test_bad_arguments_name_the_parameter(factory, match):
    with pytest.raises((ValueError, TypeError), match=match):
        factory()


def test_range_is_in_the_message():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        SlowMo(momentum=2)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        OverlapLocalSGD(pullback=0)


def test_schedule_decisions_follow_the_step_counter():
    s = LocalSGD(period=3, warmup_steps=2)
    assert [s.communicates(t) for t in range(5)] == [True, True, False, False, False]
    assert [t for t in range(12) if s.is_sync_step(t)] == [4, 7, 10]
    # after `steps_done` steps: identical replicas during the warm-up and right after sync points
    differ = [s.ranks_may_differ(n) for n in range(9)]
    assert differ == [False, False, False, True, True, False, True, True, False]
    o = OverlapLocalSGD(period=2)
    assert [t for t in range(6) if o.is_sync_step(t)] == [1, 3, 5]
    assert o.ranks_may_differ(2) and not o.ranks_may_differ(0)


def test_slowmo_defaults_follow_the_paper():
    s = SlowMo()
    assert (s.period, s.lr, s.momentum_buffers) == (12, 1.0, "zero")
    assert 0.4 <= s.momentum <= 0.8
    o = OverlapLocalSGD()
    assert (o.period, o.pullback, o.momentum) == (2, 0.6, 0.7)


@pytest.mark.parametrize("schedule", [LocalSGD(period=4), SlowMo(period=4), OverlapLocalSGD()])
def test_pickles_without_process_group(schedule):
    clone = pickle.loads(pickle.dumps(schedule))
    assert repr(clone) == repr(schedule)
