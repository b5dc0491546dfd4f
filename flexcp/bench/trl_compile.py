"""TRL SFT step, compiled and not: plain ``SFTTrainer`` + ``"magi"``, ``FlexCPSFTTrainer(cp_size=1)``, HF ``flex_attention``.

One GPU, one random-init model (Qwen3-0.6B shape by default), TRL packing with padding-free
batches (``max_length`` tokens per step, documents of random lengths), bf16, gradient
checkpointing. Each contender trains ``--warmup + --steps`` steps from the same weights on
the same packs, with ``TrainingArguments(torch_compile=...)`` off and on; steps after the
warm-up (which includes compilation) are timed with a device sync. Every pack is padded to
``max_length`` (``pad_to_multiple_of``: one shape, one compilation); tokens/s counts real tokens. Writes
``trl_compile.json`` and ``trl_compile.md`` (tokens/s, s/step, first-step seconds,
peak memory, per-step losses side by side) to ``--out`` and prints the table.

    python -m flexcp.bench.trl_compile --out "$OUT"

Needs ``trl`` and ``datasets`` (and ``accelerate``); a missing one is named at once.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    "qwen3-0.6b": ("Qwen3Config", "Qwen3ForCausalLM",
                   dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                        rope_theta=1e6)),
    "llama-1b": ("LlamaConfig", "LlamaForCausalLM",
                 dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                      rope_theta=5e5)),
}
CONTENDERS = (  # (name, attn_implementation, trainer class), the pair first in case the budget runs out
    ("SFTTrainer + magi", "magi", "plain"),
    ("SFTTrainer + flex_attention", "flex_attention", "plain"),
    ("FlexCPSFTTrainer(cp_size=1)", "magi", "flexcp"),
)


def _missing() -> list[str]:
    out = []
    for name in ("trl", "datasets", "accelerate", "transformers"):
        try:
            __import__(name)
        except ImportError:
            out.append(name)
    return out


def _tokenizer():
    """A tiny offline tokenizer: the packed data are token ids already; TRL reads pad/eos from it."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(8)}, unk_token="t3"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1", bos_token="t2",
                                   unk_token="t3")


def _dataset(args, vocab: int):
    """Documents of random lengths (256 .. max_length / 4 tokens), enough for every step's pack."""
    import datasets

    g = torch.Generator().manual_seed(0)
    need, docs = (args.warmup + args.steps + 2) * args.max_length, []
    while need > 0:
        n = int(torch.randint(256, max(257, args.max_length // 4), (1,), generator=g))
        docs.append(torch.randint(8, vocab, (n,), generator=g).tolist())
        need -= n
    return datasets.Dataset.from_dict({"input_ids": docs})


def _model(args, impl: str):
    import transformers

    cfg_name, cls_name, shape = SHAPES[args.model]
    shape = {**shape, **({"num_hidden_layers": args.layers} if args.layers else {})}
    cfg = getattr(transformers, cfg_name)(**shape, attention_dropout=0.0, pad_token_id=0, eos_token_id=1,
                                          bos_token_id=2, max_position_embeddings=max(args.max_length, 4096))
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)._from_config(cfg, attn_implementation=impl,
                                                          dtype=torch.float32 if args.cpu else torch.bfloat16)
    return model if args.cpu else model.cuda()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _Timer:
    """A TrainerCallback recording each step's wall time (device-synced) and logged loss."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Timer(TrainerCallback):
            def __init__(self) -> None:
                self.times: list[float] = []
                self.losses: list[float] = []
                self._t = 0.0

            def on_step_begin(self, *a, **k):
                _sync()
                self._t = time.perf_counter()

            def on_step_end(self, *a, **k):
                _sync()
                self.times.append(time.perf_counter() - self._t)

            def on_log(self, _args, _state, _control, logs=None, **k):
                if logs and "loss" in logs:
                    self.losses.append(float(logs["loss"]))

        return Timer()


class _CountingCollator:
    """The trainer's collator, counting the real (unpadded) tokens of each batch it builds."""

    def __init__(self, inner) -> None:
        self.inner, self.tokens = inner, []

    def __call__(self, examples):
        self.tokens.append(sum(len(e["input_ids"]) for e in examples))
        return self.inner(examples)


def run_one(args, name: str, impl: str, kind: str, compiled: bool, ds, out_dir: str) -> dict:
    """Train one contender; its timings, tokens, losses and peak memory."""
    from trl import SFTConfig, SFTTrainer

    import flexcp.hf

    flexcp.hf.register_magi_attention()
    torch._dynamo.reset()
    if not args.cpu:
        torch.cuda.reset_peak_memory_stats()
    model = _model(args, impl)
    cfg = SFTConfig(output_dir=out_dir, max_steps=args.warmup + args.steps, per_device_train_batch_size=1,
                    learning_rate=1e-5, warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[], seed=7,
                    bf16=not args.cpu, use_cpu=args.cpu, gradient_checkpointing=True, torch_compile=compiled,
                    torch_compile_backend=args.compile_backend, packing=True,
                    padding_free=True, max_length=args.max_length, pad_to_multiple_of=args.max_length,
                    dataset_num_proc=None, disable_tqdm=True,
                    dataloader_num_workers=0)
    cls = flexcp.hf.FlexCPSFTTrainer if kind == "flexcp" else SFTTrainer
    extra = {"cp_size": 1} if kind == "flexcp" else {}
    timer = _Timer()
    trainer = cls(model=model, args=cfg, train_dataset=ds, processing_class=_tokenizer(), callbacks=[timer], **extra)
    trainer.data_collator = counter = _CountingCollator(trainer.data_collator)
    trainer.train()
    timed = timer.times[args.warmup:]
    tokens = counter.tokens[args.warmup:args.warmup + len(timed)]
    result = {"contender": name, "compiled": compiled, "attn_implementation": impl,
              "first_step_s": round(timer.times[0], 2), "s_per_step": round(sum(timed) / len(timed), 4),
              "tokens_per_s": round(sum(tokens) / sum(timed), 1), "tokens_per_step": tokens,
              "losses": [round(x, 5) for x in timer.losses],
              "peak_gib": 0.0 if args.cpu else round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    del trainer, model
    _free()
    return result


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _table(results: list[dict]) -> str:
    rows = ["| contender | compiled | tokens/s | s/step | vs flexcp same mode | first step s | peak GiB | losses |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    base = {r["compiled"]: r for r in results if r.get("contender", "").startswith("FlexCP") and "error" not in r}
    for r in results:
        if "error" in r:
            rows.append(f"| {r['contender']} | {r['compiled']} | - | - | - | - | - | {r['error'][:80]} |")
            continue
        ref = base.get(r["compiled"])
        rel = f"{r['tokens_per_s'] / ref['tokens_per_s']:.3f}x" if ref else "-"
        rows.append(f"| {r['contender']} | {r['compiled']} | {r['tokens_per_s']:,.0f} | {r['s_per_step']:.3f} | {rel} | "
                    f"{r['first_step_s']} | {r['peak_gib']} | {' '.join(f'{x:.4f}' for x in r['losses'])} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "trl_compile_out")),
                   help="folder for trl_compile.json / .md (default: $OUT)")
    p.add_argument("--model", choices=sorted(SHAPES), default="qwen3-0.6b", help="model shape (random init)")
    p.add_argument("--layers", type=int, default=0, help="override the number of layers (0: the shape's)")
    p.add_argument("--max-length", type=int, default=32768, help="tokens per packed step")
    p.add_argument("--steps", type=int, default=5, help="timed steps per contender")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps (compilation happens here)")
    p.add_argument("--modes", default="eager,compiled", help="comma list of eager, compiled")
    p.add_argument("--budget-s", type=float, default=340.0,
                   help="skip contenders that would start after this many seconds (the run must fit ~6 min)")
    p.add_argument("--compile-backend", default="inductor", help="torch_compile_backend of the compiled runs")
    p.add_argument("--cpu", action="store_true", help="a CPU smoke run (float32; use with a small --layers/--max-length)")
    args = p.parse_args(argv)
    missing = _missing()
    if missing:
        print(f"trl_compile: missing packages {missing}: install their wheels (see the module docstring)", file=sys.stderr)
        return 2
    if not args.cpu and not torch.cuda.is_available():
        print("trl_compile: needs a CUDA device", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    ds = _dataset(args, SHAPES[args.model][2]["vocab_size"])
    start, results = time.perf_counter(), []
    modes = [m.strip() == "compiled" for m in args.modes.split(",") if m.strip()]
    for compiled in modes:
        for name, impl, kind in CONTENDERS:
            entry = {"contender": name, "compiled": compiled}
            if time.perf_counter() - start > args.budget_s:
                results.append({**entry, "error": "not run (time budget)"})
                continue
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    results.append(run_one(args, name, impl, kind, compiled, ds, tmp))
            except Exception as e:  # one contender's failure (e.g. OOM) is a result; the others still run
                results.append({**entry, "error": f"{type(e).__name__}: {e}"})
                _free()
            print(json.dumps(results[-1])[:400], flush=True)
    info = {"model": args.model, "layers": args.layers or SHAPES[args.model][2]["num_hidden_layers"],
            "max_length": args.max_length, "steps": args.steps, "warmup": args.warmup,
            "torch": torch.__version__, "device": "cpu" if args.cpu else torch.cuda.get_device_name(), "wall_s": round(time.perf_counter() - start, 1)}
    import transformers
    import trl

    info.update(transformers=transformers.__version__, trl=trl.__version__)
    (args.out / "trl_compile.json").write_text(json.dumps({"info": info, "results": results}, indent=1))
    md = f"{json.dumps(info)}\n\n{_table(results)}\n"
    (args.out / "trl_compile.md").write_text(md)
    print(md)
    return 0 if any("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
