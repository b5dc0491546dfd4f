"""flexcp.hf is the HF backend on its own: without the seed facade a call's key is its ``magi_key``
or the mask of its own inputs; importing ``flexcp.magi_attn_utils`` adds the seed's fallbacks.

Run in a fresh interpreter, so that no other test has imported the facade.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("transformers")

_SCRIPT = """
import sys, torch
import flexcp
from flexcp.hf.masks import prefix_tree_position_ids
from flexcp.hf.prepare import magi_prepare_batch
from flexcp.hf.registry import REGISTRY
from flexcp.mask import AttnMaskSpec
from transformers import LlamaConfig, LlamaForCausalLM

assert "flexcp.magi_attn_utils" not in sys.modules and REGISTRY.fallback is None
torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64)
model = LlamaForCausalLM._from_config(cfg, attn_implementation="magi")  # registered by import flexcp
nodes, paths = [6, 4, 5], [[0, 1], [0, 2]]
tree, _ = AttnMaskSpec.prefix_tree(nodes, paths)
batch = {"input_ids": torch.randint(0, 64, (1, 15)), "position_ids": prefix_tree_position_ids(nodes, paths)[None],
         "attn_spec": tree}
shard, key = magi_prepare_batch(model, batch, None)
explicit = model(**shard, use_cache=False).logits
shard.pop("magi_key")
own = model(**shard, use_cache=False).logits  # no facade: documents from the call's own position resets
import flexcp.magi_attn_utils
assert REGISTRY.fallback is not None
shard, _ = magi_prepare_batch(model, batch, None)  # the step's key is the most recent again
shard.pop("magi_key")
seed = model(**shard, use_cache=False).logits  # the facade's most recent key: the prepared tree
print(float((own - explicit).abs().max()), float((seed - explicit).abs().max()))
"""


def test_backend_has_no_seed_fallback_and_the_facade_adds_it() -> None:
    run = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    own_err, seed_err = map(float, run.stdout.split()[-2:])
    assert own_err > 1e-3, "without the facade a call without magi_key must not find the prepared tree's key"
    assert seed_err == 0.0, "with the facade the prepared batch's key is the fallback"


def test_the_facades_magi_state_prepares_a_batch_as_its_magi_prepare_batch_does() -> None:
    """The active spec (a facade setting) reaches the HF batch both ways; the backend's state never reads it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import flexcp.magi_attn_utils as mau
    from flexcp.hf.recipe import MagiState as BackendState

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64)
    mau.register_magi_attention()
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="magi")
    ids = torch.randint(0, 64, (1, 16))
    batch = {"input_ids": ids, "labels": torch.roll(ids, -1, 1), "position_ids": torch.arange(16)[None]}
    docs = mau.AttnMaskSpec.varlen([6, 10])
    mau.set_active_attn_spec(docs)
    try:
        _, direct = mau.magi_prepare_batch(model, dict(batch), None)
        state = mau.setup_magi({"model": {"attn_implementation": "magi"}}, None)
        _, via_state = state.prepare_llm_batch(model, dict(batch), None, False, 0, 1)
        _, backend = BackendState(enabled=True).prepare_llm_batch(model, dict(batch), None, False, 0, 1)
    finally:
        mau.set_active_attn_spec(None)
    assert direct.mask == via_state["magi_key"].mask == docs.fingerprint()
    assert backend["magi_key"].mask == mau.AttnMaskSpec.causal(16).fingerprint()
