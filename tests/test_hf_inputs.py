"""HF path inputs that used to be silently wrong: inner padding, and model(**batch) after magi_prepare_batch.

Padding inside a document with position_ids = arange must not split the document (eager does
not); the batch magi_prepare_batch returns must give HF's own loss without a second shift, at
cp = 1 and (per-shard losses summed, num_items_in_batch = the global label count) at cp = 2.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")

import flexcp.magi_attn_utils as mau  # noqa: E402
from multiproc import run_spawned  # noqa: E402
from hf_models import VOCAB, make_model  # noqa: E402


def _ids(n=40, seed=3):
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _pre_shifted(ids):
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    return labels


def test_inner_padding_with_arange_positions_matches_eager():
    mau.register_magi_attention()
    ids = _ids(24)
    mask = torch.ones_like(ids)
    mask[0, [5, 6, 15]] = 0  # padding inside the one document
    pos = torch.arange(24)[None]
    eager = make_model("llama", "eager")(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    magi_model = make_model("llama", "magi")
    batch, _ = mau.magi_prepare_batch(magi_model, {"input_ids": ids, "attention_mask": mask, "position_ids": pos},
                                      None)
    prepared = magi_model(**batch, use_cache=False).logits[:, :24]
    mau._set_cp_group_on_attention(magi_model, None)
    direct = magi_model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    real = mask[0].bool()
    for got in (prepared, direct):
        torch.testing.assert_close(got[0, real], eager[0, real], rtol=1e-5, atol=1e-5)


def test_model_call_on_prepared_batch_gives_hf_loss_at_cp1():
    mau.register_magi_attention()
    ids = _ids()
    want = make_model("llama", "eager")(input_ids=ids, labels=ids, use_cache=False).loss  # HF shifts itself
    model = make_model("llama", "magi")
    batch, _ = mau.magi_prepare_batch(model, {"input_ids": ids, "labels": _pre_shifted(ids)}, None)
    assert batch["shift_labels"] is batch["labels"]
    torch.testing.assert_close(model(**batch, use_cache=False).loss, want, rtol=1e-5, atol=1e-5)


def _cp2_loss(rank, world):
    mau.register_magi_attention()
    ids = _ids()
    labels = _pre_shifted(ids)
    model = make_model("llama", "magi")
    batch, _ = mau.magi_prepare_batch(model, {"input_ids": ids, "labels": labels}, dist.group.WORLD)
    n = int((labels != -100).sum())
    return model(**batch, use_cache=False, num_items_in_batch=n).loss.item()


def test_model_call_on_prepared_batch_gives_hf_loss_at_cp2():
    ids = _ids()
    want = make_model("llama", "eager")(input_ids=ids, labels=ids, use_cache=False).loss.item()
    losses = run_spawned(_cp2_loss, 2, timeout=120)
    assert sum(losses) == pytest.approx(want, rel=1e-5)


def test_batch_none_is_a_clear_error():
    with pytest.raises(ValueError, match="batch must be a dict of tensors"):
        mau.magi_prepare_batch(make_model("llama", "magi"), None, None)
