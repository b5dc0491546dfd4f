"""One owner of key-scoped state: the runtime's key cache, with one eviction rule.

What is scoped to a key hangs off it in ``flexcp.runtime.key``: the HF backend's ``Layout``
(positions, window keys) and a window key's layout key (``attach``), and the distributed
stages' schedules (the key's ``DistAttnState``). While the key lives they are there; when
the runtime evicts it (``MAX_KEYS``) or ``clear_cache`` runs, they go with it, and a rebuilt
key starts bare. Distributed calls leave the keyless schedule cache (``SCHEDULES``) alone.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")

import flexcp  # noqa: E402
from flexcp.hf.keys import window_key  # noqa: E402
from flexcp.hf.registry import REGISTRY  # noqa: E402
from flexcp.kernels import SCHEDULES  # noqa: E402
from flexcp.mask import AttnMaskSpec, varlen  # noqa: E402
from flexcp.runtime import build_key, calc_attn, clear_cache, dispatch  # noqa: E402
from flexcp.runtime import key as key_module  # noqa: E402
from multiproc import run_spawned  # noqa: E402

HEADS = dict(num_heads_q=4, num_heads_kv=2, head_dim=16)


@pytest.fixture
def few_keys(monkeypatch):
    """A key cache of 3 keys, empty before and after the test."""
    monkeypatch.setattr(key_module, "MAX_KEYS", 3)
    clear_cache()
    yield 3
    clear_cache()


def _evict_by_building(count: int) -> None:
    """Build ``count`` fresh keys (for no group), pushing older ones out of the cache."""
    for n in range(count):
        build_key(varlen([7 + n, 57 - n]), None, chunk_size=32, **HEADS)


def _live_layout(key) -> tuple:
    """Register ``key`` as a layout with a sliding-window key; (weakref to its Layout, the window key)."""
    info = REGISTRY.register_layout(key, np.arange(64), prepared=False)
    wkey = window_key(key, 5)
    assert wkey != key and REGISTRY.layout(key) is info and REGISTRY.window(info, 5) == wkey
    assert REGISTRY.layout_key(wkey) == key
    return weakref.ref(info), wkey


def test_a_layout_and_its_window_keys_go_with_the_evicted_key(few_keys) -> None:
    key = build_key(varlen([20, 44]), None, chunk_size=32, **HEADS)
    info, wkey = _live_layout(key)
    _evict_by_building(few_keys + 1)
    gc.collect()
    assert key_module.find(key) is None and key_module.find(wkey) is None
    assert REGISTRY.layout(key) is None and REGISTRY.layout_key(wkey) == wkey
    assert info() is None  # nothing else holds the layout
    build_key(varlen([20, 44]), None, chunk_size=32, **HEADS)
    assert REGISTRY.layout(key) is None  # a rebuilt key starts bare: the old layout is gone, not hidden


def test_a_layout_lives_while_its_key_is_used_and_goes_on_clear_cache(few_keys) -> None:
    key = build_key(varlen([30, 34]), None, chunk_size=32, **HEADS)
    info, wkey = _live_layout(key)
    for n in range(few_keys + 1):
        _evict_by_building(1)
        build_key(varlen([30, 34]), None, chunk_size=32, **HEADS)  # using a key keeps it (and its layout)
        assert REGISTRY.layout(key) is info()
    flexcp.clear_cache()
    gc.collect()
    assert REGISTRY.layout(key) is None and REGISTRY.layout_key(wkey) == wkey and info() is None


def _attend(key) -> None:
    """One calc_attn of random q/k/v under ``key`` (every rank passes the same global tensors)."""
    g = torch.Generator().manual_seed(0)
    n, hq, hkv, d = 64, HEADS["num_heads_q"], HEADS["num_heads_kv"], HEADS["head_dim"]
    q, k, v = torch.randn(n, hq, d, generator=g), torch.randn(n, hkv, d, generator=g), torch.randn(n, hkv, d, generator=g)
    with torch.no_grad():
        calc_attn(*(dispatch(t, key) for t in (q, k, v)), key)


def _schedules_on_the_key(group) -> tuple[int, int, int, bool]:
    """(remote stages, stages scheduled on the key's state, SCHEDULES entries added, state freed by clear_cache)."""
    clear_cache()
    before = len(SCHEDULES)
    key = build_key(AttnMaskSpec.causal(64), group, chunk_size=8, num_stages=2, **HEADS)
    _attend(key)
    _attend(key)  # a second call reuses the key's schedules
    state = key_module.lookup(key).state
    (_, stages), = state.schedules.values()  # one backend, one device: prepared once
    counts = len(state.plan.stages), len(stages), len(SCHEDULES) - before
    alive = weakref.ref(state)
    del state, stages
    clear_cache()
    gc.collect()
    return (*counts, alive() is None)


def _spawned_schedules(rank: int, world_size: int) -> tuple:
    return _schedules_on_the_key(dist.group.WORLD)


@pytest.mark.parametrize("cp", [1, 2])
def test_stage_schedules_hang_off_the_key_and_go_with_it(cp) -> None:
    results = [_schedules_on_the_key(None)] if cp == 1 else run_spawned(_spawned_schedules, cp, timeout=120)
    for n_stages, n_scheduled, added, freed in results:
        assert n_scheduled == n_stages and (n_stages > 0) == (cp > 1)
        assert added == 0 and freed  # not in the keyless cache; gone with the key
