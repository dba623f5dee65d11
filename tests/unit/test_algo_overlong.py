"""DAPO's soft overlong punishment (eq. 13), by hand."""

import pytest
import torch

from ray_rlhf.algo.overlong import overlong_penalty


def test_overlong_penalty_by_hand():
    # L_max = 24, L_cache = 4: 0 up to 20 tokens, then ((24 - 4) - L) / 4, -1 past 24
    lengths = torch.tensor([0, 19, 20, 21, 22, 23, 24, 25, 100])
    expected = [
        0.0,  # 0 <= 20
        0.0,  # 19 <= 20
        0.0,  # 20 <= 20: the ramp starts after L_max - L_cache
        -0.25,  # (20 - 21) / 4
        -0.5,  # (20 - 22) / 4
        -0.75,  # (20 - 23) / 4
        -1.0,  # (20 - 24) / 4: truncated at the budget
        -1.0,  # 25 > 24
        -1.0,  # 100 > 24
    ]
    out = overlong_penalty(lengths, max_new_tokens=24, buffer=4)
    assert out.dtype == torch.get_default_dtype() and out.shape == (9,)
    assert out.tolist() == expected


def test_overlong_penalty_keeps_a_float_dtype():
    out = overlong_penalty(torch.tensor([22.0, 10.0], dtype=torch.float64), max_new_tokens=24, buffer=4)
    assert out.dtype == torch.float64 and out.tolist() == [-0.5, 0.0]


@pytest.mark.parametrize("buffer", [0, -1, 24, 30])
def test_overlong_penalty_rejects_a_bad_buffer(buffer):
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(torch.tensor([1]), max_new_tokens=24, buffer=buffer)
