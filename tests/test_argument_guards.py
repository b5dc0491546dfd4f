"""Arguments that used to pass silently or fail with a raw internal error: each is a clear error naming the argument."""

from __future__ import annotations

import pytest
import torch

import flexcp
from flexcp.mask import AttnMaskSpec, prefix_tree, sliding_window, varlen
from flexcp.runtime import build_key, calc_attn, clear_cache, dispatch, undispatch

KW = dict(num_heads_q=2, num_heads_kv=2, head_dim=8, chunk_size=8)


@pytest.fixture(autouse=True)
def _fresh_keys():
    yield
    clear_cache()


@pytest.mark.parametrize("make, match", [
    (lambda: varlen([4], causal="False"), r"causal must be True or False; got 'False' \(str\)"),
    (lambda: varlen([4, 4], causal=1), r"causal must be True or False; got 1 \(int\)"),
    (lambda: sliding_window([8], 2, causal="no"), "causal must be True or False"),
    (lambda: varlen([True, 3]), r"seqlens must hold integers, not booleans \(True is not a length\)"),
    (lambda: varlen([[2, False]]), "not booleans"),
    (lambda: build_key(AttnMaskSpec.causal(64), None, num_stages=2.5, **{**KW}), "num_stages must be an integer; got 2.5"),
    (lambda: build_key(AttnMaskSpec.causal(64), None, **{**KW, "chunk_size": 8.5}), "chunk_size must be an integer"),
    (lambda: varlen([2**64]), r"seqlens holds 18446744073709551616, beyond int64"),
    (lambda: varlen([2**62, 2**62]), r"seqlens add up to 9223372036854775808 tokens, beyond int64"),
    (lambda: AttnMaskSpec.causal(2**70), r"seqlen=1180591620717411303424 is beyond int64"),
    (lambda: build_key(AttnMaskSpec.causal(2**40), None, **KW), r"total_seqlen=1099511627776 is beyond the 2147483648"),
    (lambda: prefix_tree([2, 2], [0, 1]), r"sample_paths\[0\] = 0 is not a path.*e\.g\. \[\[0, 1\]\]"),
    (lambda: prefix_tree([2, 2], 5), "sample_paths must be a list of paths"),
    (lambda: build_key(AttnMaskSpec.causal(64), "world", **KW), "cp_group must be a torch.distributed ProcessGroup"),
])
def test_bad_argument_is_a_clear_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bools_still_pass_where_they_are_flags():
    assert varlen([4, 4], causal=False).area() == 32
    assert varlen([4], causal=True).area() == 10


def test_area_of_overlapping_slices_is_refused_not_double_counted():
    """Two slices covering the same 4 x 4 cells: 16 cells, not 32; area() validates first and names them."""
    spec = AttnMaskSpec([(0, 4), (0, 4)], [(0, 4), (0, 4)], ["full", "full"], 4)
    with pytest.raises(ValueError, match="slices 0 and 1 cover the same"):
        spec.area()
    assert AttnMaskSpec([(0, 4), (0, 4)], [(0, 2), (2, 4)], ["full", "full"], 4).area() == 16


def test_tensor_arguments():
    key = build_key(AttnMaskSpec.causal(64), None, **KW)
    with pytest.raises(TypeError, match="dispatch: x must be a torch.Tensor.*got list"):
        dispatch(list(range(64)), key)
    with pytest.raises(TypeError, match="undispatch: x must be a torch.Tensor"):
        undispatch([0.0] * 64, key)
    meta = [torch.empty(64, 2, 8, device="meta") for _ in range(3)]
    with pytest.raises(ValueError, match="q is on the meta device.*materialize"):
        calc_attn(*meta, key)
    with pytest.raises(ValueError, match="q is on the meta device"):
        flexcp.attention(*(m[:4] for m in meta), AttnMaskSpec.causal(4))
    no_heads = torch.randn(4, 0, 8)
    with pytest.raises(ValueError, match="q has 0 heads"):
        flexcp.attention(no_heads, torch.randn(4, 2, 8), torch.randn(4, 2, 8), AttnMaskSpec.causal(4))
