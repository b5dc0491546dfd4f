"""HF path inputs that used to be silently wrong: unshifted labels, a model whose attention is not
flexcp's, and a bidirectional encoder (is_causal=False), which flexcp now attends in full per document.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers")

import flexcp.hf  # noqa: E402
import flexcp.magi_attn_utils as mau  # noqa: E402
from hf_models import VOCAB, make_model  # noqa: E402
from multiproc import run_spawned  # noqa: E402


def _ids(b: int = 1, s: int = 24, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ labels
def test_labels_equal_to_input_ids_are_refused() -> None:
    mau.register_magi_attention()
    model, ids = make_model("llama", "magi"), _ids()
    with pytest.raises(ValueError, match=r"not shifted.*input_ids\[i \+ 1\].*shifted_labels"):
        mau.magi_prepare_batch(model, {"input_ids": ids, "labels": ids.clone()}, None)
    prompt_masked = ids.clone()
    prompt_masked[:, :10] = -100  # completion-only labels, still unshifted
    with pytest.raises(ValueError, match="not shifted"):
        mau.magi_prepare_batch(model, {"input_ids": ids, "shift_labels": prompt_masked}, None)


def test_shifted_labels_and_ambiguous_runs_pass() -> None:
    mau.register_magi_attention()
    model, ids = make_model("llama", "magi"), _ids()
    batch, _ = mau.magi_prepare_batch(model, {"input_ids": ids, "labels": flexcp.hf.shifted_labels(ids)}, None)
    assert batch["labels"][0, :23].tolist() == ids[0, 1:].tolist()
    same = torch.full((1, 8), 7)  # one repeated token: shifted or not, the targets are the same
    mau.magi_prepare_batch(model, {"input_ids": same, "labels": same.clone()}, None)


# ------------------------------------------------------------------------- not flexcp's attention
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_model_without_magi_attention_is_refused(impl: str, tmp_path) -> None:
    mau.register_magi_attention()
    model, ids = make_model("llama", impl), _ids()
    with pytest.raises(ValueError, match=rf"attn_implementation='{impl}'.*register_magi_attention.*'magi'"):
        mau.magi_prepare_batch(model, {"input_ids": ids}, None)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=1)
    with pytest.raises(ValueError, match=rf"FlexCPTrainer.*attn_implementation='{impl}'.*'magi'"):
        flexcp.hf.FlexCPTrainer(model=model, args=args, train_dataset=[{"input_ids": ids[0]}], cp_size=1)


# ----------------------------------------------------------------------------- encoders
def _bert(impl: str) -> torch.nn.Module:
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0,
                                  max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.BertModel._from_config(cfg, attn_implementation=impl).double().eval()


def _padded_batch() -> dict:
    ids = _ids(3, 12)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, :4] = 0  # left padding
    return {"input_ids": ids, "attention_mask": mask}


def _bert_hidden(cp_group) -> torch.Tensor:
    """The magi BERT's hidden states of the real tokens of :func:`_padded_batch`, gathered to the global order."""
    mau.register_magi_attention()
    batch = _padded_batch()
    model = _bert("magi")
    local, key = mau.magi_prepare_batch(model, batch, cp_group)
    hidden = flexcp.undispatch(model(**local).last_hidden_state[0], key)
    return hidden.reshape(3, 12, -1)[batch["attention_mask"].bool()].detach()


def _bert_cp2(rank: int, world: int) -> torch.Tensor:
    return _bert_hidden(dist.group.WORLD)


def test_bidirectional_encoder_attends_each_document_in_full() -> None:
    batch = _padded_batch()
    want = _bert("sdpa")(**batch).last_hidden_state[batch["attention_mask"].bool()].detach()
    torch.testing.assert_close(_bert_hidden(None), want, rtol=0, atol=1e-12)
    for got in run_spawned(_bert_cp2, 2, timeout=120):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_encoder_document_with_inner_padding_is_refused() -> None:
    mau.register_magi_attention()
    batch = _padded_batch()
    batch["attention_mask"][0, 5] = 0  # a hole inside the first row's document (positions continue)
    with pytest.raises(ValueError, match="bidirectional.*padding inside it"):
        mau.magi_prepare_batch(_bert("magi"), batch, None)


# ------------------------------------------------------------------- registration without asking
_FRESH = """
import sys
{imports}
assert flexcp.magi_attn_utils.REGISTRY.registered == {before}, "registered too early (or not at once)"
from transformers import LlamaConfig, LlamaForCausalLM
cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=32)
model = LlamaForCausalLM._from_config(cfg, attn_implementation="magi")  # no register_magi_attention() call
assert model.config._attn_implementation == "magi" and flexcp.magi_attn_utils._MAGI_REGISTERED
assert not any(type(f).__name__ == "_RegisterAfterLoad" for f in sys.meta_path)  # the hook removed itself
"""


@pytest.mark.parametrize("imports, before", [
    ("import flexcp, flexcp.magi_attn_utils\nassert 'transformers.modeling_utils' not in sys.modules", False),
    ("import transformers.modeling_utils, transformers.masking_utils, flexcp, flexcp.magi_attn_utils", True),
], ids=["flexcp-first", "transformers-first"])
def test_magi_is_registered_without_register_call(imports: str, before: bool) -> None:
    import subprocess
    import sys

    code = _FRESH.format(imports=imports, before=before)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
