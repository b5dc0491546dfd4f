"""Batch preparation: one step's mask and layout key, and the batch dispatched with it.

Both dispatching prep functions turn the *global* batch (the same on every CP rank) into
one flat sequence and its mask (documents, prefix tree, padding), then take one path,
:func:`_prepare`: build the layout key over the CP group, dispatch every per-token field
with it (input ids, the tokens' real positions for RoPE, pre-shifted labels with padding
-> ``IGNORE_INDEX``) and register the layout with the registry.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..mask import AttnMaskSpec
from ..runtime import DistAttnKey, build_key, dispatch
from ..sharding import IGNORE_INDEX, resolve_chunk_size
from ..runtime.key import group_info
from .modules import Heads, _get_head_config, _iter_language_model_attention, prepare_model
from .keys import DEFAULT_CHUNK_SIZE
from .masks import clean_cu_seqlens, cu_seqlens_layout, documents, in_full, row_positions, step_mask
from .registry import REGISTRY

LAYOUT_FIELDS = ("attention_mask", "cu_seqlens", "cu_seqlens_padded", "attn_spec", "max_seqlen", "qkv_format")
"""Batch fields the dispatched batch no longer carries: the key holds what they described."""
PREPARED_FIELDS = ("position_ids", "labels", "shift_labels")
"""Per-token fields ``magi_prepare_batch`` derives itself (real positions, flat pre-shifted labels)."""


def _input_ids(batch: dict) -> torch.Tensor:
    if not isinstance(batch, Mapping):
        raise ValueError(f"batch must be a dict of tensors with at least 'input_ids' ([S] or [B, S]); "
                         f"got {type(batch).__name__}")
    ids = batch.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() not in (1, 2):
        got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"batch['input_ids'] must be a [S] or [B, S] tensor; got {got}")
    return ids if ids.dim() == 2 else ids[None, :]


def _mask_and_positions(batch: dict, b: int, s: int, causal: bool = True) -> tuple[AttnMaskSpec, np.ndarray]:
    """The step's mask over the ``b * s`` flat tokens and their real positions (:func:`.masks.step_mask`).

    The explicit spec is ``batch['attn_spec']`` (used as given, and then the batch must carry
    ``position_ids`` and no padding); documents found from
    ``cu_seqlens`` or the rows are causal, or attended in full when ``causal`` is False (an encoder).
    """
    pos = batch.get("position_ids")
    padding = batch.get("attention_mask")
    spec = batch.get("attn_spec")
    found, positions = step_mask(b, s, spec=spec, cu_seqlens=batch.get("cu_seqlens"),
                                 cu_seqlens_padded=batch.get("cu_seqlens_padded"), position_ids=pos,
                                 attention_mask=padding)
    if spec is not None:
        if pos is None:
            raise ValueError(
                "a batch with its own AttnMaskSpec needs position_ids (the tokens' real positions, e.g. "
                "prefix_tree_position_ids(...) for a prefix tree); RoPE cannot infer them from the mask"
            )
        if padding is not None and not bool(torch.as_tensor(padding).all()):
            raise ValueError("with an AttnMaskSpec, leave padding tokens out of the spec instead of passing attention_mask")
    if spec is None and not causal:
        found = in_full(found)
    return found, (row_positions(b, s, None) if positions is None else positions)


def _split(batch: dict, b: int, s: int) -> tuple[dict, dict]:
    """``batch`` without its layout fields, as ``(its [B, S] tensor fields, the other fields)``."""
    rows, rest = {}, {}
    for name, value in batch.items():
        if name not in LAYOUT_FIELDS:
            per_token = isinstance(value, torch.Tensor) and tuple(value.shape) == (b, s)
            (rows if per_token else rest)[name] = value
    return rows, rest


def _flat_labels(labels: torch.Tensor, spec: AttnMaskSpec) -> torch.Tensor:
    """Flat pre-shifted labels with tokens in no document (padding) set to ``IGNORE_INDEX``: they learn nothing."""
    if not isinstance(labels, torch.Tensor) or labels.numel() != spec.total_seqlen:
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a tensor with one entry per token ({spec.total_seqlen}); got {got}")
    flat = labels.reshape(-1).clone()
    flat[~torch.from_numpy(spec.row_key_counts() > 0).to(flat.device)] = IGNORE_INDEX
    return flat


def check_shifted(input_ids: torch.Tensor, labels: torch.Tensor) -> None:
    """Refuse labels that equal ``input_ids`` at every labelled token: HF-style labels, not shifted.

    Pre-shifted labels are ``input_ids[i + 1]`` (or ignored) at position ``i``; equal to
    ``input_ids[i]`` everywhere they would train each token to predict itself. Labels that
    fit both readings (a run of one repeated token) are let through: shifting changes nothing.
    """
    ids, lab = input_ids.reshape(-1), labels.reshape(-1).to(input_ids.device)
    kept = lab != IGNORE_INDEX
    if ids.numel() != lab.numel() or not bool(kept.any()) or not bool((lab[kept] == ids[kept]).all()):
        return
    nxt = kept[:-1]
    if not bool((lab[:-1][nxt] == ids[1:][nxt]).all()):
        raise ValueError(
            "labels equal input_ids at every labelled token: they are not shifted, so each token would learn to "
            "predict itself. magi_prepare_batch (and shift_labels given to a flexcp trainer) takes pre-shifted "
            "labels: labels[i] is the target of position i, i.e. input_ids[i + 1], with "
            f"{IGNORE_INDEX} at each document's last token (HF's model-side shift would pair the wrong tokens "
            "after dispatch). Shift them first, e.g. flexcp.hf.shifted_labels(labels), or give HF-style labels "
            "to a flexcp trainer, which shifts them itself"
        )


def _prepare(heads: Heads, cp_group, spec: AttnMaskSpec, positions: np.ndarray, chunk_size: int,
             fields: dict[str, torch.Tensor], labels: torch.Tensor | None) -> tuple[dict, DistAttnKey]:
    """The one preparation path: the layout key of ``spec``, the flat dispatched fields, the registered layout.

    Returns ``({name: local flat tensor}, key)`` for every field in ``fields`` (any shape
    with one entry per token), ``position_ids`` (the real ``positions``) and, when given,
    ``labels`` (pre-shifted; padding -> ``IGNORE_INDEX``). Refuses labels that are not shifted.
    """
    if labels is not None:
        check_shifted(fields["input_ids"], labels)
    key = build_key(spec, cp_group, num_heads_q=heads[0], num_heads_kv=heads[1], head_dim=heads[2],
                    chunk_size=chunk_size)
    device = fields["input_ids"].device
    out = {name: dispatch(x.reshape(-1), key) for name, x in fields.items()}
    out["position_ids"] = dispatch(torch.from_numpy(positions).to(device), key)
    if labels is not None:
        out["labels"] = dispatch(_flat_labels(labels, spec), key, pad_value=IGNORE_INDEX)
    REGISTRY.register_layout(key, positions, prepared=True, local_positions=out["position_ids"].cpu().numpy())
    return out, key


def magi_prepare_batch(model, batch: dict, cp_group, chunk_size: int = DEFAULT_CHUNK_SIZE):
    """Dispatch a batch for magi attention on the HF path; returns ``(new_batch, key)``.

    Builds the step's mask over the flattened batch (rows become documents; position
    resets and ``cu_seqlens`` split documents; padding attends to nothing; a prefix tree
    comes from ``batch['attn_spec']``), builds the layout
    key over ``cp_group`` (identity shard plus chunk padding at cp = 1, load-balanced at
    cp > 1), dispatches ``input_ids``, real ``position_ids`` and ``labels`` (plus any other
    ``[B, S]`` tensor field) to ``[1, local_S]``, and stamps ``cp_group`` on every attention
    module. ``new_batch['magi_key']`` is the key: ``model(**new_batch)`` (labels popped)
    forwards it to every attention layer.

    Labels must be pre-shifted (``labels[i]`` is the target of position ``i``, ``IGNORE_INDEX``
    to ignore; ``batch['shift_labels']`` is read when ``labels`` is absent): after dispatch a
    rank's tokens are not contiguous, so HF's in-model shift would pair wrong tokens. The
    local labels are returned as both ``labels`` and ``shift_labels``, so
    ``model(**new_batch).loss`` uses them as they are (transformers >= 4.50 honours
    ``shift_labels``) and is this shard's mean; pass ``num_items_in_batch=`` the global
    number of label tokens to get per-shard losses that sum over the CP ranks to the cp = 1
    mean (or compute a sum loss from the logits).
    """
    ids = _input_ids(batch)
    b, s = ids.shape
    heads, bidirectional = prepare_model(model, cp_group, "magi_prepare_batch")
    spec, positions = _mask_and_positions(batch, b, s, causal=not bidirectional)
    rows, new_batch = _split(batch, b, s)
    rows = {name: x for name, x in rows.items() if name not in PREPARED_FIELDS}
    rows["input_ids"] = ids
    labels = batch.get("labels") if batch.get("labels") is not None else batch.get("shift_labels")
    local, key = _prepare(heads, cp_group, spec, positions, chunk_size, rows, labels)
    new_batch.update({name: x.unsqueeze(0) for name, x in local.items()})
    if labels is not None:
        new_batch["shift_labels"] = new_batch["labels"]  # shift_labels: HF must not shift again
    new_batch["magi_key"] = key
    return new_batch, key


def _packed_cp_doc_seqlens(batch: dict, total_len: int) -> list:
    """Resolve per-document lengths spanning the padded THD layout of length ``total_len``.

    ``cu_seqlens_padded`` (the collater's per-document padding) takes precedence over
    ``cu_seqlens``; negative padding sentinels (e.g. -1000) are dropped. Raises
    ``ValueError`` if the documents do not span ``total_len``, which would otherwise
    surface later as a shard / RoPE length mismatch.
    """
    cu = batch.get("cu_seqlens_padded")
    if cu is None:
        cu = batch.get("cu_seqlens")
    if cu is None:
        raise ValueError("a packed THD batch needs cu_seqlens (or cu_seqlens_padded) marking document boundaries")
    seqlens = np.diff(clean_cu_seqlens(cu)).tolist()
    if sum(seqlens) != total_len:
        raise ValueError(
            f"magi packed-CP: the documents span {sum(seqlens)} tokens but the flat input has {total_len}; "
            "cu_seqlens_padded must span the padded THD layout"
        )
    return seqlens


def magi_prepare_packed_cp(model, batch: dict, cp_group):
    """Context-parallel prep for a packed (THD) batch on the custom-model path; ``(new_batch, key)``.

    Takes the global THD batch (flat ``input_ids``/``labels``/``position_ids`` plus
    ``cu_seqlens``, optionally ``cu_seqlens_padded``), builds the per-document key of
    :func:`build_flex_key` (padding rows of a padded layout attend to nothing) and
    dispatches the sequence with flexcp's load balancer. ``new_batch`` holds the local
    flat ``input_ids``, real per-document ``position_ids``, ``labels`` (padding ``IGNORE_INDEX``) and
    ``qkv_format='thd'``; the attention func finds the key via ``get_most_recent_key``.
    """
    ids = batch["input_ids"].reshape(-1)
    total = int(ids.numel())
    _packed_cp_doc_seqlens(batch, total)
    cu, cu_padded = batch.get("cu_seqlens"), batch.get("cu_seqlens_padded")
    if cu is None:
        cu, cu_padded = cu_padded, None
    spec, doc_pos = cu_seqlens_layout(cu, cu_padded, total)
    pos = batch.get("position_ids")
    positions = doc_pos if pos is None else row_positions(1, total, pos.reshape(-1))
    chunk_size = resolve_chunk_size(total, group_info(cp_group)[0])  # build_flex_key's: no padding at cp = 1
    new_batch, key = _prepare(_get_head_config(model), cp_group, spec, positions, chunk_size, {"input_ids": ids},
                              batch.get("labels"))
    new_batch["qkv_format"] = "thd"
    return new_batch, key


def magi_prepare_vlm(model, batch: dict, cp_group):
    """Prepare a VLM step for magi attention on the language backbone; returns ``(batch, None)``.

    A VLM merges image features into ``inputs_embeds`` inside its forward, so ``input_ids``
    cannot be dispatched: only cp = 1 is supported. The cp_group (and a self-key flag) is
    stamped on the language-model attention modules only; each layer builds its causal key
    from the real post-merge query length (batch rows become documents, a padding
    ``attention_mask`` is honoured). The vision tower keeps no cp_group and uses SDPA.
    """
    ids = batch.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError("magi VLM path requires batch['input_ids'] of shape [B, S]")
    cp_size = group_info(cp_group)[0]
    if cp_size != 1:
        raise NotImplementedError(
            f"magi VLM path supports cp_size == 1 (got {cp_size}): image features are merged inside the model's "
            "forward, after the point where tokens could be dispatched"
        )
    for module in _iter_language_model_attention(model):
        module.cp_group = cp_group
        module._magi_self_key = True
    return batch, None


def to_thd(batch: dict) -> dict:
    """A ``[B, S]`` batch as one flat THD sequence with ``cu_seqlens`` (+ ``cu_seqlens_padded``) and positions.

    Documents come from rows, position resets and padding (:func:`documents`); a padding
    token joins the padded extent of the document before it. Batches that already carry
    ``cu_seqlens`` are only flattened.
    """
    ids = _input_ids(batch)
    b, s = ids.shape
    rows, rest = _split(batch, b, s)
    out: dict[str, Any] = {**rest, **{name: x.reshape(-1) for name, x in rows.items()}}
    out["qkv_format"] = "thd"
    if batch.get("cu_seqlens") is not None:
        for name in ("cu_seqlens", "cu_seqlens_padded"):
            if batch.get(name) is not None:
                out[name] = batch[name]
        return out
    spec = documents(b, s, batch.get("position_ids"), batch.get("attention_mask"))
    if spec.q_ranges != spec.k_ranges:
        raise ValueError("to_thd: attention_mask pads tokens inside a document, which THD cannot express "
                         "(cu_seqlens_padded pads only at document ends); pack without inner padding, or use "
                         "magi_prepare_batch, which keeps such documents whole")
    starts = np.asarray([q[0] for q in spec.q_ranges], dtype=np.int64)
    ends = np.asarray([q[1] for q in spec.q_ranges], dtype=np.int64)
    lead = not (len(starts) and starts[0] == 0)  # leading padding: a document with no real tokens
    padded = np.concatenate([[0], starts if lead else starts[1:], [b * s]])
    real = np.concatenate([[0] * int(lead), ends - starts])
    out["cu_seqlens"] = torch.from_numpy(np.concatenate([[0], np.cumsum(real)])).to(torch.int32)
    out["cu_seqlens_padded"] = torch.from_numpy(padded).to(torch.int32)
    out["position_ids"] = torch.from_numpy(row_positions(b, s, batch.get("position_ids"))).to(ids.device)
    if batch.get("labels") is not None:
        out["labels"] = _flat_labels(batch["labels"], spec)
    return out


__all__ = ["_packed_cp_doc_seqlens", "magi_prepare_batch", "magi_prepare_packed_cp", "magi_prepare_vlm", "to_thd"]
