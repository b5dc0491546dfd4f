"""Small synthetic datasets for trying the JSONL recipes on a CPU: python -m flexcp.train.sample_data.

Writes (deterministically, from a fixed seed) into `flexcp/train/samples/`:

- `sft_chat.jsonl` / `sft_chat_eval.jsonl`: chat records `{"messages": [...]}` with
  small string and arithmetic tasks (reverse, sort, count, add, upper-case), some with a
  system turn, some with two user/assistant rounds; loss falls on the assistant turns.
- `rollouts.jsonl` / `rollouts_eval.jsonl`: rollout groups `{"prompt", "completions"}`,
  several answers to one prompt (phrasings of the right answer), laid out as prefix trees.

The tasks are generated, not collected, so the files are reproducible (a test regenerates
them and compares) and free of licence questions.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from types import MappingProxyType
from typing import Callable, Mapping

from ..clihelp import new_parser

SAMPLES_DIR = os.path.join(os.path.dirname(__file__), "samples")
WORDS = ("river", "stone", "maple", "cloud", "ember", "quartz", "lantern", "harbor", "violet", "meadow",
         "copper", "falcon", "summit", "willow", "canyon", "orchid", "glacier", "thunder", "pepper", "sparrow")
SYSTEM = "You are a careful assistant. Answer briefly."
FILES: Mapping[str, tuple[str, int, int]] = MappingProxyType({  # name -> (generator, records, seed)
    "sft_chat.jsonl": ("chat", 400, 1),
    "sft_chat_eval.jsonl": ("chat", 40, 2),
    "rollouts.jsonl": ("rollouts", 240, 3),
    "rollouts_eval.jsonl": ("rollouts", 24, 4),
})


def _task(rng: random.Random) -> tuple[str, str, list[str]]:
    """``(question, answer, other phrasings of the answer)`` of one random task."""
    kind = rng.choice(("reverse", "sort", "count", "add", "upper"))
    if kind == "reverse":
        w = rng.choice(WORDS)
        return f"Reverse the word '{w}'.", w[::-1], [f"'{w[::-1]}'", f"Reversed: {w[::-1]}"]
    if kind == "sort":
        ws = rng.sample(WORDS, rng.randint(3, 5))
        out = " ".join(sorted(ws))
        return f"Sort these words: {' '.join(ws)}", out, [f"Sorted: {out}", f"In order: {out}"]
    if kind == "count":
        w, c = rng.choice(WORDS), rng.choice("aeiou")
        n = w.count(c)
        times = "time" if n == 1 else "times"
        return f"How many times does '{c}' appear in '{w}'?", str(n), [f"{n} {times}.", f"'{c}' appears {n} {times}."]
    if kind == "add":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"What is {a} + {b}?", str(a + b), [f"{a} + {b} = {a + b}", f"The sum is {a + b}."]
    w = " ".join(rng.sample(WORDS, 2))
    return f"Write '{w}' in capitals.", w.upper(), [f"'{w.upper()}'"]


def chat_record(rng: random.Random) -> dict:
    """One SFT conversation: an optional system turn, then one or two task rounds."""
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.3 else []
    for _ in range(rng.choice((1, 1, 2))):
        question, answer, _ = _task(rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def rollout_record(rng: random.Random) -> dict:
    """One rollout group: a prompt and 2-4 completions (the answer in different phrasings)."""
    question, answer, others = _task(rng)
    completions = [answer, *others]
    rng.shuffle(completions)
    return {"prompt": f"Question: {question}\nAnswer: ", "completions": completions[: rng.randint(2, 4)]}


GENERATORS: Mapping[str, Callable[[random.Random], dict]] = MappingProxyType({"chat": chat_record,
                                                                            "rollouts": rollout_record})


def render(name: str) -> str:
    """The exact text of sample file ``name`` (one JSON record per line)."""
    kind, count, seed = FILES[name]
    rng = random.Random(seed)
    return "".join(json.dumps(GENERATORS[kind](rng)) + "\n" for _ in range(count))


def build_parser() -> argparse.ArgumentParser:
    p = new_parser("python -m flexcp.train.sample_data", __doc__.replace("`", ""))
    p.add_argument("--out", default=SAMPLES_DIR, help="output directory (default: the packaged samples/)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for name in FILES:
        path = os.path.join(args.out, name)
        with open(path, "w") as f:
            f.write(render(name))
        print(f"wrote {path} ({os.path.getsize(path):,} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
