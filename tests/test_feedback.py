import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_compress.compressors import TopK
from lightning_compress.feedback import ErrorFeedback


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 500), steps=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_conservation_delta_plus_residual_equals_grad_plus_old_residual(n, steps, seed):
    g = torch.Generator().manual_seed(seed)
    ef = ErrorFeedback()
    codec = TopK(ratio=0.1)
    for _ in range(steps):
        grad = torch.randn(n, generator=g)
        old = ef.residuals.get("b", torch.zeros(n)).clone()
        p = ef.compensate("b", grad)
        delta = codec.decompress(codec.compress(p))
        ef.update("b", p, delta)
        torch.testing.assert_close(delta + ef.residuals["b"], grad + old, rtol=0, atol=1e-6)


def test_nothing_is_lost_over_time():
    # the sum of everything sent plus the final residual equals the sum of all gradients
    ef = ErrorFeedback()
    codec = TopK(k=3)
    grads = [torch.randn(50) for _ in range(20)]
    sent = torch.zeros(50)
    for grad in grads:
        p = ef.compensate("x", grad)
        delta = codec.decompress(codec.compress(p))
        ef.update("x", p, delta)
        sent += delta
    torch.testing.assert_close(sent + ef.residuals["x"], torch.stack(grads).sum(0), rtol=1e-5, atol=1e-5)


def test_bf16_gradients_keep_float32_residuals():
    ef = ErrorFeedback()
    grad = torch.randn(64).to(torch.bfloat16)
    p = ef.compensate("b", grad)
    assert p.dtype == torch.float32
    ef.update("b", p, torch.zeros(64))
    assert ef.residuals["b"].dtype == torch.float32


def test_state_dict_round_trip_and_shape_check():
    ef = ErrorFeedback()
    p = ef.compensate("b", torch.ones(4))
    ef.update("b", p, torch.zeros(4))
    clone = ErrorFeedback()
    clone.load_state_dict(ef.state_dict())
    torch.testing.assert_close(clone.residuals["b"], torch.ones(4))
    with pytest.raises(ValueError, match="shape"):
        clone.compensate("b", torch.ones(5))
    with pytest.raises(TypeError, match="tensor"):
        clone.load_state_dict({"b": [1.0]})
