"""Distributed attention over NCCL, one GPU per rank, equals single-GPU attention (GPU test).

The GPU twin of ``test_dist_attn.py``: the same mixed masks (every type, empty rows,
one-token documents, prefix tree, windows, random masks), dispatched over cp = 2 and 4
GPUs with ``backend="auto"`` (cuDNN / Triton per stage), against ``flexcp.attention`` on
one GPU on the same inputs: float32 (Triton) to 1e-4 and bfloat16 (cuDNN where it runs)
to bf16 rounding, out and gradients. Skipped unless the machine has ``cp`` GPUs.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import flexcp
from flexcp.mask import AttnMaskSpec
from flexcp.runtime import build_key, calc_attn, clear_cache, dispatch, undispatch
from mask_cases import random_spec, rel_err
from multiproc import run_spawned

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
HEAD_DIM = 64


def _specs() -> dict[str, AttnMaskSpec]:
    return {
        "causal": AttnMaskSpec.causal(1000),
        "varlen_1tok": AttnMaskSpec.varlen([1, 300, 1, 1, 170, 400, 1, 90]),
        "prefix_tree": AttnMaskSpec.prefix_tree([300, 120, 200, 1, 150], [[0, 1], [0, 2, 3], [0, 2, 4]])[0],
        "sliding": AttnMaskSpec.sliding_window([700, 330], 110),
        "empty_rows": AttnMaskSpec([(50, 300), (500, 800)], [(0, 200), (400, 800)], ["full", "causal"], 900),
        "random_a": random_spec(1),
    }


def _inputs(spec: AttnMaskSpec, dtype: torch.dtype, device: str, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = spec.total_seqlen
    shapes = [(n, 8, HEAD_DIM), (n, 2, HEAD_DIM), (n, 2, HEAD_DIM), (n, 8, HEAD_DIM)]  # q, k, v (GQA 8:2), dout
    return [torch.randn(s, generator=g).to(device, dtype) for s in shapes]


def _distributed(rank: int, world_size: int, dtype: torch.dtype) -> dict[str, list[torch.Tensor]]:
    out = {}
    for name, spec in _specs().items():
        q, k, v, w = _inputs(spec, dtype, f"cuda:{rank}")
        key = build_key(spec, dist.group.WORLD, num_heads_q=8, num_heads_kv=2, head_dim=HEAD_DIM, chunk_size=64)
        ql, kl, vl = (dispatch(x, key).requires_grad_() for x in (q, k, v))
        o, _ = calc_attn(ql, kl, vl, key)
        o.backward(dispatch(w, key))
        out[name] = [undispatch(x.detach(), key).cpu() for x in (o, ql.grad, kl.grad, vl.grad)]
    clear_cache()
    return out


def _single_gpu(spec: AttnMaskSpec, dtype: torch.dtype) -> list[torch.Tensor]:
    q, k, v, w = _inputs(spec, dtype, "cuda:0")
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    o, _ = flexcp.attention(q, k, v, spec)
    o.backward(w)
    return [x.detach().cpu() for x in (o, q.grad, k.grad, v.grad)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cp", [2, 4])
def test_nccl_calc_attn_matches_single_gpu(cp: int, dtype: torch.dtype) -> None:
    if torch.cuda.device_count() < cp:
        pytest.skip(f"needs {cp} GPUs (NCCL, one per rank); this machine has {torch.cuda.device_count()}")
    results = run_spawned(_distributed, cp, dtype, pg_backend="nccl", timeout=600)
    for name, spec in _specs().items():
        want = _single_gpu(spec, dtype)
        for rank, per_rank in enumerate(results):
            for what, got, ref in zip(("out", "dq", "dk", "dv"), per_rank[name], want):
                assert torch.isfinite(got).all(), f"{name} cp={cp} rank {rank}: {what} is not finite"
                err = rel_err(got, ref)
                assert err <= TOL[dtype], f"{name} cp={cp} rank {rank} {what}: relative error {err:.2e}"
