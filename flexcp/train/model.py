"""Model building: a local HF checkpoint (``from_pretrained``, no network) or a built-in preset (random init)."""

from __future__ import annotations

import os
from types import MappingProxyType
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from ..hf.recompute import recompute_norms
from ..hf.tiled_mlp import tile_mlp
from .schema import ConfigError, ModelConfig
from .tokenizer import TOKENIZER_FILES

_LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=32000, rope_theta=500000.0)

PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    # the demo's model: a 2-layer Llama that learns the recall task on two CPU cores in two minutes
    # (init std ~ 1.2 / sqrt(hidden): attention logits start large enough to find the value quickly)
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rope_theta=1e6, initializer_range=0.15),
    # about 1.1B parameters (Llama-3.2-1B shapes with a 32k vocabulary): the GPU benchmark's model
    "llama-1b": _LLAMA_1B,
    # about 3.2B parameters: Llama-3.2-3B shapes (its 128,256-token vocabulary, tied embeddings): the long-sequence probe's
    "llama-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                     num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0,
                     tie_word_embeddings=True),
    # the same shapes as a Mistral-style model: every layer attends a sliding window of 4096 keys
    "mistral-1b": dict(_LLAMA_1B, model_type="mistral", sliding_window=4096),
})
"""The built-in architectures (``model.preset``), read-only: HF config fields; ``model_type`` (default
``"llama"``) names the architecture."""
_PRESET_DEFAULTS: Mapping[str, Any] = MappingProxyType(dict(max_position_embeddings=1 << 20, tie_word_embeddings=False,
                                                             use_cache=False))


def model_problems(m: ModelConfig) -> Iterator[str]:
    """What is wrong with the ``model`` section beyond its values: the checkpoint, preset, overrides and tokenizer."""
    path_ok = m.path is None or os.path.isfile(os.path.join(m.path, "config.json"))
    if not path_ok:
        yield (f"model.path={m.path!r} is not a Hugging Face checkpoint directory (no config.json there); "
               "download the model first (no network is used) or leave model.path unset for the built-in preset")
    elif m.path is None and m.preset not in PRESETS:
        yield f"model.preset={m.preset!r} is not one of {', '.join(map(repr, PRESETS))}"
    try:
        check_overrides(m.overrides, m.path is not None, m.preset)
    except ConfigError as exc:
        yield str(exc)
    if not path_ok and m.tokenizer is None:
        return  # the tokenizer is the checkpoint's: its problem is the one above
    tok = m.tokenizer_or_default()
    if tok != "byte" and not any(os.path.isfile(os.path.join(tok, f)) for f in TOKENIZER_FILES):
        yield (f"model.tokenizer={tok!r} holds no tokenizer ({', '.join(TOKENIZER_FILES)}); set model.tokenizer to "
               "a tokenizer directory, or 'byte' for the built-in byte-level tokenizer")


def check_overrides(overrides: dict[str, Any], has_path: bool, preset: str = "tiny") -> None:
    """Reject ``model.overrides`` that would be ignored: unknown fields of the preset's config class
    (``overrides["model_type"]`` or the preset's, naming the closest) or any with a path."""
    if not overrides:
        return
    if has_path:
        raise ConfigError(f"model.overrides {overrides} apply only to the built-in preset; with model.path set, "
                          "edit the checkpoint's config.json instead (or unset model.overrides)")
    import difflib
    import inspect

    from transformers import CONFIG_MAPPING

    model_type = overrides.get("model_type", PRESETS.get(preset, {}).get("model_type", "llama"))
    if model_type not in CONFIG_MAPPING:
        raise ConfigError(f"model.overrides.model_type={model_type!r} is not a transformers model type "
                          "(e.g. 'llama', 'mistral', 'qwen2')")
    cls = CONFIG_MAPPING[model_type]
    known = set(cls().to_dict()) | set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    for key, value in overrides.items():
        if key in known:
            continue
        try:  # a legacy key the config consumes (e.g. rope_theta) is fine; one it only stores is ignored
            ignored = key in cls(**{key: value}).to_dict()
        except (TypeError, ValueError):
            continue  # consumed, and preset_config reports the bad value
        if ignored:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"model.overrides.{key} is not a {cls.__name__} field (it would be ignored){hint}")


def preset_config(name: str, vocab_size: int, overrides: dict[str, Any] | None = None,
                  special_ids: dict[str, int | None] | None = None):
    """The HF config of a preset; ``vocab_size`` is the tokenizer's unless the preset fixes a larger one.

    ``special_ids`` (``bos_token_id``, ``eos_token_id``, ``pad_token_id``) come from the tokenizer.
    """
    from transformers import AutoConfig

    check_overrides(overrides or {}, has_path=False, preset=name)
    fields = {**_PRESET_DEFAULTS, **(special_ids or {}), **PRESETS[name], **(overrides or {})}
    fields["vocab_size"] = max(vocab_size, fields.get("vocab_size", 0))
    model_type = fields.pop("model_type", "llama")
    try:
        return AutoConfig.for_model(model_type, **fields)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model.overrides {overrides} do not make a valid {model_type} config: {exc}") from None


def build_model(cfg: ModelConfig, vocab_size: int, device: torch.device, seed: int,
                special_ids: dict[str, int | None] | None = None) -> nn.Module:
    """The HF causal LM in float32 on ``device`` (same initial weights on every rank), ready to train.

    ``special_ids``: the tokenizer's ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` for a preset.

    ``attn_implementation="magi"`` must be registered first (``flexcp.hf.recipe.setup_magi``).
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if cfg.path is not None:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.path, attn_implementation=cfg.attn_implementation, dtype=torch.float32, local_files_only=True
        ).to(device)
    else:
        config = preset_config(cfg.preset, vocab_size, cfg.overrides, special_ids)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, attn_implementation=cfg.attn_implementation,
                                                     dtype=torch.float32)
    model.config.use_cache = False
    emb = model.get_input_embeddings().num_embeddings
    if emb < vocab_size:
        raise ConfigError(f"the model has {emb} token embeddings but the tokenizer {vocab_size} ids; "
                          "use the checkpoint's own tokenizer (model.tokenizer)")
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
        recompute_norms(model)  # every norm keeps its bf16 input, not the float32 copies HF's RMSNorm saves
    if cfg.tiled_mlp:
        tile_mlp(model, cfg.tiled_mlp)
    model.train()
    return model


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute every decoder layer in backward (non-reentrant), through the API of this transformers version.

    transformers 5.x renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable``
    and warns on the old name (on every rank); older versions only have the old one.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of an HF decoder-only model (the FSDP and checkpointing units)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: cannot find the decoder layers (model.get_decoder().layers)")
    return list(layers)


def count_params(model: nn.Module) -> tuple[int, int]:
    """``(all parameters, parameters used in matmuls)``: the input embedding table is a lookup."""
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is emb
    return total, total - (0 if tied else emb.numel())
