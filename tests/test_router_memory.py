"""Predicted extra memory of backends (``AttnBackend.extra_memory_bytes``) and the router's memory budget."""

from __future__ import annotations

import pytest
import torch

from cudnn_emulator import EmulatedCudnn
from flexcp.kernels import AutoBackend, ReferenceBackend, TorchSdpaBackend, TritonBackend, attention, register_backend
from flexcp.kernels.backend import AttnBackend, qkv_bytes
from flexcp.kernels.costs import Cost
from flexcp.kernels.router import BUDGET_ENV, MIN_BUDGET_BYTES, memory_budget_factor
from flexcp.mask import AttnMaskSpec, varlen
from reference_attention import dense_attention
from router_cases import BANDS_FAST, BANDS_SLOW, FAST, MIXED, SLOW

SHAPE = dict(heads_q=8, heads_kv=2, head_dim=64, dtype=torch.bfloat16)
DOCS = varlen([300, 200, 524])


def test_qkv_bytes():
    assert qkv_bytes(10, 20, heads_q=4, heads_kv=2, head_dim=8, dtype=torch.bfloat16) == (10 * 4 + 2 * 20 * 2) * 8 * 2


def test_default_is_float32_copies_of_qkv_and_their_gradients():
    class Plain(AttnBackend):  # a backend that says nothing about its memory
        def prepare(self, table, tq, tk, device):
            return ReferenceBackend().prepare(table, tq, tk, device)

        forward = backward = None

    prep = Plain().prepare(DOCS.table, 1024, 1024, torch.device("cpu"))
    f32 = qkv_bytes(1024, 1024, heads_q=8, heads_kv=2, head_dim=64, dtype=torch.float32)
    assert Plain().extra_memory_bytes(prep, **SHAPE) == 2 * f32
    assert ReferenceBackend().extra_memory_bytes(prep, **SHAPE) > 2 * f32  # plus its tiles


def test_triton_needs_only_its_row_statistics():
    prep = TritonBackend().prepare(DOCS.table, 1024, 1024, torch.device("cpu"))
    assert TritonBackend().extra_memory_bytes(prep, **SHAPE) == 2 * 1024 * 8 * 4


def test_torch_sdpa_counts_repeated_heads_on_its_rectangle_and_the_fallback_elsewhere():
    sdpa = TorchSdpaBackend(fallback=TritonBackend())
    rect = AttnMaskSpec([(0, 1024)], [(0, 1024)], ["causal"], 1024)
    on_rect = sdpa.extra_memory_bytes(sdpa.prepare(rect.table, 1024, 1024, torch.device("cpu")), **SHAPE)
    elsewhere = sdpa.extra_memory_bytes(sdpa.prepare(DOCS.table, 1024, 1024, torch.device("cpu")), **SHAPE)
    assert elsewhere == 2 * 1024 * 8 * 4  # Triton's row statistics
    assert on_rect == 4 * 1024 * 8 * 64 * 2 + 1024 * 8 * 64 * 4 + elsewhere
    mha = dict(SHAPE, heads_kv=8)
    assert sdpa.extra_memory_bytes(sdpa.prepare(rect.table, 1024, 1024, torch.device("cpu")), **mha) == 1024 * 8 * 64 * 4 + elsewhere


# ------------------------------------------------------------------ the router's budget
TIB = 1 << 40
NEEDS = {"mem_group": 0, "mem_rest": 0}  # predicted extra bytes per fake backend, set by each test


class MemGroup(EmulatedCudnn):
    """The cuDNN backend over emulated graphs, predicting ``NEEDS['mem_group']`` extra bytes."""

    name = "mem_group"

    def extra_memory_bytes(self, prep, **shape) -> int:
        return NEEDS[self.name]


class MemRest(ReferenceBackend):
    name = "mem_rest"

    def extra_memory_bytes(self, prep, **shape) -> int:
        return NEEDS[self.name]


register_backend("mem_group", MemGroup)
register_backend("mem_rest", MemRest)


def decide(group: Cost, rest: Cost, group_needs: int, rest_needs: int = 0, budget=None, split=("mem_group", "mem_rest")):
    NEEDS.update(mem_group=group_needs, mem_rest=rest_needs)
    costs = {"mem_group": group, "mem_rest": rest}
    auto = AutoBackend(costs, whole=tuple(costs), split=split, device_types=("cpu",), memory_budget=budget)
    q = torch.zeros(MIXED.total_seqlen, 4, 16, dtype=torch.float64)
    k = torch.zeros(MIXED.total_seqlen_k, 2, 16, dtype=torch.float64)
    prep = auto.prepare(MIXED.table, MIXED.total_seqlen, MIXED.total_seqlen_k, q.device)
    route = auto.route(prep, q, k, 0.0)
    return [p.backend.name for p in route.parts], route


def test_over_budget_the_next_backend_runs():
    assert decide(FAST, SLOW, 0)[0] == ["mem_group"]
    names, route = decide(FAST, SLOW, TIB)
    assert names == ["mem_rest"] and route.over_budget == {"mem_group": TIB}


def test_a_split_over_budget_gives_way_and_counts_its_merge_buffers():
    assert decide(BANDS_SLOW, BANDS_FAST, 0)[0] == ["mem_group", "mem_rest"]
    assert decide(BANDS_SLOW, BANDS_FAST, TIB)[0] == ["mem_rest"]
    # the group fits alone, but not with the split's merge buffers: the split is skipped, the group runs whole
    names, route = decide(BANDS_SLOW, BANDS_FAST, MIN_BUDGET_BYTES - 1000)
    assert set(route.over_budget) == {"mem_group+mem_rest"} and route.over_budget["mem_group+mem_rest"] > MIN_BUDGET_BYTES
    assert len(names) == 1


def test_the_fallback_is_always_admissible():
    """The rest backend (Triton on a GPU) runs even when it too is predicted over budget."""
    assert decide(FAST, SLOW, TIB, rest_needs=TIB)[0] == ["mem_rest"]


def test_without_an_admissible_fallback_the_least_memory_wins():
    names, route = decide(FAST, SLOW, 3 * TIB, rest_needs=2 * TIB, split=("mem_group", "absent"))
    assert names == ["mem_rest"] and route.extra_bytes == 2 * TIB and route.over_budget == {"mem_group": 3 * TIB}


def test_budget_is_adjustable(monkeypatch):
    assert decide(FAST, SLOW, TIB, budget=float("inf"))[0] == ["mem_group"]
    monkeypatch.setenv(BUDGET_ENV, "inf")
    assert decide(FAST, SLOW, TIB)[0] == ["mem_group"]
    monkeypatch.setenv(BUDGET_ENV, "4")
    assert decide(FAST, SLOW, TIB)[0] == ["mem_rest"]


def test_budget_scales_with_qkv_and_has_a_floor():
    auto = AutoBackend(memory_budget=2)
    shape = dict(heads_q=32, heads_kv=8, head_dim=128, dtype=torch.bfloat16)
    big = qkv_bytes(1 << 18, 1 << 18, **shape)
    assert auto.budget_bytes(1 << 18, 1 << 18, **shape) == 2 * big
    assert auto.budget_bytes(16, 16, **shape) == MIN_BUDGET_BYTES


@pytest.mark.parametrize("bad", ["0", "-1", "four", "nan"])
def test_a_bad_budget_names_the_variable(monkeypatch, bad):
    monkeypatch.setenv(BUDGET_ENV, bad)
    with pytest.raises(ValueError, match=BUDGET_ENV):
        memory_budget_factor()
    with pytest.raises(ValueError, match="memory_budget"):
        AutoBackend(memory_budget=bad)


def test_the_route_taken_over_budget_is_exact():
    NEEDS.update(mem_group=TIB, mem_rest=0)
    register_backend("mem_auto", lambda: AutoBackend({"mem_group": BANDS_SLOW, "mem_rest": BANDS_FAST},
                                                     whole=("mem_group", "mem_rest"), split=("mem_group", "mem_rest"),
                                                     device_types=("cpu",)))
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(MIXED.total_seqlen, 4, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(MIXED.total_seqlen_k, 2, 16, generator=gen, dtype=torch.float64, requires_grad=True) for _ in "kv")
    out, lse = attention(q, k, v, MIXED, backend="mem_auto")
    ref, ref_lse = dense_attention(q, k, v, MIXED)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)
