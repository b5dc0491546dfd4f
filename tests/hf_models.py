"""Tiny random-init HF causal LMs and global batches that several HF test modules share (a helper module).

``make_model(arch, impl)``: one of five architectures (Llama, Qwen2, Qwen3, Mistral with a
sliding window, Gemma 2 with softcapping and alternating windows) in float32;
``make_case(case)``: a global batch (one causal sequence, packed documents, batch > 1 with
padding, a prefix tree) with pre-shifted labels.
"""

from __future__ import annotations

import copy

import torch
import transformers

import flexcp.magi_attn_utils as mau
from flexcp.mask import AttnMaskSpec

VOCAB = 128
BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, attention_dropout=0.0)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 5}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"sliding_window": 5, "attn_logit_softcapping": 0.05,
                                                      "query_pre_attn_scalar": 12}),
}
CASES = ("causal", "packed", "batch", "tree")
TREE_NODES, TREE_PATHS = [12, 7, 9, 5], [[0, 1], [0, 2, 3]]


def make_model(arch: str, impl: str, seed: int = 0) -> torch.nn.Module:
    cfg_name, cls_name, extra = ARCHS[arch]
    cfg = getattr(transformers, cfg_name)(**BASE, **extra)
    torch.manual_seed(seed)
    return getattr(transformers, cls_name)._from_config(copy.deepcopy(cfg), attn_implementation=impl).float()


def _shift(ids: torch.Tensor, ends: list[int]) -> torch.Tensor:
    """Pre-shifted labels of flat ``ids``: next token, -100 at each segment end."""
    labels = torch.full_like(ids, -100)
    labels[:-1] = ids[1:]
    labels[torch.tensor(ends) - 1] = -100
    return labels


def make_case(case: str, seed: int = 1) -> dict:
    """The global batch: input_ids, position_ids, labels (pre-shifted), maybe attention_mask / attn_spec."""
    g = torch.Generator().manual_seed(seed)
    if case in ("causal", "packed"):
        lens = [40] if case == "causal" else [13, 17, 10]
        ids = torch.randint(0, VOCAB, (40,), generator=g)
        ends = torch.tensor(lens).cumsum(0).tolist()
        pos = torch.cat([torch.arange(n) for n in lens])
        return {"input_ids": ids[None], "position_ids": pos[None], "labels": _shift(ids, ends)[None]}
    if case == "batch":
        b, s = 3, 14
        ids = torch.randint(0, VOCAB, (b, s), generator=g)
        mask = torch.ones(b, s, dtype=torch.long)
        mask[1, -4:] = 0  # right padding
        mask[2, :3] = 0  # left padding
        labels = _shift(ids.reshape(-1), [s, 2 * s - 4, 3 * s]).reshape(b, s)
        labels[mask == 0] = -100
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    spec, _ = AttnMaskSpec.prefix_tree(TREE_NODES, TREE_PATHS)
    ids = torch.randint(0, VOCAB, (spec.total_seqlen,), generator=g)
    ends = torch.tensor(TREE_NODES).cumsum(0).tolist()
    pos = mau.prefix_tree_position_ids(TREE_NODES, TREE_PATHS)
    return {"input_ids": ids[None], "position_ids": pos[None], "labels": _shift(ids, ends)[None], "attn_spec": spec}
