import pytest
import torch

from sketchtune.layout import pack_codes, packed_row_bytes, unpack_codes


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 13), (4, 64), (2, 1001), (9, 8)])
def test_pack_unpack_round_trip(bits, shape):
    gen = torch.Generator().manual_seed(bits * 1000 + shape[1])
    codes = torch.randint(0, 2**bits, shape, generator=gen)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (shape[0], packed_row_bytes(shape[1], bits))
    assert torch.equal(unpack_codes(packed, bits, shape[1]), codes)


@pytest.mark.parametrize("bits,bytes_per_8", [(2, 2), (3, 3), (4, 4)])
def test_packing_is_dense(bits, bytes_per_8):
    # 3-bit codes must take 3/8 byte each, not a nibble: 8 codes -> exactly `bits` bytes.
    assert packed_row_bytes(4096, bits) == 4096 // 8 * bytes_per_8
    assert packed_row_bytes(4096, 2) * 2 == packed_row_bytes(4096, 4)


def test_extreme_codes_survive():
    for bits in (2, 3, 4):
        codes = torch.full((2, 17), 2**bits - 1)
        codes[1] = 0
        assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, 17), codes)
