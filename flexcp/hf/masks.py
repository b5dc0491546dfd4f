"""Masks the Hugging Face path derives from a batch: the one precedence of a batch's mask (:func:`step_mask`).

Everything here is O(tokens) numpy on the slice table: documents from batch rows, position
resets, padding or ``cu_seqlens``; the mask an attention call infers from its own inputs
(:class:`CallMask`); the positions RoPE needs for a prefix tree; encoders' full documents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..mask import AttnMaskSpec, AttnMaskType, from_cu_seqlens
from ..mask.geometry import slice_areas

def as_numpy(x: Any, dtype=np.int64) -> np.ndarray:
    """A tensor, array or list as a numpy array (copied off the device once)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def expand_rows(name: str, x: Any, batch_size: int, seqlen: int, dtype=np.int64) -> np.ndarray:
    """``x`` as a ``[batch_size, seqlen]`` array; ``[S]`` and ``[1, S]`` broadcast over rows."""
    arr = as_numpy(x, dtype)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != seqlen or arr.shape[0] not in (1, batch_size):
        raise ValueError(
            f"{name} must be [S], [1, S] or [B, S] with B={batch_size}, S={seqlen}; got shape {tuple(arr.shape)}"
        )
    return np.broadcast_to(arr, (batch_size, seqlen))


def documents(
    batch_size: int, seqlen: int, position_ids: Any = None, attention_mask: Any = None
) -> AttnMaskSpec:
    """Causal documents of a ``[B, S]`` batch laid out row after row (``B * S`` flat tokens).

    A document starts at each row's first real token and wherever a real token's
    position does not continue the previous real token's (HF's packed-sequence rule).
    Tokens with ``attention_mask == 0`` belong to no document: they attend to nothing and
    nothing attends to them. Padding inside a document does not split it (as in HF eager
    attention) when the positions continue across it, either through the padding
    (``arange``) or skipping it (``attention_mask.cumsum(-1) - 1``); the document's real
    tokens then attend each other causally around the hole.
    """
    n = batch_size * seqlen
    real = np.ones(n, dtype=bool)
    if attention_mask is not None:
        real = expand_rows("attention_mask", attention_mask, batch_size, seqlen, bool).reshape(-1)
    idx = np.nonzero(real)[0]
    if len(idx) == 0:
        return AttnMaskSpec([], [], [], n)
    starts = np.ones(len(idx), dtype=bool)
    cont = (idx[1:] // seqlen) == (idx[:-1] // seqlen)
    step = idx[1:] - idx[:-1]
    if position_ids is not None:
        pos = expand_rows("position_ids", position_ids, batch_size, seqlen).reshape(-1)
        jump = pos[idx[1:]] - pos[idx[:-1]]
        cont &= (jump == 1) | (jump == step)
    starts[1:] = ~cont
    first = np.nonzero(starts)[0]
    last = np.append(first[1:] - 1, len(idx) - 1)
    ranges = np.stack([idx[first], idx[last] + 1], axis=1)
    if not (cont & (step > 1)).any():  # no document has a hole: one causal slice each
        ranges = ranges.tolist()
        return AttnMaskSpec(ranges, ranges, [AttnMaskType.CAUSAL] * len(ranges), n)
    return _documents_with_holes(idx, first, last, n)


def _documents_with_holes(idx: np.ndarray, first: np.ndarray, last: np.ndarray, n: int) -> AttnMaskSpec:
    """Each document's runs of real tokens: a run attends itself causally and every earlier run fully."""
    q: list[tuple[int, int]] = []
    k: list[tuple[int, int]] = []
    types: list[AttnMaskType] = []
    for a, b in zip(first.tolist(), last.tolist()):
        tokens = idx[a : b + 1]
        breaks = np.nonzero(np.diff(tokens) > 1)[0]
        run_starts = tokens[np.concatenate([[0], breaks + 1])]
        run_ends = tokens[np.concatenate([breaks, [len(tokens) - 1]])] + 1
        runs = list(zip(run_starts.tolist(), run_ends.tolist()))
        for i, run in enumerate(runs):
            for earlier in runs[: i + 1]:
                q.append(run)
                k.append(earlier)
                types.append(AttnMaskType.CAUSAL if earlier == run else AttnMaskType.FULL)
    return AttnMaskSpec(q, k, types, n)


def row_positions(batch_size: int, seqlen: int, position_ids: Any = None) -> np.ndarray:
    """Flat real positions of a ``[B, S]`` batch: ``position_ids``, else ``arange(S)`` per row (HF's default)."""
    if position_ids is None:
        return np.tile(np.arange(seqlen, dtype=np.int64), batch_size)
    return expand_rows("position_ids", position_ids, batch_size, seqlen).reshape(-1).copy()


def clean_cu_seqlens(cu: Any) -> np.ndarray:
    """``cu_seqlens`` flattened, with fixed-shape padding sentinels (negative entries, e.g. TE's -1000) dropped."""
    arr = as_numpy(cu).reshape(-1)
    return arr[arr >= 0]


def cu_seqlens_layout(cu_seqlens: Any, cu_seqlens_padded: Any, total: int) -> tuple[AttnMaskSpec, np.ndarray]:
    """Spec and per-document positions of a packed THD sequence of ``total`` tokens.

    With ``cu_seqlens_padded`` each document's padding attends to nothing; positions
    restart at 0 at every (padded) document start. The layout must span ``total``.
    """
    cu = clean_cu_seqlens(cu_seqlens)
    cup = None if cu_seqlens_padded is None else clean_cu_seqlens(cu_seqlens_padded)
    bounds = cu if cup is None else cup
    if len(bounds) < 1 or int(bounds[-1]) != total:
        name = "cu_seqlens" if cup is None else "cu_seqlens_padded"
        raise ValueError(
            f"{name} = {bounds.tolist()} spans {int(bounds[-1]) if len(bounds) else 0} tokens but the flat input has "
            f"{total}; the document layout must cover every token (pass cu_seqlens_padded for a padded THD layout)"
        )
    spec = from_cu_seqlens(cu, cup)
    starts = np.repeat(bounds[:-1], np.diff(bounds))
    return spec, np.arange(total, dtype=np.int64) - starts


def step_mask(
    batch_size: int,
    seqlen: int,
    *,
    spec: AttnMaskSpec | None = None,
    cu_seqlens: Any = None,
    cu_seqlens_padded: Any = None,
    position_ids: Any = None,
    attention_mask: Any = None,
) -> tuple[AttnMaskSpec, np.ndarray | None]:
    """The step's mask over ``batch_size * seqlen`` flat tokens and their real positions: the one precedence.

    1. ``spec``, an explicit AttnMaskSpec (a batch's ``attn_spec``, a call's ``magi_attn_spec``,
       the active spec), as given;
    2. ``cu_seqlens`` (+ ``cu_seqlens_padded``): the packed documents of one row;
    3. documents from the rows, ``position_ids`` resets and the padding ``attention_mask``.

    Positions are ``position_ids`` when given, else 2's per-document positions, else None (the
    rows' own ``arange``). Every HF-path caller (batch preparation, the attention layers' step
    key, the custom-model attn func) reads its mask through this function.
    """
    n = batch_size * seqlen
    positions = None if position_ids is None else row_positions(batch_size, seqlen, position_ids)
    if spec is not None:
        if not isinstance(spec, AttnMaskSpec) or spec.total_seqlen != n:
            total = spec.total_seqlen if isinstance(spec, AttnMaskSpec) else type(spec).__name__
            raise ValueError(f"the step's AttnMaskSpec must cover the batch's {n} flat tokens; got {total}")
        return spec, positions
    if cu_seqlens is not None:
        if batch_size != 1:
            raise ValueError(f"cu_seqlens describes one packed row; the batch has {batch_size} rows: flatten them to [1, T]")
        spec, doc_pos = cu_seqlens_layout(cu_seqlens, cu_seqlens_padded, n)
        return spec, (doc_pos if positions is None else positions)
    return documents(batch_size, seqlen, position_ids, attention_mask), positions


@dataclass
class CallMask:
    """The mask an HF attention call infers from its own inputs (rows, position resets, padding), on demand.

    A ``keys.LocalLayout``: :func:`.keys.resolve_key` asks for it only when no key is given.
    """

    batch_size: int
    seqlen: int
    position_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    use_positions: bool

    def _pos(self) -> torch.Tensor | None:
        pos = self.position_ids if self.use_positions else None
        if pos is not None and pos.dim() > 2:
            raise ValueError(
                f"position_ids of shape {tuple(pos.shape)} (multimodal RoPE) do not describe documents; "
                "prepare VLM batches with magi_prepare_vlm"
            )
        return pos

    def spec(self) -> AttnMaskSpec:
        """The call's documents (:func:`step_mask`)."""
        return step_mask(self.batch_size, self.seqlen, position_ids=self._pos(), attention_mask=self.attention_mask)[0]

    def positions(self) -> np.ndarray | None:
        """The call's real positions (``position_ids``), or None."""
        return step_mask(self.batch_size, self.seqlen, position_ids=self._pos())[1]


def prefix_tree_position_ids(node_lengths: Sequence[int], sample_paths: Sequence[Sequence[int]]) -> torch.Tensor:
    """Real positions of a prefix tree's flat layout: a node continues from its ancestors' lengths.

    Pair it with ``AttnMaskSpec.prefix_tree(node_lengths, sample_paths)`` so RoPE sees
    every completion continue from its prompt.
    """
    lens = np.asarray(list(node_lengths), dtype=np.int64)
    depth = np.full(len(lens), -1, dtype=np.int64)
    for path in sample_paths:
        acc = 0
        for node in path:
            node = int(node)
            if not 0 <= node < len(lens):
                raise ValueError(f"sample_paths names node {node}; valid nodes are 0..{len(lens) - 1}")
            if depth[node] not in (-1, acc):
                raise ValueError(f"node {node} is reached after {depth[node]} and after {acc} tokens; paths must form a tree")
            depth[node] = acc
            acc += int(lens[node])
    if (depth < 0).any():
        raise ValueError(f"nodes {np.nonzero(depth < 0)[0].tolist()} are on no sample path; every node needs a path")
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    flat = np.arange(int(lens.sum()), dtype=np.int64)
    return torch.from_numpy(flat - np.repeat(starts - depth, lens))


def in_full(spec: AttnMaskSpec) -> AttnMaskSpec:
    """The documents of ``spec`` attended in both directions: an encoder's mask (``is_causal=False``).

    Exact for a mask of whole documents, each one square slice (causal or full over the
    same rows and keys, as :func:`documents` and :func:`cu_seqlens_layout` build them): each
    becomes full. A document with padding inside it is several slices with no one
    bidirectional reading here, so it is refused.
    """
    t = spec.table
    t = t.take(np.nonzero(slice_areas(t) > 0)[0])
    codes = [AttnMaskType.FULL.code, AttnMaskType.CAUSAL.code]
    bad = np.nonzero((t.qs != t.ks) | (t.qe != t.ke) | ~np.isin(t.types, codes))[0]
    if len(bad):
        n = int(bad[0])
        raise ValueError(
            "a bidirectional model (its attention layers have is_causal=False, e.g. BERT) attends each document "
            "in full; this batch has a document with padding inside it (tokens [{}, {}) attend [{}, {}) as part "
            "of it): put the padding at the ends of the rows, or pass the mask as batch['attn_spec']".format(
                t.qs[n], t.qe[n], t.ks[n], t.ke[n])
        )
    ranges = np.stack([t.qs, t.qe], axis=1).tolist()
    return AttnMaskSpec(ranges, ranges, [AttnMaskType.FULL] * len(ranges), spec.total_seqlen)


__all__ = [
    "CallMask",
    "as_numpy",
    "in_full",
    "clean_cu_seqlens",
    "cu_seqlens_layout",
    "documents",
    "expand_rows",
    "prefix_tree_position_ids",
    "row_positions",
    "step_mask",
]
