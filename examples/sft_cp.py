"""Supervised fine-tuning with TRL's SFTTrainer and flexcp context parallelism.

    python examples/sft_cp.py                                            # cp = 1, one process
    torchrun --nproc-per-node 2 examples/sft_cp.py --cp-size 2           # cp = 2 (CPU: gloo, GPUs: NCCL)
    accelerate launch --num_processes 4 examples/sft_cp.py --cp-size 2   # 2 CP groups of 2 ranks

Packed, padding-free batches with completion-only loss; documents never attend across
each other, at any cp. Offline by default (a tiny random Llama, synthetic prompt /
completion pairs); pass --model (HF id or path) and --dataset (HF dataset with
"prompt"/"completion", "messages" or "text" columns) to fine-tune for real.
"""

from __future__ import annotations

import argparse

import torch
from datasets import Dataset, load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import SFTConfig

from flexcp.hf import FlexCPSFTTrainer, register_magi_attention


def tiny_model_and_data(seed: int = 0):
    """A random 2-layer Llama, a 64-word tokenizer and 64 prompt / completion pairs (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(64)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0", eos_token="w1", unk_token="w2")
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    model = LlamaForCausalLM._from_config(config, attn_implementation="magi")
    g = torch.Generator().manual_seed(seed)

    def text(lo: int, hi: int) -> str:
        n = int(torch.randint(lo, hi, (1,), generator=g))
        return " ".join(words[i] for i in torch.randint(3, 64, (n,), generator=g).tolist())

    # TRL tokenizes prompt + completion as one string: the completion's leading space keeps the boundary words apart
    rows = [{"prompt": text(4, 24), "completion": " " + text(4, 40)} for _ in range(64)]
    return model, tokenizer, Dataset.from_list(rows)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cp-size", type=int, default=1, help="ranks per context-parallel group")
    p.add_argument("--model", help="HF model id or path (default: a tiny random Llama)")
    p.add_argument("--dataset", help="HF dataset id (default: synthetic prompt / completion pairs)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per packed row")
    p.add_argument("--max-steps", type=int, default=8)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 master weights)")
    p.add_argument("--output-dir", default="sft-cp-out")
    a = p.parse_args(argv)

    register_magi_attention()  # before from_pretrained(..., attn_implementation="magi")
    if a.model:
        model = AutoModelForCausalLM.from_pretrained(a.model, attn_implementation="magi")
        tokenizer = AutoTokenizer.from_pretrained(a.model)
        data = load_dataset(a.dataset or "trl-lib/Capybara", split="train")
    else:
        model, tokenizer, data = tiny_model_and_data()
    args = SFTConfig(
        output_dir=a.output_dir, max_steps=a.max_steps, per_device_train_batch_size=2, learning_rate=1e-3,
        packing=True, padding_free=True, max_length=a.max_length,  # BFD packing, one row per batch
        bf16=a.bf16, use_cpu=not torch.cuda.is_available(), logging_steps=1, save_steps=a.max_steps, report_to="none",
    )
    trainer = FlexCPSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                               cp_size=a.cp_size)
    result = trainer.train()
    trainer.save_model()
    steps = [h for h in trainer.state.log_history if "loss" in h]
    summary = {"train_loss": result.training_loss, "losses": [h["loss"] for h in steps],
               "grad_norms": [h["grad_norm"] for h in steps], "num_tokens": steps[-1]["num_tokens"]}
    if trainer.is_world_process_zero():  # compare these lines between cp = 1 and cp = 2: they agree to ~1e-5
        print(f"cp = {a.cp_size}: loss per step " + " ".join(f"{x:.4f}" for x in summary["losses"]))
        print(f"cp = {a.cp_size}: mean loss {summary['train_loss']:.4f}, last grad norm {summary['grad_norms'][-1]:.4f}, "
              f"{summary['num_tokens']:.0f} tokens")
    return summary


if __name__ == "__main__":
    main()
