import torch

from endor.format.equal import bit_equal


def test_bit_equal_compares_bits_not_values():
    nan_a = torch.tensor([0x7FC00001], dtype=torch.int32).view(torch.float32)
    nan_b = torch.tensor([0x7FC00002], dtype=torch.int32).view(torch.float32)
    assert bit_equal(nan_a, nan_a.clone())
    assert not bit_equal(nan_a, nan_b)  # both NaN, other payloads
    assert not bit_equal(torch.tensor([0.0]), torch.tensor([-0.0]))
    assert not bit_equal(torch.zeros(2), torch.zeros(2, dtype=torch.float16))
    assert not bit_equal(torch.zeros(2, 1), torch.zeros(1, 2))
    assert bit_equal(torch.zeros(0, 3, dtype=torch.bfloat16),
                     torch.zeros(0, 3, dtype=torch.bfloat16))
    assert bit_equal(torch.arange(5), torch.arange(5))
