"""Tokenizers: the checkpoint's HF tokenizer, or a built-in byte-level one for the preset.

Both expose the same small surface the data pipeline needs: ``encode``, ``decode``,
``render_chat`` (token ids of a conversation through the chat template) and the special
ids. ``encode_chat`` is written once on top of ``render_chat``: it renders growing
prefixes of the conversation and marks the tokens each assistant turn adds, so loss
masks work with any chat template.
"""

from __future__ import annotations

import json
import os
from typing import Any

BYTE_TOKENIZER_FILE = "flexcp_tokenizer.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", BYTE_TOKENIZER_FILE)
"""A directory holding any of these is a tokenizer :func:`load_tokenizer` can read."""


class Tokenizer:
    """Common interface; subclasses set the ids and implement encode/decode/render_chat."""

    vocab_size: int
    pad_id: int
    bos_id: int | None
    eos_id: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> list[int]:
        raise NotImplementedError

    def save(self, out_dir: str) -> None:
        raise NotImplementedError

    def encode_chat(self, messages: list[dict[str, Any]]) -> tuple[list[int], list[bool]]:
        """Token ids of the conversation and, per token, whether it belongs to an assistant turn."""
        check_messages(messages)
        ids: list[int] = []
        mask: list[bool] = []
        for n, m in enumerate(messages):
            if m["role"] == "assistant":  # the header (generation prompt) is not trained on
                head = self.render_chat(messages[:n], add_generation_prompt=True)
                self._extend(ids, mask, head, False, n)
            full = self.render_chat(messages[: n + 1])
            self._extend(ids, mask, full, m["role"] == "assistant", n)
        return ids, mask

    @staticmethod
    def _extend(ids: list[int], mask: list[bool], rendered: list[int], flag: bool, n: int) -> None:
        if rendered[: len(ids)] != ids:
            raise ValueError(
                f"the chat template renders messages[:{n + 1}] with a different prefix than messages[:{n}]; "
                "loss masks need a template whose renderings grow by appending"
            )
        mask.extend([flag] * (len(rendered) - len(ids)))
        ids[:] = rendered


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """``messages`` if it is a list of ``{"role": str, "content": str}`` dicts; else a ValueError saying what is wrong."""
    if not isinstance(messages, list):
        raise ValueError(f"'messages' must be a list of {{'role': ..., 'content': ...}} dicts; got "
                         f"{type(messages).__name__} {str(messages)[:60]!r}")
    for n, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{n}] = {m!r} must be a dict with 'role' and 'content'")
        if not isinstance(m["role"], str) or not isinstance(m["content"], str):
            raise ValueError(f"messages[{n}]: 'role' and 'content' must be strings; got {m!r}")
    return messages


def _byte_symbols() -> list[str]:
    """The printable character standing for each byte in byte-level BPE vocabularies (GPT-2's convention)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes are ids 0..255; then pad, bos, eos and one id per chat role.

    Chat template: each message is ``<role> content <eos>``; the generation prompt is
    ``<assistant>``. :meth:`save` writes it in Hugging Face format too (a byte-level
    ``tokenizer.json`` with the same ids and chat template), so an exported model loads
    with ``AutoTokenizer.from_pretrained``.
    """

    ROLES = ("system", "user", "assistant")
    SPECIAL = ("<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>")
    """Token strings of ids 256.. in the HF export."""
    CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '</s>' }}{% endfor %}"
                     "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")

    def __init__(self) -> None:
        self.pad_id, self.bos_id, self.eos_id = 256, 257, 258
        self.role_ids = {r: 259 + i for i, r in enumerate(self.ROLES)}
        self.vocab_size = 259 + len(self.ROLES)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> list[int]:
        out: list[int] = []
        for n, m in enumerate(messages):
            if m["role"] not in self.role_ids:
                raise ValueError(f"messages[{n}] has role {m['role']!r}; the byte tokenizer knows {self.ROLES}")
            out += [self.role_ids[m["role"]], *self.encode(m["content"]), self.eos_id]
        if add_generation_prompt:
            out.append(self.role_ids["assistant"])
        return out

    def to_hf(self) -> Any:
        """The same tokenizer as a ``transformers.PreTrainedTokenizerFast`` (ids, specials, chat template)."""
        from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {sym: b for b, sym in enumerate(_byte_symbols())}
        raw = RawTokenizer(models.BPE(vocab=vocab, merges=[]))
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        raw.decoder = decoders.ByteLevel()
        raw.add_special_tokens(list(self.SPECIAL))  # ids 256.. in this order
        pad, bos, eos, *roles = self.SPECIAL
        tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token=pad, bos_token=bos, eos_token=eos,
                                      additional_special_tokens=roles, clean_up_tokenization_spaces=False)
        tok.chat_template = self.CHAT_TEMPLATE
        ids = tok.convert_tokens_to_ids(list(self.SPECIAL))
        if ids != list(range(256, self.vocab_size)):  # pragma: no cover - guards the id layout
            raise RuntimeError(f"byte tokenizer export: special ids {ids} != 256..{self.vocab_size - 1}")
        return tok

    def save(self, out_dir: str) -> None:
        """HF files (``tokenizer.json``, ``tokenizer_config.json``) plus flexcp's marker file."""
        self.to_hf().save_pretrained(out_dir)
        with open(os.path.join(out_dir, BYTE_TOKENIZER_FILE), "w") as f:
            json.dump({"type": "flexcp-byte", "vocab_size": self.vocab_size}, f)


class HFTokenizer(Tokenizer):
    """A transformers tokenizer loaded from a local directory (no network)."""

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.vocab_size = len(self.tok)
        self.bos_id = self.tok.bos_token_id
        self.eos_id = self.tok.eos_token_id
        if self.eos_id is None:
            raise ValueError(f"the tokenizer in {path!r} has no eos token; set one in its tokenizer_config.json")
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> list[int]:
        if not self.tok.chat_template:
            raise ValueError("the tokenizer has no chat template; 'messages' records need one (or use 'text')")
        out = self.tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
        if isinstance(out, dict) or hasattr(out, "input_ids"):  # BatchEncoding in newer transformers
            out = out["input_ids"]
        return list(out)

    def save(self, out_dir: str) -> None:
        self.tok.save_pretrained(out_dir)


def load_tokenizer(spec: str) -> Tokenizer:
    """``"byte"`` -> :class:`ByteTokenizer`; a directory -> its HF tokenizer (or a saved byte tokenizer)."""
    if spec == "byte" or os.path.isfile(os.path.join(spec, BYTE_TOKENIZER_FILE)):
        return ByteTokenizer()
    return HFTokenizer(spec)
