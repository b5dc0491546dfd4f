"""LoRA through peft: adapters on the HF model before FSDP2, and the export of merged weights or the adapter.

``model.lora.r > 0`` wraps the model with ``peft.get_peft_model`` (the base weights frozen,
only the ``lora_A`` / ``lora_B`` matrices train). FSDP2 shards the wrapped model like the
plain one (frozen and trainable parameters side by side), flexcp's attention is untouched
(LoRA only replaces linear layers), so CP works as for full fine-tuning.

Export (``model.lora.export``): ``"merged"`` folds every adapter into its weight
(``W + (alpha / r) B A``) and writes a plain HF model; ``"adapter"`` writes peft's
``adapter_config.json`` + ``adapter_model.safetensors``, pointing at the base checkpoint
(``model.path``, or for a preset the frozen random-init base written to ``hf/base``).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from .schema import ConfigError, LoraConfig

PEFT_PREFIX = "base_model.model."
"""Where the HF model sits inside a ``PeftModelForCausalLM``."""
ADAPTER = "default"


def apply_lora(lm: nn.Module, cfg: LoraConfig) -> nn.Module:
    """``lm`` wrapped by peft with adapters on ``cfg.target_modules`` (the base frozen)."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    targets: Any = "all-linear" if cfg.target_modules == ["all-linear"] else list(cfg.target_modules)
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                              task_type="CAUSAL_LM")
    try:
        with warnings.catch_warnings():  # peft asks transformers 5 about checkpointing by its deprecated name
            warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
            return get_peft_model(lm, peft_cfg)
    except ValueError as exc:
        raise ConfigError(f"model.lora.target_modules={cfg.target_modules}: {exc}") from None


def _plain_name(name: str) -> str:
    return name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")


def merge_lora_state_dict(sd: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A peft model's full state dict -> the plain HF state dict with every adapter folded in.

    ``...X.base_layer.weight`` becomes ``...X.weight + scaling * lora_B @ lora_A``; ``base_layer``
    disappears from every name and the ``base_model.model.`` prefix is dropped.
    """
    out: dict[str, torch.Tensor] = {}
    for name, value in sd.items():
        if ".lora_" in name:
            continue
        plain = _plain_name(name)
        if name.endswith(".base_layer.weight"):
            stem = name[: -len(".base_layer.weight")]
            a, b = sd[f"{stem}.lora_A.{ADAPTER}.weight"], sd[f"{stem}.lora_B.{ADAPTER}.weight"]
            value = (value.double() + scaling * (b.double() @ a.double())).to(value.dtype)
        out[plain] = value
    return out


def export_lora(model: nn.Module, peft_lm: nn.Module, prefix: str, tokenizer: Any, out_dir: str, cfg: LoraConfig,
                base_path: str | None) -> str | None:
    """Write the LoRA-trained model to ``out_dir`` (collective; rank 0 writes); see the module doc.

    ``prefix`` is where ``peft_lm`` sits inside ``model`` (e.g. ``"lm."``).
    """
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        sd = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
        os.makedirs(out_dir, exist_ok=True)
        base = peft_lm.get_base_model()
        if cfg.export == "merged":
            base.save_pretrained(out_dir, state_dict=merge_lora_state_dict(sd, cfg.alpha / cfg.r),
                                 safe_serialization=True)
        else:
            if base_path is None:  # a preset: the adapter needs its (frozen, random-init) base next to it
                base_path = os.path.join(out_dir, "base")
                plain = {_plain_name(k): v for k, v in sd.items() if ".lora_" not in k}
                base.save_pretrained(base_path, state_dict=plain, safe_serialization=True)
                tokenizer.save(base_path)
            peft_lm.peft_config[ADAPTER].base_model_name_or_path = os.path.abspath(base_path)
            peft_lm.save_pretrained(out_dir, state_dict=sd, safe_serialization=True)
        tokenizer.save(out_dir)
    dist.barrier()
    return out_dir if dist.get_rank() == 0 else None
