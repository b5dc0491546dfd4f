"""The "magi" drop-in at cp = 1: a model loaded with it runs after register_magi_attention() alone.

No magi_prepare_batch, no stamped cp_group, no process group: attention is local and
honours packed ``position_ids`` (each document equals running it alone), padding masks
and sliding windows; under ``torch.autocast`` q/k/v of mixed dtypes run in the autocast
dtype and each input's gradient comes back in its own dtype.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import flexcp.magi_attn_utils as mau  # noqa: E402
from flexcp.hf.attention import magi_attention_forward  # noqa: E402

VOCAB = 96
BASE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, attention_dropout=0.0)
ARCHS = {"llama": ("LlamaConfig", "LlamaForCausalLM", {}), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
         "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 5})}
LENS = [9, 14, 7]


def fresh(arch: str, impl: str) -> torch.nn.Module:
    """A new model instance: nothing stamped on its attention modules."""
    mau.register_magi_attention()
    cfg_name, cls_name, extra = ARCHS[arch]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_name)(**BASE, **extra)
    return getattr(transformers, cls_name)._from_config(copy.deepcopy(cfg), attn_implementation=impl).float()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_packed_documents_attend_only_within_themselves(arch: str) -> None:
    model, eager = fresh(arch, "magi"), fresh(arch, "eager")
    assert not any(hasattr(m, "cp_group") for m in model.modules())
    ids = torch.randint(0, VOCAB, (1, sum(LENS)), generator=torch.Generator().manual_seed(1))
    pos = torch.cat([torch.arange(n) for n in LENS])[None]
    packed = model(input_ids=ids, position_ids=pos).logits
    alone = torch.cat([eager(input_ids=doc).logits for doc in ids.split(LENS, dim=1)], dim=1)
    torch.testing.assert_close(packed, alone, atol=2e-5, rtol=0)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_padding_mask_is_honoured(arch: str) -> None:
    model, eager = fresh(arch, "magi"), fresh(arch, "eager")
    ids = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, -4:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    got = model(input_ids=ids, attention_mask=mask).logits
    ref = eager(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=2e-5, rtol=0)


def test_mixed_dtypes_run_in_the_autocast_dtype_and_grads_keep_each_dtype() -> None:
    layer = fresh("llama", "magi").model.layers[0].self_attn
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 10, 8, generator=g, requires_grad=True)  # float32 after RoPE
    k = torch.randn(1, 2, 10, 8, generator=g, requires_grad=True)
    v = torch.randn(1, 2, 10, 8, generator=g).bfloat16().requires_grad_()  # bfloat16 from v_proj
    with torch.autocast("cpu", torch.bfloat16):
        out, _ = magi_attention_forward(layer, q, k, v, scaling=layer.scaling)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert (q.grad.dtype, k.grad.dtype, v.grad.dtype) == (torch.float32, torch.float32, torch.bfloat16)
    qb, kb, vb = (x.detach().bfloat16().requires_grad_() for x in (q, k, v))
    ref, _ = magi_attention_forward(layer, qb, kb, vb, scaling=layer.scaling)  # no autocast: all bfloat16 in
    ref.float().square().sum().backward()
    assert torch.equal(out, ref)
    assert torch.equal(q.grad, qb.grad.float()) and torch.equal(v.grad, vb.grad)
    with pytest.raises(ValueError, match="share one dtype"):  # without autocast, mixed dtypes are still refused
        magi_attention_forward(layer, q, k, v, scaling=layer.scaling)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_model_trains_under_bf16_autocast(arch: str) -> None:
    model, sdpa = fresh(arch, "magi"), fresh(arch, "sdpa")
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(4))
    pos = torch.arange(30)[None]
    with torch.autocast("cpu", torch.bfloat16):
        loss = model(input_ids=ids, position_ids=pos, labels=ids).loss
        ref = sdpa(input_ids=ids, position_ids=pos, labels=ids).loss
    loss.backward()
    assert abs(loss.item() - ref.item()) < 2e-2
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and bool(torch.isfinite(g).all()) for g in grads)
