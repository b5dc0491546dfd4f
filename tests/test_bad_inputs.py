"""Bad arguments to the mask language, flexcp.attention and build_key: a clear error naming the argument.

Nothing is truncated (8.9 tokens) or silently disabled (softcap=NaN). Integral floats (8.0)
and numpy integers are exact integers and are accepted.
"""

import numpy as np
import pytest
import torch

import flexcp
from flexcp.mask import AttnMaskSpec
from flexcp.runtime import build_key


def _qkv(n=16, d=8):
    return torch.randn(n, 2, d), torch.randn(n, 2, d), torch.randn(n, 2, d)


@pytest.mark.parametrize("softcap", [float("inf"), float("nan"), "30", None, -1.0, True])
def test_softcap_must_be_a_finite_non_negative_number(softcap):
    with pytest.raises(ValueError, match="softcap must be >= 0 and a finite number"):
        flexcp.attention(*_qkv(), AttnMaskSpec.causal(16), softcap=softcap)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "0.1"])
def test_softmax_scale_must_be_finite(scale):
    with pytest.raises(ValueError, match="softmax_scale must be a finite number"):
        flexcp.attention(*_qkv(), AttnMaskSpec.causal(16), softmax_scale=scale)


def test_head_dim_zero():
    with pytest.raises(ValueError, match="head_dim 0"):
        flexcp.attention(*_qkv(d=0), AttnMaskSpec.causal(16))
    with pytest.raises(ValueError, match="head_dim must be a positive int"):
        build_key(AttnMaskSpec.causal(16), None, num_heads_q=2, num_heads_kv=2, head_dim=0)


def test_build_key_on_an_empty_spec():
    with pytest.raises(ValueError, match="covers 0 tokens"):
        build_key(AttnMaskSpec.varlen([]), None, num_heads_q=2, num_heads_kv=2, head_dim=8)


@pytest.mark.parametrize("make", [
    lambda: AttnMaskSpec([(0, 4)], [(0, 4)], ["full"], 8.9),
    lambda: AttnMaskSpec([(0, 4.5)], [(0, 4)], ["full"], 8),
    lambda: AttnMaskSpec.varlen([2.5]),
    lambda: AttnMaskSpec.varlen(np.array([3.0, 2.5])),
    lambda: AttnMaskSpec.prefix_tree([3.5, 2], [[0, 1]]),
    lambda: AttnMaskSpec.causal(7.2),
    lambda: AttnMaskSpec.sliding_window([8], 2.5),
    lambda: AttnMaskSpec.block_causal([float("nan")]),
])
def test_non_integral_lengths_are_rejected_not_truncated(make):
    with pytest.raises(ValueError, match="integer"):
        make()


def test_integral_floats_and_numpy_integers_are_exact():
    spec = AttnMaskSpec([(np.int64(0), 4.0)], [(0, np.int32(4))], [np.int64(1)], 8.0)
    assert spec.total_seqlen == 8 and spec.q_ranges == ((0, 4),) and spec.mask_types[0] == "causal"
    assert AttnMaskSpec.varlen([2.0, np.int64(3)]).total_seqlen == 5
    assert AttnMaskSpec.varlen(torch.tensor([2, 3])).total_seqlen == 5


@pytest.mark.parametrize("field, value, match", [
    ("q_ranges", None, "q_ranges must be a list of"),
    ("k_ranges", 5, "k_ranges must be a list of"),
    ("mask_types", "causal", "mask_types must be a list"),
    ("mask_types", [np.int64(9)], "unknown mask type .*9.*codes 0-3"),
    ("mask_types", [np.bool_(True)], "unknown mask type"),
])
def test_structural_errors_name_the_field(field, value, match):
    args = {"q_ranges": [(0, 4)], "k_ranges": [(0, 4)], "mask_types": ["full"], "total_seqlen": 4}
    args[field] = value
    with pytest.raises(ValueError, match=match):
        AttnMaskSpec(**args)
