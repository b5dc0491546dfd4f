"""The end-to-end benchmark's workloads: the batches users train, built with the recipe's own packers.

Each builder returns :class:`~flexcp.train.data.PackedSequence` objects (random token ids,
pre-shifted labels, per-document positions, the mask) made by ``flexcp.train.data``:

- :func:`packed_documents`: one pack of documents whose lengths are drawn from the corpus
  histogram (``flexcp.bench.docdist``), loss on every next token inside a document;
- :func:`rollouts`: one prompt and several completions, once as a prefix tree (the prompt
  stored once, ``pack_rollouts``) and once laid out without sharing (prompt + completion per
  document, ``pack_documents``), with the same (context, target) pairs, so both give the same loss;
- :func:`causal_sequence`: one document filling the sequence (the plain causal workload, and
  the sliding-window workload's batch: the window comes from the model, ``mistral-1b``).

:func:`attention_cells` is the attention work a contender does on a batch: the mask's area
for mask-aware kernels, ``S^2`` for SDPA with a dense mask, the causal triangle for a pack
treated as one causal sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ..hf.keys import windowed
from ..train.data import PackedSequence, RolloutGroup, pack_documents, pack_rollouts, shifted_labels
from .docdist import sample_pack

WORKLOADS = ("packed", "rollouts", "sliding", "causal")
"""Workload names, in the benchmark's order."""
WORKLOAD_PRESET = {"packed": "llama-1b", "rollouts": "llama-1b", "sliding": "mistral-1b", "causal": "llama-1b"}
"""The model preset each workload trains (``sliding``: the same shapes, every layer windowed)."""


def _ids(n: int, vocab: int, rng: np.random.Generator) -> list[int]:
    return rng.integers(0, vocab, size=n).tolist()


def _document(ids: list[int], loss_from: int = 0) -> tuple[list[int], list[int]]:
    """``(ids, labels)``: next-token targets for tokens ``loss_from ..`` (earlier tokens are context only)."""
    return ids, shifted_labels(ids, [i >= loss_from for i in range(len(ids))])


def packed_documents(seq_len: int, vocab: int, seed: int = 0, max_doc_frac: float = 0.5,
                     max_doc_len: int | None = None) -> PackedSequence:
    """One pack of ``seq_len`` tokens: corpus-drawn documents, each at most ``max_doc_frac`` of the pack.

    ``max_doc_len`` additionally caps every document (the long-sequence probe uses it to keep
    the step's attention time linear in the pack length).
    """
    lengths = sample_pack(seq_len, rng=seed, max_doc_frac=max_doc_frac)
    if max_doc_len is not None:
        lengths = _recut(lengths, max_doc_len)
    rng = np.random.default_rng([seed, 1])
    return pack_documents([_document(_ids(int(n), vocab, rng)) for n in lengths], seq_len, pad_id=0)


def _recut(lengths: np.ndarray, cap: int) -> np.ndarray:
    """Documents longer than ``cap`` cut into ``cap``-token pieces (same total)."""
    if cap < 1:
        raise ValueError(f"max_doc_len must be >= 1; got {cap}")
    out = []
    for n in lengths.tolist():
        out += [cap] * (n // cap) + ([n % cap] if n % cap else [])
    return np.array(out, dtype=np.int64)


@dataclass(frozen=True)
class Rollouts:
    """The same rollout group in two layouts; ``unshared`` repeats the prompt for every completion."""

    group: RolloutGroup
    shared: PackedSequence
    unshared: PackedSequence


def rollout_group(seq_len: int, vocab: int, seed: int = 0, completions: int = 8,
                  prompt_frac: float = 0.25) -> RolloutGroup:
    """One prompt of ``prompt_frac * seq_len`` tokens and ``completions`` completions filling the rest.

    Completion lengths vary (uniform in [0.5, 1.5] x their mean, scaled so the prefix tree
    fills ``seq_len`` tokens exactly, the tree's repeated prompt token included).
    """
    if completions < 1 or not 0 < prompt_frac < 1:
        raise ValueError(f"need completions >= 1 and 0 < prompt_frac < 1; got {completions}, {prompt_frac}")
    rng = np.random.default_rng([seed, 2])
    prompt_len = max(2, int(prompt_frac * seq_len))
    room = seq_len - (prompt_len - 1) - completions  # tree tokens left for completion bodies
    if room < completions:
        raise ValueError(f"seq_len={seq_len} leaves no room for {completions} completions after the prompt")
    weights = rng.uniform(0.5, 1.5, size=completions)
    lengths = np.maximum(1, np.floor(weights / weights.sum() * room).astype(np.int64))
    lengths[-1] += room - lengths.sum()
    return RolloutGroup(_ids(prompt_len, vocab, rng), [_ids(int(n), vocab, rng) for n in lengths])


def rollouts(seq_len: int, vocab: int, seed: int = 0, completions: int = 8, prompt_frac: float = 0.25,
             multiple_of: int = 1) -> Rollouts:
    """A rollout group as a ``seq_len``-token prefix tree and as separate prompt + completion documents.

    The unshared layout is one sequence of all documents, padded up to ``multiple_of`` tokens
    (the CP dispatch unit); it has the same label tokens as the tree.
    """
    group = rollout_group(seq_len, vocab, seed, completions, prompt_frac)
    shared = pack_rollouts([group], seq_len, pad_id=0)
    docs = [_document(group.prompt + c, loss_from=len(group.prompt)) for c in group.completions]
    total = sum(len(ids) for ids, _ in docs)
    unshared = pack_documents(docs, -(-total // multiple_of) * multiple_of, pad_id=0)
    return Rollouts(group, shared, unshared)


def causal_sequence(seq_len: int, vocab: int, seed: int = 0) -> PackedSequence:
    """One document of ``seq_len`` tokens (causal mask, loss on every next token)."""
    rng = np.random.default_rng([seed, 3])
    return pack_documents([_document(_ids(seq_len, vocab, rng))], seq_len, pad_id=0)


def windowed_area(seq: PackedSequence, window: int | None) -> int:
    """Cells of ``seq``'s mask inside a causal sliding window of ``window`` real positions (None: the mask's area)."""
    if window is None:
        return int(seq.spec.area())
    return int(windowed(seq.spec, window, seq.position_ids.numpy()).area())


def attention_cells(contender: str, seq: PackedSequence, window: int | None = None) -> int:
    """The (q, k) cells a contender's attention computes on ``seq`` per head and layer.

    ``magi`` and ``flex_attention`` skip masked blocks (the mask's area; FlexAttention also
    computes the masked part of its 128 x 128 boundary blocks); ``sdpa`` computes every cell
    when HF gives it a dense mask (packs, windows) and the causal triangle on one causal
    sequence; ``native`` treats a pack as one causal sequence.
    """
    s = seq.input_ids.numel()
    causal = s * (s + 1) // 2
    if contender in ("magi", "flex_attention"):
        return windowed_area(seq, window)
    if contender == "sdpa":
        return causal if window is None and int(seq.spec.area()) == causal else s * s
    if contender == "native":
        return causal
    raise ValueError(f"contender={contender!r} is not one of 'magi', 'flex_attention', 'sdpa', 'native'")


class FixedSource:
    """A data source that returns the same sequence for every micro-batch index (every step trains it)."""

    def __init__(self, seq: PackedSequence) -> None:
        self.seq = seq

    def get(self, index: int) -> PackedSequence:
        return self.seq


def describe(seq: PackedSequence) -> dict:
    """Tokens, label tokens, documents (position restarts), longest document and mask area, for the results JSON."""
    pos = seq.position_ids
    return {"tokens": seq.input_ids.numel(), "label_tokens": seq.num_label_tokens, "docs": int((pos == 0).sum()),
            "longest_doc": int(pos.max()) + 1, "mask_area": int(seq.spec.area())}


__all__ = ["WORKLOADS", "WORKLOAD_PRESET", "Rollouts", "FixedSource", "attention_cells", "causal_sequence",
           "describe", "packed_documents", "rollout_group", "rollouts", "windowed_area"]

