"""flexcp.hf.registry: one owner of the HF backend's state, keyed by group identity, one eviction rule.

The seed's module-level state names delegate to the registry (settings read and written,
caches as read-only snapshots); keys the runtime forgot read as absent; a group keeps its
``MAX_LAYOUTS`` most recent layouts and their window keys go with them; groups with the same
identity share entries and distinct groups (even over the same ranks) do not.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch.distributed as dist

pytest.importorskip("transformers")

import flexcp  # noqa: E402
import flexcp.magi_attn_utils as mau  # noqa: E402
from flexcp.hf import registry  # noqa: E402
from flexcp.hf.keys import window_key  # noqa: E402
from flexcp.hf.registry import REGISTRY  # noqa: E402
from flexcp.mask import varlen  # noqa: E402
from multiproc import run_spawned  # noqa: E402

HEADS = (4, 2, 16)


@pytest.fixture(autouse=True)
def _clean_settings():
    yield
    mau.set_active_attn_spec(None)
    mau.set_active_cp_group(None)


def _ident(spec) -> tuple:
    return (spec.fingerprint(), *HEADS)


def test_seed_settings_names_read_and_write_the_registry() -> None:
    spec = varlen([3, 5])
    mau._ACTIVE_ATTN_SPEC = spec
    assert REGISTRY.active_spec is spec and mau.get_active_attn_spec() is spec
    with pytest.raises(ValueError, match="AttnMaskSpec"):
        mau._ACTIVE_ATTN_SPEC = "causal"  # the module name validates like set_active_attn_spec
    marker = object()
    mau._ACTIVE_CP_GROUP = marker
    assert REGISTRY.active_cp_group is marker and mau.get_active_cp_group() is marker
    before = REGISTRY.registered
    try:
        mau._MAGI_REGISTERED = False
        assert REGISTRY.registered is False
    finally:
        mau._MAGI_REGISTERED = before
    assert "_FLEX_KEY_CACHE" not in vars(mau) and "_ACTIVE_ATTN_SPEC" not in vars(mau)  # no module-level copies


def test_seed_caches_are_read_only_snapshots_of_the_registry() -> None:
    spec = varlen([40, 24])
    key = mau._flex_key_for(None, spec, *HEADS)
    assert mau._FLEX_KEY_CACHE[id(None)] == (_ident(spec), key) == (_ident(spec), REGISTRY.flex_key(None, _ident(spec)))
    mau._self_key_for(None, 17, *HEADS, "cpu")
    assert mau._MAGI_SELF_KEY_LEN[id(None)] == 17 == REGISTRY.self_key_len(None)
    view = mau._FLEX_KEY_CACHE
    for write in (lambda: view.__setitem__(1, 2), view.clear, lambda: view.pop(id(None)), lambda: view.update({})):
        with pytest.raises(TypeError, match="read-only view"):
            write()
    with pytest.raises(AttributeError):
        mau._FLEX_KEY_CACHE = {}


def test_groups_of_one_share_one_identity_not_one_id(monkeypatch) -> None:
    monkeypatch.setattr(dist, "is_initialized", lambda: False)  # an earlier test may have initialized it in-process
    spec = varlen([10, 22])
    group_a, group_b = object(), object()  # without torch.distributed every group is a group of one: "local"
    key = mau._flex_key_for(group_a, spec, *HEADS)
    assert REGISTRY.flex_key(group_b, _ident(spec)) == key == REGISTRY.flex_key(None, _ident(spec))
    assert mau._flex_key_for(group_b, spec, *HEADS) is key


def test_keys_the_runtime_forgot_read_as_absent() -> None:
    spec = varlen([12, 20])
    key = mau._flex_key_for(None, spec, *HEADS)
    info = REGISTRY.register_layout(key, None, prepared=False)
    wkey = window_key(key, 4)
    assert wkey != key and REGISTRY.layout_key(wkey) == key and REGISTRY.window(info, 4) == wkey
    flexcp.clear_cache()
    assert REGISTRY.flex_key(None, _ident(spec)) is None and REGISTRY.layout(key) is None
    assert REGISTRY.window(info, 4) is None
    assert mau._flex_key_for(None, spec, *HEADS) == key  # rebuilt on demand
    assert REGISTRY.flex_key(None, _ident(spec)) == key


def test_a_group_keeps_its_most_recent_layouts_and_their_windows_go_with_them() -> None:
    first = mau._flex_key_for(None, varlen([5, 27]), *HEADS)
    REGISTRY.register_layout(first, np.arange(32), prepared=False)
    wfirst = window_key(first, 3)
    assert REGISTRY.layout_key(wfirst) == first
    for n in range(registry.MAX_LAYOUTS):
        key = flexcp.build_key(varlen([6 + n, 26]), None, num_heads_q=4, num_heads_kv=2, head_dim=16, chunk_size=32)
        REGISTRY.register_layout(key, None, prepared=False)
        assert REGISTRY.layout(key) is not None
    assert REGISTRY.layout(first) is None and REGISTRY.layout_key(wfirst) == wfirst  # evicted with its window


def test_refreshing_a_layout_with_new_positions_forgets_its_windows() -> None:
    key = mau._flex_key_for(None, varlen([9, 23]), *HEADS)
    info = REGISTRY.register_layout(key, np.arange(32), prepared=True, local_positions=np.arange(32))
    wkey = window_key(key, 5)
    again = REGISTRY.register_layout(key, None, prepared=False)  # no positions: keeps them, stays prepared
    assert again.prepared and REGISTRY.window(again, 5) == wkey and np.array_equal(again.positions, info.positions)
    moved = REGISTRY.register_layout(key, np.arange(32)[::-1].copy(), prepared=False)
    assert REGISTRY.window(moved, 5) is None and REGISTRY.layout_key(wkey) == wkey


def _distinct_groups(rank: int, world_size: int) -> dict:
    spec = varlen([300, 212])
    group_a, group_b = dist.new_group(list(range(world_size))), dist.new_group(list(range(world_size)))
    key_a = mau._flex_key_for(group_a, spec, *HEADS)
    key_b = mau._flex_key_for(group_b, spec, *HEADS)
    view = mau._FLEX_KEY_CACHE
    return {
        "distinct": key_a != key_b and key_a.group_id != key_b.group_id,
        "a": REGISTRY.flex_key(group_a, _ident(spec)) == key_a and view[id(group_a)][1] == key_a,
        "b": REGISTRY.flex_key(group_b, _ident(spec)) == key_b and view[id(group_b)][1] == key_b,
        "cached": mau._flex_key_for(group_a, spec, *HEADS) is key_a,
    }


def test_distinct_groups_over_the_same_ranks_keep_separate_entries() -> None:
    for out in run_spawned(_distinct_groups, 2, timeout=120):
        assert out == {"distinct": True, "a": True, "b": True, "cached": True}
