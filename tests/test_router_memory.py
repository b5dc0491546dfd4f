"""Predicted extra memory of backends (``AttnBackend.extra_memory_bytes``) and the router's memory budget."""

from __future__ import annotations

import torch

from flexcp.kernels import ReferenceBackend, TorchSdpaBackend, TritonBackend
from flexcp.kernels.backend import AttnBackend, qkv_bytes
from flexcp.mask import AttnMaskSpec, varlen

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
