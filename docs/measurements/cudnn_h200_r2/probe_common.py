"""Shared pieces of the probes in this folder (run each probe as ``python <probe>.py OUT.json`` on a GPU)."""
from contextlib import contextmanager

import torch

import flexcp


def inputs(S: int, hq: int, hkv: int, grad: bool = False):
    """Seeded bf16 ``q, k, v, do`` of ``S`` tokens, head dim 128, on CUDA."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(S, h, 128, device="cuda", dtype=torch.bfloat16, requires_grad=grad) for h in (hq, hkv, hkv))
    return q, k, v, torch.randn(S, hq, 128, device="cuda", dtype=torch.bfloat16)


def attention_step(q, k, v, do, spec, backend: str):
    """One ``flexcp.attention`` forward + backward."""
    def step():
        out, _ = flexcp.attention(q, k, v, spec, backend=backend)
        out.backward(do)
    return step


@contextmanager
def gated_calls(enabled: bool):
    """With ``enabled=False``, Triton's gated ``*_into`` calls (the non-finite recompute) are skipped."""
    from flexcp.kernels.triton import TritonBackend

    fi, bi = TritonBackend.forward_into, TritonBackend.backward_into

    def skip_f(self, *a, gate=None, **kw):
        return None if gate is not None else fi(self, *a, **kw)

    def skip_b(self, *a, gate=None, **kw):
        return None if gate is not None else bi(self, *a, **kw)

    if not enabled:
        TritonBackend.forward_into, TritonBackend.backward_into = skip_f, skip_b
    try:
        yield
    finally:
        TritonBackend.forward_into, TritonBackend.backward_into = fi, bi
