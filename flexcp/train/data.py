"""Training data: the data kinds (``data.kind``), each owning its config checks and building its source.

A source is random-access by micro-batch index (so a resumed run continues with exactly
the batch it would have seen); :mod:`.packing` lays each micro-batch out.

- ``jsonl``: records with ``text`` (loss on every token) or chat ``messages`` (loss on
  assistant turns only), packed to ``seq_len`` with document boundaries kept.
- ``rollouts``: RL groups ``{"prompt" | "messages", "completions": [...]}``, each laid out
  once as a prefix tree (the prompt shared by its completions) and packed; loss on the
  completions.
- ``recall``: a synthetic task only learnable when attention crosses CP shards: key/value
  pairs sit in the second quarter of the sequence and are queried at its end, more than
  one shard's length (seq_len / cp, cp >= 2) later.

A new kind is one :class:`DataKind` subclass (its checks and its source) listed in
:data:`DATA_KINDS`, all in this file; ``validate`` and ``build_source`` find it there.
"""

from __future__ import annotations

import json
import os
import string
import warnings
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch

from ..mask import AttnMaskSpec
from .packing import (  # noqa: F401  (the layout's names, importable from here)
    IGNORE_INDEX,
    DataSource,
    EpochPacker,
    PackedSequence,
    RolloutGroup,
    next_fit,
    pack_documents,
    pack_rollouts,
    shifted_labels,
)
from .schema import ConfigError, Filler, FinetuneConfig
from .tokenizer import Tokenizer, check_messages


MAX_REPORTED_LINES = 20
"""Bad data lines listed one by one; past this, a count."""


def _parse_line(raw: bytes, path: str, n: int) -> tuple[dict[str, Any] | None, str | None]:
    """Line ``n``'s record, or what is wrong with it and the fix (``(None, None)`` for a blank line)."""
    where = f"{path}:{n}"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, (f"{where} is not UTF-8 (byte {raw[exc.start]:#04x} at column {exc.start + 1}); JSONL must be "
                      f"UTF-8: re-encode the file, e.g. iconv -f latin1 -t utf-8 {path} > fixed.jsonl")
    if not line.strip():
        return None, None
    try:
        rec = json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as exc:
        return None, f"{where} is not valid JSON ({exc.msg}, column {exc.colno}); write one JSON object per line"
    if not isinstance(rec, dict):
        return None, f"{where}: must be a JSON object {{...}}; got {type(rec).__name__}"
    return rec, None


def scan_jsonl(path: str, check_record: Callable[[dict[str, Any]], str | None]
               ) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    """``(line number, record)`` of every good line, and one ``path:line: problem; fix`` per bad line.

    A record is bad when it is not UTF-8, not a JSON object, or ``check_record`` names a
    problem. The first :data:`MAX_REPORTED_LINES` bad lines are listed, then a count.
    """
    records, problems, bad = [], [], 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            rec, problem = _parse_line(raw, path, n)
            if rec is not None:
                problem = check_record(rec)
                problem = problem and f"{path}:{n}: {problem}"
            if problem:
                bad += 1
                if bad <= MAX_REPORTED_LINES:
                    problems.append(problem)
            elif rec is not None:
                records.append((n, rec))
    if bad > MAX_REPORTED_LINES:
        problems.append(f"{path}: {bad - MAX_REPORTED_LINES} more bad lines ({bad} in all); fix the lines above "
                        "and run again with --check to list the rest")
    if not records and not bad:
        problems.append(f"{path} holds no records (it is empty or has only blank lines); point the path at a "
                        "JSONL file with one JSON object per line")
    return records, problems


def _read_jsonl(path: str, check_record: Callable[[dict[str, Any]], str | None]) -> list[tuple[int, dict[str, Any]]]:
    """The good records of :func:`scan_jsonl`; a ValueError listing the bad lines if there are any."""
    records, problems = scan_jsonl(path, check_record)
    if problems:
        raise ValueError("\n".join(problems))
    return records


def _not_string(rec: dict[str, Any], key: str) -> str | None:
    """What is wrong with ``rec[key]`` if it is not a string, and the fix."""
    value = rec[key]
    if isinstance(value, str):
        return None
    return f"{key!r} must be a string; got {json.dumps(value)} ({type(value).__name__}): make it a string or drop the line"


def _messages_problem(messages: Any) -> str | None:
    """What is wrong with a chat ``messages`` list, if anything."""
    try:
        check_messages(messages)
    except ValueError as exc:
        return str(exc)
    return None


class JsonlSource:
    """Packed text / chat documents; a document longer than seq_len is cut into seq_len pieces."""

    def __init__(self, path: str, tok: Tokenizer, seq_len: int, seed: int, shuffle: bool) -> None:
        self.tok, self.seq_len = tok, seq_len
        self.docs: list[tuple[list[int], list[int]]] = []
        no_target: list[int] = []
        for n, rec in _read_jsonl(path, self.check_record):
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
        self.packer = EpochPacker([len(d) for d, _ in self.docs], seq_len, seed, shuffle)

    @staticmethod
    def check_record(rec: dict[str, Any]) -> str | None:
        """What is wrong with a record (``text`` string or chat ``messages``) and the fix; None if it is good."""
        if "messages" in rec:
            return _messages_problem(rec["messages"])
        if "text" in rec:
            return _not_string(rec, "text")
        return f"a record needs 'text' or 'messages'; got keys {sorted(rec)}"

    def _tokenize(self, rec: dict[str, Any], where: str) -> tuple[list[int], list[bool]]:
        """Token ids and which are targets, of a record :meth:`check_record` passed."""
        if "messages" in rec:
            try:
                return self.tok.encode_chat(rec["messages"])
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
        bos = [] if self.tok.bos_id is None else [self.tok.bos_id]
        ids = bos + self.tok.encode(rec["text"]) + [self.tok.eos_id]
        return ids, [False] * len(bos) + [True] * (len(ids) - len(bos))

    def get(self, index: int) -> PackedSequence:
        return pack_documents([self.docs[i] for i in self.packer.items(index)], self.seq_len, self.tok.pad_id)


class RolloutSource:
    """Prefix-tree rollout groups packed into sequences."""

    def __init__(self, path: str, tok: Tokenizer, seq_len: int, seed: int, shuffle: bool) -> None:
        self.tok, self.seq_len = tok, seq_len
        self.groups = [self._group(rec, f"{path}:{n}") for n, rec in _read_jsonl(path, self.check_record)]
        for n, g in enumerate(self.groups, 1):
            if g.num_tokens > seq_len:
                raise ValueError(
                    f"{path}: rollout group {n} needs {g.num_tokens} tokens > data.seq_len={seq_len}; "
                    "raise data.seq_len or shorten the group"
                )
        self.packer = EpochPacker([g.num_tokens for g in self.groups], seq_len, seed, shuffle)

    @staticmethod
    def check_record(rec: dict[str, Any]) -> str | None:
        """What is wrong with a rollout record and the fix; None if it is good."""
        comps = rec.get("completions")
        if not isinstance(comps, list) or not comps:
            return "a rollout record needs a non-empty 'completions' list of strings"
        for i, c in enumerate(comps):
            if not isinstance(c, str):
                return f"completions[{i}] must be a string; got {json.dumps(c)}"
        if "messages" in rec:
            return _messages_problem(rec["messages"])
        if "prompt" in rec:
            return _not_string(rec, "prompt")
        return "a rollout record needs 'prompt' (text) or 'messages'"

    def _group(self, rec: dict[str, Any], where: str) -> RolloutGroup:
        """The prefix tree of a record :meth:`check_record` passed."""
        if "messages" in rec:
            prompt = self.tok.render_chat(rec["messages"], add_generation_prompt=True)
        else:
            prompt = ([] if self.tok.bos_id is None else [self.tok.bos_id]) + self.tok.encode(rec["prompt"])
        if not prompt:
            raise ValueError(f"{where}: the prompt is empty")
        return RolloutGroup(prompt, [self.tok.encode(c) + [self.tok.eos_id] for c in rec["completions"]])

    def get(self, index: int) -> PackedSequence:
        return pack_rollouts([self.groups[i] for i in self.packer.items(index)], self.seq_len, self.tok.pad_id)


# ------------------------------------------------------------------------------- synthetic recall

RECALL_KEYS = string.ascii_uppercase
RECALL_VALUES = string.digits + "#$%&*+/<=>@^~"
RECALL_FILLER: Mapping[Filler, str] = MappingProxyType({"repeat": ".", "random": string.ascii_lowercase})
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
                 filler: Filler = "repeat") -> None:
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


# ------------------------------------------------------------------------------------- data kinds


class DataKind:
    """One value of ``data.kind``: the checks it needs of the config and the source it builds."""

    name: str

    def problems(self, cfg: FinetuneConfig) -> Iterator[str]:
        """What is wrong with ``cfg`` for this kind (its values are already in range)."""
        raise NotImplementedError

    def build(self, cfg: FinetuneConfig, tok: Tokenizer, path: str | None, shuffle: bool | None) -> DataSource:
        """The source (``path`` / ``shuffle``: instead of ``data.path`` / ``data.shuffle``, for held-out data)."""
        raise NotImplementedError


class FileKind(DataKind):
    """A kind that reads ``data.path`` (and ``eval.path``, its held-out set) as JSONL with ``source``."""

    sample: str
    """The sample file under flexcp/train/samples/ an error suggests."""
    source: type[JsonlSource] | type[RolloutSource]

    def problems(self, cfg: FinetuneConfig) -> Iterator[str]:
        d, e = cfg.data, cfg.eval
        if d.path is None:
            yield (f"data.kind={d.kind!r} reads a JSONL file: set data.path (a sample to try: "
                   f"data.path=flexcp/train/samples/{self.sample})")
        elif not os.path.isfile(d.path):
            yield f"data.path={d.path!r}: no such file"
        else:  # every bad line now, before any rank starts
            yield from scan_jsonl(d.path, self.source.check_record)[1]
        if e.path is not None and not os.path.isfile(e.path):
            yield f"eval.path={e.path!r}: no such file"
        elif e.path is not None:
            yield from scan_jsonl(e.path, self.source.check_record)[1]
        elif e.path is None and e.every:
            yield (f"eval.every={e.every} with data.kind={d.kind!r} needs held-out data: set eval.path "
                   "to a JSONL file in data.path's format (or eval.every=0)")

    def build(self, cfg: FinetuneConfig, tok: Tokenizer, path: str | None, shuffle: bool | None) -> DataSource:
        d = cfg.data
        return self.source(path or d.path, tok, d.seq_len, cfg.train.seed, d.shuffle if shuffle is None else shuffle)


class JsonlKind(FileKind):
    name, sample, source = "jsonl", "sft_chat.jsonl", JsonlSource


class RolloutsKind(FileKind):
    name, sample, source = "rollouts", "rollouts.jsonl", RolloutSource

    def problems(self, cfg: FinetuneConfig) -> Iterator[str]:
        if cfg.model.attn_implementation != "magi":
            yield ("data.kind='rollouts' needs model.attn_implementation='magi': HF "
                   f"{cfg.model.attn_implementation!r} attention cannot express a prefix-tree mask")
        yield from super().problems(cfg)


class RecallKind(DataKind):
    """Synthetic recall (``data.recall``); its held-out set is unseen synthetic sequences, so no eval.path."""

    name = "recall"

    def problems(self, cfg: FinetuneConfig) -> Iterator[str]:
        d, r = cfg.data, cfg.data.recall
        if r.num_pairs > len(RECALL_KEYS):
            yield (f"data.recall.num_pairs must be <= {len(RECALL_KEYS)} (one distinct key letter per pair); "
                   f"got {r.num_pairs}")
        if r.num_values > len(RECALL_VALUES):
            yield f"data.recall.num_values must be <= {len(RECALL_VALUES)}; got {r.num_values}"
        need = recall_min_seq_len(r.num_pairs)
        if d.seq_len < need:
            yield (f"data.seq_len={d.seq_len} is too short for data.recall.num_pairs={r.num_pairs}: the pairs "
                   f"must fit in the second quarter of the sequence; use data.seq_len >= {need}")
        if cfg.eval.path is not None:
            files = " / ".join(repr(k.name) for k in DATA_KINDS.values() if isinstance(k, FileKind))
            yield (f"eval.path is for data.kind {files}; the recall task evaluates on held-out synthetic "
                   "sequences: leave eval.path unset")

    def build(self, cfg: FinetuneConfig, tok: Tokenizer, path: str | None, shuffle: bool | None) -> DataSource:
        if tok.vocab_size < 128:
            raise ConfigError(f"data.kind='recall' uses ASCII token ids; the tokenizer has only {tok.vocab_size}")
        d, r = cfg.data, cfg.data.recall
        return RecallSource(d.seq_len, r.num_pairs, r.num_values, cfg.train.seed, tok.bos_id, r.filler)


DATA_KINDS: Mapping[str, DataKind] = MappingProxyType({k.name: k for k in (RecallKind(), JsonlKind(), RolloutsKind())})
"""Every ``data.kind``, by name (read-only)."""


def build_source(cfg: FinetuneConfig, tok: Tokenizer, path: str | None = None,
                 shuffle: bool | None = None) -> DataSource:
    """The data source named by ``cfg.data.kind`` (``path`` / ``shuffle``: instead of ``data.path`` / ``data.shuffle``)."""
    return DATA_KINDS[cfg.data.kind].build(cfg, tok, path, shuffle)
