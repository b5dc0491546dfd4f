"""Recipe data: packing keeps documents apart, chat loss masks, prefix-tree layout and labels, recall.

The model-level checks run the tiny preset on a packed sequence with magi attention (cp = 1)
and compare with every document / rollout sample run on its own with HF SDPA.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flexcp.mask import AttnMaskSpec
from flexcp.train.data import (
    IGNORE_INDEX,
    JsonlSource,
    RecallSource,
    RolloutGroup,
    RolloutSource,
    next_fit,
    pack_documents,
    pack_rollouts,
    shifted_labels,
)
from flexcp.train.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def test_pack_documents_layout():
    docs = [([1, 2, 3, 4, 5], shifted_labels([1, 2, 3, 4, 5], [True] * 5)), ([6, 7, 8], [7, 8, IGNORE_INDEX])]
    seq = pack_documents(docs, 12, pad_id=0)
    assert seq.input_ids.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0]
    assert seq.labels.tolist() == [2, 3, 4, 5, -100, 7, 8, -100, -100, -100, -100, -100]
    assert seq.position_ids.tolist()[:8] == [0, 1, 2, 3, 4, 0, 1, 2]
    dense = seq.spec.to_dense().numpy()
    want = np.zeros((12, 12), dtype=bool)
    for s, e in [(0, 5), (5, 8)]:
        want[s:e, s:e] = np.tril(np.ones((e - s, e - s), dtype=bool))
    assert (dense == want).all()  # documents never see each other; padding attends to nothing
    with pytest.raises(ValueError, match="do not fit"):
        pack_documents(docs, 7, pad_id=0)


def test_chat_loss_only_on_assistant_turns():
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}, {"role": "user", "content": "?"},
            {"role": "assistant", "content": "ok"}]
    ids, mask = TOK.encode_chat(msgs)
    assert ids == TOK.render_chat(msgs)
    trained = [TOK.decode([i]) if i < 256 else i for i, m in zip(ids, mask) if m]
    assert trained == ["y", "o", TOK.eos_id, "o", "k", TOK.eos_id]  # content + end of turn, no headers
    labels = shifted_labels(ids, mask)
    want = [ord("y"), ord("o"), TOK.eos_id, ord("o"), ord("k"), TOK.eos_id]
    assert [lab for lab in labels if lab != IGNORE_INDEX] == want
    with pytest.raises(ValueError, match="role"):
        TOK.encode_chat([{"content": "x"}])


def test_hf_tokenizer_chat_masks(tmp_path):
    """A checkpoint's tokenizer (here a small one saved with save_pretrained) and its own chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from flexcp.train.tokenizer import HFTokenizer, load_tokenizer

    specials = ["<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|end|>"]
    vocab = {t: i for i, t in enumerate([chr(c) for c in range(32, 127)] + specials)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=specials[3:])
    fast.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    fast.save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert isinstance(tok, HFTokenizer) and (tok.bos_id, tok.eos_id, tok.pad_id) == (95, 96, 97)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "?"}, {"role": "assistant", "content": "ok"}]
    ids, mask = tok.encode_chat(msgs)
    assert ids == tok.render_chat(msgs)
    trained = [tok.tok.convert_ids_to_tokens(i) for i, m in zip(ids, mask) if m]
    assert trained == ["y", "o", "<|end|>", "o", "k", "<|end|>"]  # assistant content and end of turn only


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_jsonl_source_packs_every_document_once_per_epoch(tmp_path):
    rng = np.random.default_rng(0)
    recs = [{"text": "x" * int(n)} for n in rng.integers(5, 60, size=20)]
    recs.append({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * 10}]})
    recs.append({"text": "y" * 150})  # longer than seq_len: cut into pieces
    src = JsonlSource(_write_jsonl(tmp_path / "d.jsonl", recs), TOK, 64, seed=1, shuffle=True)
    assert len(src.docs) == 21 + 3
    epoch = src.packer._epoch(0)
    assert sorted(i for b in epoch for i in b) == list(range(len(src.docs)))
    for b in range(len(epoch)):
        seq = src.get(b)
        assert seq.input_ids.shape == (64,) and len(seq.spec) == len(epoch[b])
        assert torch.equal(seq.input_ids, src.get(b).input_ids)  # deterministic (exact resume)
    assert src.packer._epoch(1) != epoch  # reshuffled per epoch
    with pytest.raises(ValueError, match="needs 'text' or 'messages'"):
        JsonlSource(_write_jsonl(tmp_path / "bad.jsonl", [{"txt": "a"}]), TOK, 64, 0, False)


def test_next_fit():
    assert next_fit([3, 3, 5, 1, 8], 8) == [[0, 1], [2, 3], [4]]


def test_rollout_layout_paths_and_labels():
    g1 = RolloutGroup([257, 10, 11, 12], [[20, 21, 258], [30, 258]])
    g2 = RolloutGroup([257, 40], [[50, 51, 258]])
    seq = pack_rollouts([g1, g2], 24, pad_id=256)
    dense = seq.spec.to_dense().numpy()
    ids, labels, pos = seq.input_ids.tolist(), seq.labels.tolist(), seq.position_ids.tolist()
    # flat: [257 10 11 | 12 20 21 258 | 12 30 258 | 257 | 40 50 51 258 | pad...]
    samples = [(list(range(0, 3)) + list(range(3, 7)), [257, 10, 11, 12, 20, 21, 258]),
               (list(range(0, 3)) + list(range(7, 10)), [257, 10, 11, 12, 30, 258]),
               ([10] + list(range(11, 15)), [257, 40, 50, 51, 258])]
    for rows, tokens in samples:
        assert [ids[r] for r in rows] == tokens
        assert [pos[r] for r in rows] == list(range(len(rows)))
        n_prompt = {7: 4, 6: 4, 5: 2}[len(tokens)]
        want = [IGNORE_INDEX] * (n_prompt - 1) + tokens[n_prompt:] + [IGNORE_INDEX]
        assert [labels[r] for r in rows] == want
        sub = dense[np.ix_(rows, rows)]
        assert (sub == np.tril(np.ones_like(sub))).all()  # a path is one causal sequence
        others = [c for c in range(24) if c not in rows]
        assert not dense[np.ix_(rows, others)].any()  # and sees nothing else
    assert not dense[15:].any() and all(lab == IGNORE_INDEX for lab in labels[15:])


def test_rollout_source_rejects_oversized_groups(tmp_path):
    path = _write_jsonl(tmp_path / "r.jsonl", [{"prompt": "p" * 50, "completions": ["c" * 30, "d" * 30]}])
    with pytest.raises(ValueError, match="raise data.seq_len"):
        RolloutSource(path, TOK, 64, 0, False)
    src = RolloutSource(path, TOK, 128, 0, False)
    assert src.get(0).num_label_tokens == 62


@pytest.mark.parametrize("pairs", [1, 3])
def test_recall_needs_attention_across_shards(pairs):
    s = 512
    src = RecallSource(s, pairs, 16, seed=0, bos_id=TOK.bos_id)
    for i in range(20):
        seq = src.get(i)
        ids, labels = seq.input_ids.numpy(), seq.labels.numpy()
        queries = np.nonzero(labels != IGNORE_INDEX)[0]
        assert len(queries) == pairs
        for q in queries:
            (k,) = np.nonzero(ids[: s // 2] == ids[q])[0]
            assert s // 4 <= k < s // 2
            assert ids[k + 1] == labels[q] and chr(labels[q]) in "0123456789#$%&*+/"
            assert q - (k + 1) > s // 2  # further back than one shard at cp = 2
        assert seq.spec == AttnMaskSpec.causal(s)
        assert torch.equal(seq.input_ids, src.get(i).input_ids)


# ---------------------------------------------------------------------- model-level equivalence


def _models():
    from flexcp.magi_attn_utils import register_magi_attention
    from flexcp.train.model import preset_config
    from transformers import AutoModelForCausalLM

    register_magi_attention()
    torch.manual_seed(0)
    magi = AutoModelForCausalLM.from_config(preset_config("tiny", TOK.vocab_size), attn_implementation="magi",
                                            dtype=torch.float64)
    sdpa = AutoModelForCausalLM.from_config(preset_config("tiny", TOK.vocab_size), attn_implementation="sdpa",
                                            dtype=torch.float64)
    assert magi.config._attn_implementation == "magi"
    sdpa.load_state_dict(magi.state_dict())
    return magi, sdpa


def _packed_loss(model, seq) -> torch.Tensor:
    from flexcp.magi_attn_utils import magi_prepare_batch
    from flexcp.train.loss import CausalLMLoss

    batch = {"input_ids": seq.input_ids[None], "labels": seq.labels[None], "position_ids": seq.position_ids[None],
             "attn_spec": seq.spec}
    local, key = magi_prepare_batch(model, batch, None, chunk_size=32)
    loss, _ = CausalLMLoss(model, chunk_tokens=16)(local["input_ids"], local["position_ids"], local["labels"],
                                                   magi_key=key)
    return loss


def _alone_loss(model, tokens: list[int], targets: list[int]) -> torch.Tensor:
    logits = model(input_ids=torch.tensor([tokens])).logits[0]
    return F.cross_entropy(logits, torch.tensor(targets), ignore_index=IGNORE_INDEX, reduction="sum")


def test_packed_documents_equal_documents_alone():
    magi, sdpa = _models()
    rng = np.random.default_rng(0)
    docs = []
    for n in (40, 17, 60):
        ids = rng.integers(0, 256, size=n).tolist()
        docs.append((ids, shifted_labels(ids, [True] * n)))
    packed = _packed_loss(magi, pack_documents(docs, 128, TOK.pad_id))
    alone = sum(_alone_loss(sdpa, ids, labels) for ids, labels in docs)
    torch.testing.assert_close(packed, alone, rtol=1e-10, atol=1e-9)  # float64 in, float64 loss out


def test_prefix_tree_equals_samples_alone():
    magi, sdpa = _models()
    rng = np.random.default_rng(1)
    r = lambda n: rng.integers(0, 256, size=n).tolist()  # noqa: E731
    groups = [RolloutGroup([TOK.bos_id] + r(30), [r(12) + [TOK.eos_id], r(20) + [TOK.eos_id], r(5)]),
              RolloutGroup([TOK.bos_id] + r(9), [r(25)])]
    packed = _packed_loss(magi, pack_rollouts(groups, 192, TOK.pad_id))
    alone = 0
    for g in groups:
        for c in g.completions:
            tokens = g.prompt + c
            alone = alone + _alone_loss(sdpa, tokens, [IGNORE_INDEX] * (len(g.prompt) - 1) + c + [IGNORE_INDEX])
    torch.testing.assert_close(packed, alone, rtol=1e-10, atol=1e-9)  # float64 in, float64 loss out
