"""Random bytes fed to payload decoding give a clean error or a tensor of the right shape, never a crash."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_compress.compressors import QSGD, CountSketch, NoCompression, TopK

CODECS = [
    QSGD(bits=3),
    QSGD(bits=8, norm="l2"),
    TopK(k=7),
    TopK(ratio=0.2, value_dtype=torch.float16),
    CountSketch(rows=3, cols=16, k=4),
    NoCompression(),
]


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: repr(c))
@settings(max_examples=60, deadline=None)
@given(numel=st.integers(1, 300), seed=st.integers(0, 2**31 - 1), wrong_size=st.booleans())
def test_random_bytes_decode_or_raise_cleanly(codec, numel, seed, wrong_size):
    size = codec.payload_nbytes(numel) + (3 if wrong_size else 0)
    buf = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    try:
        out = codec.decompress(codec.from_bytes(buf, (numel,), torch.float32))
    except ValueError:
        return  # a clean, named error
    assert not wrong_size, "a buffer of the wrong size must be refused"
    assert out.shape == (numel,) and out.dtype == torch.float32
