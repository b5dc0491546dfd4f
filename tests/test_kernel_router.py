"""The cost router's decisions on CPU, with stand-in backends: the cuDNN backend over emulated graphs as the
group backend, the reference kernel under another name as the rest (both exact in float64)."""

from __future__ import annotations

import pytest
import torch

from flexcp.kernels import AutoBackend, ReferenceBackend, attention, get_backend, register_backend
from flexcp.kernels.costs import Cost
from flexcp.mask import AttnMaskSpec, sliding_window
from cudnn_emulator import EmulatedCudnn
from reference_attention import dense_attention
from router_cases import BANDS_FAST, BANDS_SLOW, FAST, MIXED, SLOW


class StandIn(ReferenceBackend):
    """The reference kernel under another name."""

    name = "standin_rest"


class EmulatedGroup(EmulatedCudnn):
    """The group backend's stand-in: the cuDNN backend over emulated graphs (it offers its launches, no softcap)."""

    name = "standin_group"


register_backend("standin_group", EmulatedGroup)
register_backend("standin_rest", StandIn)


def router(group: Cost, rest: Cost) -> AutoBackend:
    costs = {"standin_group": group, "standin_rest": rest}
    return AutoBackend(costs, whole=("standin_group", "standin_rest"), split=("standin_group", "standin_rest"), device_types=("cpu",))




def routed(auto: AutoBackend, spec: AttnMaskSpec, softcap: float = 0.0) -> list[str]:
    q = torch.zeros(spec.total_seqlen, 4, 16, dtype=torch.float64)
    k = torch.zeros(spec.total_seqlen_k, 2, 16, dtype=torch.float64)
    prep = auto.prepare(spec.table, spec.total_seqlen, spec.total_seqlen_k, q.device)
    return [p["backend"] for p in auto.route(prep, q, k, softcap).describe()]


def test_cheapest_whole_backend_wins():
    assert routed(router(FAST, SLOW), MIXED) == ["standin_group"]
    assert routed(router(SLOW, FAST), MIXED) == ["standin_rest"]


def test_groups_split_by_cost():
    """Bands cheap only on the rest backend, full/causal only on the group backend: two parts, in that order."""
    assert routed(router(BANDS_SLOW, BANDS_FAST), MIXED) == ["standin_group", "standin_rest"]


def test_launch_overhead_keeps_one_backend():
    """A large per-launch cost on the group backend makes splitting lose to the rest backend alone."""
    group = Cost({"full": 1000.0, "causal": 1000.0, "band": 1.0}, launch_us=1e9, slice_us=0.0)
    assert routed(router(group, BANDS_FAST), MIXED) == ["standin_rest"]


def test_unsupported_backend_is_skipped():
    assert routed(router(FAST, SLOW), MIXED, softcap=5.0) == ["standin_rest"]


def test_no_device_backend_means_reference():
    auto = AutoBackend()  # CUDA-only backends: none can run CPU tensors
    assert routed(auto, MIXED) == ["reference"]


@pytest.mark.parametrize("costs", [(FAST, SLOW), (BANDS_SLOW, BANDS_FAST)], ids=["whole", "split"])
@pytest.mark.parametrize("spec", [MIXED, sliding_window([50, 40], 9)], ids=["mixed", "window"])
def test_routed_results_are_exact(costs, spec):
    """Whatever the route, forward and backward equal dense float64 attention (split parts merge by lse)."""
    name = f"router_{id(costs)}"
    register_backend(name, lambda: router(*costs))
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(spec.total_seqlen, 4, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(spec.total_seqlen_k, 2, 16, generator=gen, dtype=torch.float64, requires_grad=True) for _ in "kv")
    out, lse = attention(q, k, v, spec, backend=name)
    ref, ref_lse = dense_attention(q, k, v, spec)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)  # float64 in, float64-exact out
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)
    assert get_backend(name).name == "auto"


# ../shared/repro/router_split_cells.py: BI_CAUSAL squares off the diagonal, once lost by the split
REPRO = {
    "repro10": AttnMaskSpec([(0, 8), (7, 9), (9, 10), (3, 6)], [(5, 7), (8, 10), (8, 9), (8, 10)],
                            ["causal", "full", "bi_causal", "bi_causal"], 10),
    "repro9": AttnMaskSpec([(8, 9), (2, 9), (0, 7), (3, 5)], [(0, 1), (2, 8), (6, 9), (5, 7)],
                           ["full", "bi_causal", "inv_causal", "bi_causal"], 9),
}


@pytest.mark.parametrize("name", sorted(REPRO))
def test_split_over_cudnn_launches_is_exact(name):
    """The split over the (emulated) cuDNN backend's launches keeps every cell: forward and backward exact."""
    spec = REPRO[name]
    costs = {"standin_group": BANDS_SLOW, "standin_rest": BANDS_FAST}
    auto = AutoBackend(costs, whole=tuple(costs), split=tuple(costs), device_types=("cpu",))
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(spec.total_seqlen, 2, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(spec.total_seqlen_k, 1, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in "kv")
    prep = auto.prepare(spec.table, spec.total_seqlen, spec.total_seqlen_k, q.device)
    assert [p["backend"] for p in auto.route(prep, q, k, 0.0).describe()] == ["standin_group", "standin_rest"]
    out, lse = auto.forward(q, k, v, prep, 0.5, 0.0)
    do = torch.randn_like(out)
    grads = auto.backward(do, q, k, v, out, lse, prep, 0.5, 0.0)
    ref, ref_lse = dense_attention(q, k, v, spec, 0.5)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)
    for g, r in zip(grads, torch.autograd.grad(ref, (q, k, v), do)):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)
