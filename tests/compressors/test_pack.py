import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_compress.compressors.pack import pack_bits, packed_nbytes, unpack_bits


def reference_pack(codes: list[int], bits: int) -> list[int]:
    """The documented wire format, one bit at a time: code i at stream bits [i*B, (i+1)*B)."""
    stream = [(c >> j) & 1 for c in codes for j in range(bits)]
    stream += [0] * (-len(codes) % 8 * bits)  # zero codes pad the last group of 8
    return [sum(stream[i + j] << j for j in range(8)) for i in range(0, len(stream), 8)]


def random_codes(count: int, bits: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**bits, (count,), dtype=torch.uint8, generator=generator)


@pytest.mark.parametrize("bits", range(1, 9))
def test_round_trip_every_size_up_to_100(bits):
    for count in range(0, 101):
        codes = random_codes(count, bits, seed=count)
        packed = pack_bits(codes, bits)
        assert packed.dtype == torch.uint8 and packed.dim() == 1
        assert packed.numel() == -(-count // 8) * bits == packed_nbytes(count, bits)
        assert torch.equal(unpack_bits(packed, bits, count), codes)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [1, 7, 9, 63, 65, 1000, 100_003])
def test_matches_the_documented_bit_stream(bits, count):
    codes = random_codes(count, bits, seed=bits)
    packed = pack_bits(codes, bits)
    if count <= 1000:
        assert packed.tolist() == reference_pack(codes.tolist(), bits)
    assert torch.equal(unpack_bits(packed, bits, count), codes)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_round_trip_hypothesis(bits, data):
    codes = data.draw(st.lists(st.integers(0, 2**bits - 1), max_size=70))
    tensor = torch.tensor(codes, dtype=torch.uint8)
    packed = pack_bits(tensor, bits)
    assert packed.tolist() == reference_pack(codes, bits)
    assert unpack_bits(packed, bits, len(codes)).tolist() == codes


def test_known_layouts():
    # 4 bits: two codes per byte, the first in the low nibble.
    assert pack_bits(torch.tensor([1, 2, 15, 0], dtype=torch.uint8), 4).tolist() == [0x21, 0x0F, 0, 0]
    # 3 bits: 8 codes in exactly 3 bytes.
    packed = pack_bits(torch.tensor([7, 0, 0, 0, 0, 0, 0, 7], dtype=torch.uint8), 3)
    assert packed.tolist() == [0x07, 0x00, 0xE0]
    # 1 bit: one byte per 8 codes, the first code in the lowest bit.
    assert pack_bits(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1], dtype=torch.uint8), 1).tolist() == [0x81, 0x01]


@pytest.mark.parametrize("bits", [3, 5, 8])
def test_group_aligned_slices_are_independent(bits):
    codes = random_codes(800, bits)
    packed = pack_bits(codes, bits)
    assert torch.equal(pack_bits(codes[160:480], bits), packed[20 * bits : 60 * bits])


@pytest.mark.parametrize("bits", [2, 6])
def test_strided_and_offset_inputs(bits):
    codes = random_codes(301, bits)
    assert torch.equal(unpack_bits(pack_bits(codes[3:], bits), bits, 298), codes[3:])
    matrix = codes[:300].view(20, 15).t()  # not contiguous
    assert torch.equal(unpack_bits(pack_bits(matrix, bits), bits, 300), matrix.reshape(-1))


@pytest.mark.parametrize("bits", [0, 9, -1, 2.0, True, None])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match=r"bits must be an integer in 1\.\.8"):
        pack_bits(torch.zeros(8, dtype=torch.uint8), bits)
    with pytest.raises(ValueError, match="bits"):
        unpack_bits(torch.zeros(8, dtype=torch.uint8), bits, 8)


def test_bad_inputs():
    with pytest.raises(TypeError, match="uint8"):
        pack_bits(torch.zeros(8, dtype=torch.int32), 4)
    with pytest.raises(TypeError, match="uint8"):
        unpack_bits(torch.zeros(4, dtype=torch.int8), 4, 8)
    with pytest.raises(ValueError, match="need 4"):
        unpack_bits(torch.zeros(5, dtype=torch.uint8), 4, 8)
    with pytest.raises(ValueError, match="count"):
        unpack_bits(torch.zeros(0, dtype=torch.uint8), 4, -1)
