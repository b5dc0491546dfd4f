"""Training data: every micro-batch is one packed sequence plus its attention mask.

Three sources, all random-access by micro-batch index (so a resumed run continues with
exactly the batch it would have seen):

- ``jsonl``: records with ``text`` (loss on every token) or chat ``messages`` (loss on
  assistant turns only), packed to ``seq_len`` with document boundaries kept: a varlen
  causal mask and per-document position ids.
- ``rollouts``: RL groups ``{"prompt" | "messages", "completions": [...]}``, each laid out
  once as a prefix tree (the prompt shared by its completions) and packed; loss on the
  completions.
- ``recall``: a synthetic task only learnable when attention crosses CP shards: key/value
  pairs sit in the second quarter of the sequence and are queried at its end, more than
  one shard's length (seq_len / cp, cp >= 2) later.

Labels are pre-shifted (``labels[t]`` is the target of position ``t``; -100 = no loss)
because dispatch permutes tokens across ranks.
"""

from __future__ import annotations

import json
import string
import warnings
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from ..mask import AttnMaskSpec
from .config import ConfigError, FinetuneConfig
from .tokenizer import Tokenizer, check_messages

IGNORE_INDEX = -100


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


class _EpochPacker:
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


def _read_jsonl(path: str) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` of every non-blank line; errors name ``path:line`` and the fix."""
    records = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(
                    f"{path}:{n} is not UTF-8 (byte {raw[exc.start]:#04x} at column {exc.start + 1}); JSONL must be "
                    f"UTF-8: re-encode the file, e.g. iconv -f latin1 -t utf-8 {path} > fixed.jsonl"
                ) from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n} is not valid JSON: {exc}") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{n} must be a JSON object")
            records.append((n, rec))
    if not records:
        raise ValueError(f"{path} holds no records (it is empty or has only blank lines); point data.path at a "
                         "JSONL file with one JSON object per line")
    return records


def _string(rec: dict[str, Any], key: str, where: str) -> str:
    """``rec[key]`` when it is a string; else an error naming the record's line."""
    value = rec[key]
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key!r} must be a string; got {json.dumps(value)} ({type(value).__name__})")
    return value


class JsonlSource:
    """Packed text / chat documents; a document longer than seq_len is cut into seq_len pieces."""

    def __init__(self, path: str, tok: Tokenizer, seq_len: int, seed: int, shuffle: bool) -> None:
        self.tok, self.seq_len = tok, seq_len
        self.docs: list[tuple[list[int], list[int]]] = []
        no_target: list[int] = []
        for n, rec in _read_jsonl(path):
            ids, targets = self._tokenize(rec, f"{path}:{n}")
            if not any(targets):  # nothing to learn from (like TRL, warn; unlike it, do not pack dead tokens)
                no_target.append(n)
                continue
            labels = shifted_labels(ids, targets)
            for s in range(0, len(ids), seq_len):
                self.docs.append((ids[s : s + seq_len], labels[s : s + seq_len]))
        if no_target:
            lines = ", ".join(map(str, no_target[:10])) + (" ..." if len(no_target) > 10 else "")
            if not self.docs:
                raise ValueError(f"{path}: no record has an assistant turn to train on (lines {lines}); chat "
                                 "records need at least one message with role 'assistant'")
            warnings.warn(f"{path}: skipped {len(no_target)} chat record(s) without an assistant turn (no loss to "
                          f"train on) at line(s) {lines}", RuntimeWarning, stacklevel=2)
        self.packer = _EpochPacker([len(d) for d, _ in self.docs], seq_len, seed, shuffle)

    def _tokenize(self, rec: dict[str, Any], where: str) -> tuple[list[int], list[bool]]:
        bos = [] if self.tok.bos_id is None else [self.tok.bos_id]
        if "messages" in rec:
            try:
                return self.tok.encode_chat(rec["messages"])
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
        if "text" in rec:
            ids = bos + self.tok.encode(_string(rec, "text", where)) + [self.tok.eos_id]
            return ids, [False] * len(bos) + [True] * (len(ids) - len(bos))
        raise ValueError(f"{where}: a record needs 'text' or 'messages'; got keys {sorted(rec)}")

    def get(self, index: int) -> PackedSequence:
        return pack_documents([self.docs[i] for i in self.packer.items(index)], self.seq_len, self.tok.pad_id)


class RolloutSource:
    """Prefix-tree rollout groups packed into sequences."""

    def __init__(self, path: str, tok: Tokenizer, seq_len: int, seed: int, shuffle: bool) -> None:
        self.tok, self.seq_len = tok, seq_len
        self.groups = [self._group(rec, f"{path}:{n}") for n, rec in _read_jsonl(path)]
        for n, g in enumerate(self.groups, 1):
            if g.num_tokens > seq_len:
                raise ValueError(
                    f"{path}: rollout group {n} needs {g.num_tokens} tokens > data.seq_len={seq_len}; "
                    "raise data.seq_len or shorten the group"
                )
        self.packer = _EpochPacker([g.num_tokens for g in self.groups], seq_len, seed, shuffle)

    def _group(self, rec: dict[str, Any], where: str) -> RolloutGroup:
        comps = rec.get("completions")
        if not isinstance(comps, list) or not comps:
            raise ValueError(f"{where}: a rollout record needs a non-empty 'completions' list")
        if "messages" in rec:
            try:
                prompt = self.tok.render_chat(check_messages(rec["messages"]), add_generation_prompt=True)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
        elif "prompt" in rec:
            prompt = ([] if self.tok.bos_id is None else [self.tok.bos_id]) + self.tok.encode(_string(rec, "prompt", where))
        else:
            raise ValueError(f"{where}: a rollout record needs 'prompt' (text) or 'messages'")
        if not prompt:
            raise ValueError(f"{where}: the prompt is empty")
        for i, c in enumerate(comps):
            if not isinstance(c, str):
                raise ValueError(f"{where}: completions[{i}] must be a string; got {json.dumps(c)}")
        return RolloutGroup(prompt, [self.tok.encode(c) + [self.tok.eos_id] for c in comps])

    def get(self, index: int) -> PackedSequence:
        return pack_rollouts([self.groups[i] for i in self.packer.items(index)], self.seq_len, self.tok.pad_id)


# ------------------------------------------------------------------------------- synthetic recall

RECALL_KEYS = string.ascii_uppercase
RECALL_VALUES = string.digits + "#$%&*+/<=>@^~"
RECALL_FILLER = {"repeat": ".", "random": string.ascii_lowercase}
RECALL_QUERY = "?"


def recall_min_seq_len(num_pairs: int) -> int:
    """Shortest sequence whose second quarter holds ``num_pairs`` two-token pairs more than S/2 before the queries."""
    return 20 * num_pairs + 4


class RecallSource:
    """``bos filler.. K v .. filler .. ? K v``: recall the value of each key, asked at the end.

    The pairs sit in the second quarter (``[S/4, S/2 - 3P)``), so a query is more than
    ``S/2`` tokens after its value: further than one CP shard for any cp >= 2, and on another
    rank under contiguous or zigzag sharding (zigzag puts the first and last chunks
    together, which is why the pairs are not at the very start). Tokens are the ASCII
    codes of the characters below (readable with the byte tokenizer, arbitrary but valid
    ids with any vocabulary of 128+ tokens). Labels: the value after each queried key.
    Chance accuracy is ``1 / num_values``. The haystack is one repeated token
    (``filler="repeat"``, like passkey retrieval: the tiny demo model learns it in ~100
    steps) or random letters (``"random"``: the value must be told from noise; slower).
    """

    def __init__(self, seq_len: int, num_pairs: int, num_values: int, seed: int, bos_id: int | None,
                 filler: str = "repeat") -> None:
        if seq_len < recall_min_seq_len(num_pairs) or num_pairs > len(RECALL_KEYS):
            raise ValueError(f"recall: seq_len={seq_len} / num_pairs={num_pairs} leave no room for the pairs")
        self.seq_len, self.num_pairs, self.seed = seq_len, num_pairs, seed
        self.bos = ord(" ") if bos_id is None else bos_id
        self.keys = np.array([ord(c) for c in RECALL_KEYS])
        self.values = np.array([ord(c) for c in RECALL_VALUES[:num_values]])
        self.filler = np.array([ord(c) for c in RECALL_FILLER[filler]])
        self.spec = AttnMaskSpec.causal(seq_len)

    def get(self, index: int) -> PackedSequence:
        rng = np.random.default_rng([self.seed, 7, index])
        s, p = self.seq_len, self.num_pairs
        ids = rng.choice(self.filler, size=s)
        ids[0] = self.bos
        keys = rng.choice(self.keys, size=p, replace=False)
        values = rng.choice(self.values, size=p)
        slots = s // 4 + 2 * np.sort(rng.choice((s // 4 - 3 * p) // 2, size=p, replace=False))
        ids[slots], ids[slots + 1] = keys, values
        order = rng.permutation(p)
        tail = s - 3 * p
        labels = np.full(s, IGNORE_INDEX)
        for j, n in enumerate(order):
            at = tail + 3 * j
            ids[at : at + 3] = (ord(RECALL_QUERY), keys[n], values[n])
            labels[at + 1] = values[n]
        t = lambda x: torch.as_tensor(x, dtype=torch.long)  # noqa: E731
        return PackedSequence(t(ids), t(labels), torch.arange(s), self.spec)


def build_source(cfg: FinetuneConfig, tok: Tokenizer, path: str | None = None,
                 shuffle: bool | None = None) -> DataSource:
    """The data source named by ``cfg.data.kind`` (``path`` / ``shuffle``: instead of ``data.path`` / ``data.shuffle``)."""
    d = cfg.data
    if d.kind == "recall":
        if tok.vocab_size < 128:
            raise ConfigError(f"data.kind='recall' uses ASCII token ids; the tokenizer has only {tok.vocab_size}")
        r = d.recall
        return RecallSource(d.seq_len, r.num_pairs, r.num_values, cfg.train.seed, tok.bos_id, r.filler)
    cls = JsonlSource if d.kind == "jsonl" else RolloutSource
    return cls(path or d.path, tok, d.seq_len, cfg.train.seed, d.shuffle if shuffle is None else shuffle)
