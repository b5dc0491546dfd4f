"""Tiny Trainer / SFTTrainer runs for the flexcp.hf parity tests (module-level so spawned ranks can call them).

``train_run(rank, world, ...)`` trains a tiny random Llama or Qwen3 (attn "magi", fp32,
CPU) for a few optimizer steps on fixed synthetic data and returns the loss logged at
every step and the final trainable weights. ``cp=None`` runs the plain transformers /
TRL trainer (the cp = 1 reference); ``cp=N`` runs the flexcp trainer with ``cp_size=N``.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile

import torch

VOCAB = 96
BASE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, attention_dropout=0.0, pad_token_id=0,
            eos_token_id=1, bos_token_id=2)
ARCHS = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}


def make_model(arch: str, seed: int = 0, impl: str = "magi"):
    import transformers

    import flexcp.hf

    flexcp.hf.register_magi_attention()
    cfg_name, cls_name = ARCHS[arch]
    cfg = getattr(transformers, cfg_name)(**BASE)
    torch.manual_seed(seed)
    return getattr(transformers, cls_name)._from_config(copy.deepcopy(cfg), attn_implementation=impl).float()


def documents(n: int, seed: int = 1, lo: int = 5, hi: int = 23) -> list[list[int]]:
    """``n`` token lists of random lengths in ``[lo, hi)`` (ids 3.. so pad/eos/bos stay special)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(3, VOCAB, (k,), generator=g).tolist() for k in lens]


def pad_collate(examples: list[dict]) -> dict:
    """Right-padded rows with attention_mask; labels -100 on padding and on the prompt."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t3"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1", bos_token="t2",
                                   unk_token="t3")


def _join_dist(rank: int, world: int) -> None:
    """accelerate reads the launch from the environment; the spawned ranks already share a gloo group."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29512"),
                      ACCELERATE_USE_CPU="true")


def _trainable(model) -> dict:
    """Trainable parameters as full plain tensors (FSDP2 shards are gathered)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            p = p.detach()
            out[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).clone()
    return out


def train_run(rank: int, world: int, arch: str = "llama", kind: str = "trainer", cp: int | None = None,
              steps: int = 5, lora: bool = False, packing: bool = False, completion_only: bool = False,
              grad_accum: int = 1, batch: int = 2, extra_args: dict | None = None, out_dir: str | None = None,
              resume: str | None = None, evaluate: bool = False, levers: dict | None = None) -> dict:
    """Train; return the logged ``losses``, ``initial`` and final trainable ``weights``, ``tokens`` per forward, maybe ``eval_loss``.

    ``levers``: the flexcp trainer's long-sequence arguments (``tiled_mlp``, ``tiled_loss``, ``offload_activations``).
    """
    if world > 1:
        _join_dist(rank, world)
    import flexcp.hf

    model = make_model(arch)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 lora_dropout=0.0, init_lora_weights=False))
    initial = _trainable(model)
    seen: list[int] = []  # tokens per forward on this rank: a shard of the batch at cp > 1
    model.get_input_embeddings().register_forward_pre_hook(lambda _, args: seen.append(int(args[0].numel())))
    docs = documents(steps * batch * grad_accum * 2 + 8)
    prompt = [max(1, len(d) // 3) for d in docs]
    out_dir = out_dir or tempfile.mkdtemp(prefix="flexcp_trainer_")
    common = dict(output_dir=out_dir, max_steps=steps, per_device_train_batch_size=batch, learning_rate=5e-3,
                  logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=7, bf16=False,
                  gradient_accumulation_steps=grad_accum, disable_tqdm=True, dataloader_num_workers=0,
                  per_device_eval_batch_size=batch)
    common.update(extra_args or {})
    cp_kwargs = {} if cp is None else {"cp_size": cp, "cp_chunk_size": 8, **(levers or {})}
    if kind == "trainer":
        from transformers import Trainer, TrainingArguments

        rows = [{"input_ids": d, "labels": [-100] * p + d[p:] if completion_only else d}
                for d, p in zip(docs, prompt)]
        if packing:
            from transformers import DataCollatorWithFlattening

            collate = DataCollatorWithFlattening()
        else:
            collate = pad_collate
        cls = Trainer if cp is None else flexcp.hf.FlexCPTrainer
        trainer = cls(model=model, args=TrainingArguments(**common), train_dataset=rows, eval_dataset=rows[:4],
                      data_collator=collate, **cp_kwargs)
    else:
        import datasets
        from trl import SFTConfig, SFTTrainer

        ds = datasets.Dataset.from_dict({"input_ids": docs, "completion_mask": [[0] * p + [1] * (len(d) - p)
                                                                               for d, p in zip(docs, prompt)]})
        cfg = SFTConfig(**common, packing=packing, padding_free=packing, max_length=48 if packing else None,
                        completion_only_loss=completion_only, dataset_num_proc=None)
        cls = SFTTrainer if cp is None else flexcp.hf.FlexCPSFTTrainer
        trainer = cls(model=model, args=cfg, train_dataset=ds, eval_dataset=ds.select(range(4)),
                      processing_class=_tokenizer(), **cp_kwargs)
    trainer.train(resume_from_checkpoint=resume)
    seen_in_training = len(seen)
    result = {"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
              "weights": _trainable(trainer.accelerator.unwrap_model(trainer.model)),
              "tokens": seen[:seen_in_training], "initial": initial,
              "compiled": isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)}
    if evaluate:
        result["eval_loss"] = trainer.evaluate()["eval_loss"]
    return result


def _error(fn) -> str:
    try:
        fn()
    except ValueError as exc:
        return str(exc)
    return "no error"


def refusals(rank: int, world: int, out_dir: str) -> dict:
    """The errors cp > 1 raises on this rank, by case (``"no error"`` where none was raised)."""
    _join_dist(rank, world)
    from transformers import TrainingArguments

    import flexcp.hf

    args = TrainingArguments(output_dir=out_dir, use_cpu=True, report_to=[], max_steps=1, disable_tqdm=True)
    rows = [{"input_ids": d, "labels": d} for d in documents(8)]
    errors = {
        "not_magi": _error(lambda: flexcp.hf.FlexCPTrainer(model=make_model("llama", impl="sdpa"), args=args,
                                                           train_dataset=rows, data_collator=pad_collate, cp_size=2)),
        "cp_does_not_divide": _error(lambda: flexcp.hf.FlexCPTrainer(model=make_model("llama"), args=args,
                                                                     train_dataset=rows, data_collator=pad_collate,
                                                                     cp_size=3)),
    }
    trainer = flexcp.hf.FlexCPTrainer(model=make_model("llama"), args=args, train_dataset=rows, eval_dataset=rows,
                                      data_collator=pad_collate, cp_size=2, cp_chunk_size=8)
    errors["predict_logits"] = _error(lambda: trainer.predict(rows))
    mine = pad_collate(rows[:2] if rank == 0 else rows[2:4])
    errors["different_batches"] = _error(lambda: flexcp.hf.check_same_batch(mine, trainer.cp_mesh.cp_group))
    errors["same_batches"] = _error(lambda: flexcp.hf.check_same_batch(pad_collate(rows[:2]), trainer.cp_mesh.cp_group))
    return errors


def run_example(rank: int, world: int, argv: list[str]) -> dict:
    """``examples/sft_cp.py``'s ``main(argv)`` as shipped, on this rank."""
    import importlib.util

    if world > 1:
        _join_dist(rank, world)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples", "sft_cp.py")
    spec = importlib.util.spec_from_file_location("flexcp_example_sft_cp", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    warned: list[str] = []
    catcher = logging.Handler(logging.WARNING)
    catcher.emit = lambda record: warned.append(record.getMessage())
    logging.getLogger("trl").addHandler(catcher)
    try:
        result = module.main(argv)
    finally:
        logging.getLogger("trl").removeHandler(catcher)
    return {**result, "trl_warnings": warned}
