"""The rounding generator: restored exactly where the state fits, reseeded loudly where it does not."""

import logging

import torch

from lightning_compress.comm.rng import seeded_generator


def test_saved_state_restores_the_draws_exactly():
    gen = seeded_generator(torch.device("cpu"), 3)
    torch.rand(100, generator=gen)
    state = gen.get_state()
    expected = torch.rand(5, generator=gen)
    again = seeded_generator(torch.device("cpu"), 99, state)  # the state wins over the seed
    assert torch.equal(torch.rand(5, generator=again), expected)


def test_state_from_another_kind_of_device_keeps_the_seed_and_warns(caplog):
    cuda_like = torch.zeros(16, dtype=torch.uint8)  # a CUDA generator's state: Philox seed and offset
    with caplog.at_level(logging.WARNING, logger="lightning_compress.comm.rng"):
        gen = seeded_generator(torch.device("cpu"), 5, cuda_like)
    assert "another kind of device" in caplog.text
    fresh = torch.Generator().manual_seed(5)
    assert torch.equal(torch.rand(4, generator=gen), torch.rand(4, generator=fresh))
