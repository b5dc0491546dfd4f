"""Laying tokens out as one packed sequence plus its attention mask, and which items go into which sequence.

Documents are concatenated with their boundaries kept (a varlen causal mask, positions
restarting per document); rollout groups become a prefix-tree forest (a prompt stored once,
each completion attending to it and never to a sibling). :class:`EpochPacker` maps a
micro-batch index to the items it packs, shuffled per epoch, so any index is reproducible.

Labels are pre-shifted (``labels[t]`` is the target of position ``t``; ``IGNORE_INDEX`` = no
loss) because dispatch permutes tokens across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from ..mask import AttnMaskSpec
from ..sharding import IGNORE_INDEX


@dataclass(frozen=True)
class PackedSequence:
    """One global micro-batch (identical on every rank of a CP group)."""

    input_ids: torch.Tensor
    """``[S]`` int64 token ids."""
    labels: torch.Tensor
    """``[S]`` int64 pre-shifted targets, ``IGNORE_INDEX`` where there is no loss."""
    position_ids: torch.Tensor
    """``[S]`` int64 positions inside each document / prefix-tree path (RoPE)."""
    spec: AttnMaskSpec
    """The attention mask over the ``S`` tokens (padding rows attend to nothing)."""

    @property
    def num_label_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


class DataSource(Protocol):
    def get(self, index: int) -> PackedSequence:
        """Micro-batch number ``index`` (deterministic; any index is valid, epochs repeat)."""


# --------------------------------------------------------------------------------------- building


def shifted_labels(ids: list[int], targets: list[bool]) -> list[int]:
    """``labels[t] = ids[t + 1]`` where token ``t + 1`` is a target, else IGNORE_INDEX."""
    out = [i if keep else IGNORE_INDEX for i, keep in zip(ids[1:], targets[1:])]
    return out + [IGNORE_INDEX]


def _finish(ids: list[int], labels: list[int], pos: list[int], spec: AttnMaskSpec, seq_len: int,
            pad_id: int) -> PackedSequence:
    pad = seq_len - len(ids)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return PackedSequence(
        as_long(ids + [pad_id] * pad),
        as_long(labels + [IGNORE_INDEX] * pad),
        as_long(pos + list(range(pad))),
        spec,
    )


def pack_documents(docs: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> PackedSequence:
    """Concatenate ``(ids, labels)`` documents; varlen causal mask, positions restart per document."""
    lengths = [len(ids) for ids, _ in docs]
    if sum(lengths) > seq_len:
        raise ValueError(f"documents of {sum(lengths)} tokens do not fit in seq_len={seq_len}")
    ids = [t for d, _ in docs for t in d]
    labels = [t for _, lab in docs for t in lab]
    pos = [p for n in lengths for p in range(n)]
    docs_only = AttnMaskSpec.varlen(lengths)
    spec = AttnMaskSpec(docs_only.q_ranges, docs_only.k_ranges, docs_only.mask_types, seq_len)
    return _finish(ids, labels, pos, spec, seq_len, pad_id)


@dataclass(frozen=True)
class RolloutGroup:
    """A prompt and its completions as prefix-tree nodes.

    The last prompt token is repeated at the head of every completion node, so each
    path's pre-shifted labels stay inside its own nodes (that token's successor differs
    per completion).
    """

    prompt: list[int]
    completions: list[list[int]]

    @property
    def node_lengths(self) -> list[int]:
        return [len(self.prompt) - 1] + [len(c) + 1 for c in self.completions]

    @property
    def num_tokens(self) -> int:
        return sum(self.node_lengths)


def pack_rollouts(groups: list[RolloutGroup], seq_len: int, pad_id: int) -> PackedSequence:
    """Lay out groups as one prefix-tree forest; loss on completion tokens only."""
    node_lengths: list[int] = []
    paths: list[list[int]] = []
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    for g in groups:
        root, p = len(node_lengths), len(g.prompt)
        node_lengths.append(p - 1)
        ids += g.prompt[:-1]
        labels += [IGNORE_INDEX] * (p - 1)
        pos += list(range(p - 1))
        for c in g.completions:
            paths.append([root, len(node_lengths)])
            node_lengths.append(len(c) + 1)
            ids += [g.prompt[-1], *c]
            labels += [*c, IGNORE_INDEX]
            pos += list(range(p - 1, p + len(c)))
    if len(ids) > seq_len:
        raise ValueError(f"rollout groups of {len(ids)} tokens do not fit in seq_len={seq_len}")
    spec, _ = AttnMaskSpec.prefix_tree(node_lengths + [seq_len - len(ids)], paths)
    return _finish(ids, labels, pos, spec, seq_len, pad_id)


def next_fit(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Group items in order into bins of at most ``seq_len`` tokens (a new bin when the next does not fit)."""
    bins: list[list[int]] = []
    used = seq_len + 1
    for i, n in enumerate(lengths):
        if used + n > seq_len:
            bins.append([])
            used = 0
        bins[-1].append(i)
        used += n
    return bins


class EpochPacker:
    """Items shuffled per epoch (seed, epoch), packed next-fit; micro-batch index -> (epoch, bin)."""

    def __init__(self, lengths: list[int], seq_len: int, seed: int, shuffle: bool) -> None:
        if not lengths:
            raise ValueError("the dataset is empty")
        self.lengths, self.seq_len, self.seed, self.shuffle = lengths, seq_len, seed, shuffle
        self._epochs: list[list[list[int]]] = []

    def _epoch(self, e: int) -> list[list[int]]:
        while len(self._epochs) <= e:
            n = len(self._epochs)
            order = np.arange(len(self.lengths))
            if self.shuffle:
                order = np.random.default_rng([self.seed, n]).permutation(order)
            bins = next_fit([self.lengths[i] for i in order], self.seq_len)
            self._epochs.append([[int(order[i]) for i in b] for b in bins])
        return self._epochs[e]

    def items(self, index: int) -> list[int]:
        e = 0
        while index >= len(self._epoch(e)):
            index -= len(self._epoch(e))
            e += 1
        return self._epoch(e)[index]
