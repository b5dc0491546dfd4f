"""The recipe's config: dataclasses are the schema; YAML plus ``key=value`` overrides fill them.

Everything is checked up front by :func:`validate` (unknown keys, types, choices, the
dp x cp factorization of the world, sequence length vs the CP group, missing files), so a
bad config fails before any process group, model or data is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config value is wrong; the message names the key and the fix."""


@dataclass
class LoraConfig:
    r: int = 0
    """LoRA rank; 0 disables LoRA (full fine-tuning). With r > 0 only the adapters train (through peft)."""
    alpha: float = 16.0
    """LoRA scaling numerator: the update is (alpha / r) * B @ A."""
    dropout: float = 0.0
    """Dropout on the adapters' input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names (suffixes) that get adapters; ["all-linear"] for every linear layer but the LM head."""
    export: str = "merged"
    """What out_dir/hf holds: "merged" (adapters folded into the weights: a plain HF model) or "adapter" (peft)."""


@dataclass
class ModelConfig:
    path: str | None = None
    """Local Hugging Face checkpoint directory (config.json + weights); None -> the built-in preset."""
    preset: str = "tiny"
    """Built-in Llama-style architecture (random init) used when ``path`` is None."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Extra HF config fields for the preset (e.g. ``num_hidden_layers``)."""
    tokenizer: str | None = None
    """Tokenizer directory; None -> ``path`` if set, else the built-in byte-level tokenizer ("byte")."""
    attn_implementation: str = "magi"
    """"magi" (flexcp, any mask, any cp) or HF's "sdpa" / "flex_attention" / "eager" (cp = 1, causal or packed data)."""
    activation_checkpointing: bool = False
    offload_activations: bool = False
    """Keep the tensors the forward saves for backward in host memory (``torch.autograd.graph.save_on_cpu``).

    With ``activation_checkpointing`` these are each layer's input (plus the final norm's and the loss
    chunks' inputs): GPU memory per token drops by those, host memory grows by as much, and every step
    copies them to the host and back (pageable memory: exact sizes, no rounding up)."""
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class RecallConfig:
    num_pairs: int = 1
    """Key/value pairs per sequence, all in its second quarter; each is queried once at the end."""
    num_values: int = 16
    """Size of the value alphabet (chance accuracy = 1 / num_values)."""
    filler: str = "repeat"
    """Haystack around pairs and queries: "repeat" (one token, passkey-style) or "random" (letters; harder)."""


@dataclass
class DataConfig:
    kind: str = "recall"
    """"recall" (synthetic long-range recall), "jsonl" (text / chat messages, packed) or "rollouts" (prefix trees)."""
    path: str | None = None
    """JSONL file for "jsonl" and "rollouts"."""
    seq_len: int = 2048
    """Tokens per packed sequence (one sequence per micro-batch, sharded over the CP group)."""
    shuffle: bool = True
    recall: RecallConfig = field(default_factory=RecallConfig)


@dataclass
class ParallelConfig:
    cp: int = 1
    """Context-parallel group size: every sequence is sharded over ``cp`` ranks."""
    dp: int = 0
    """Data-parallel size; 0 -> world_size // cp. FSDP2 shards over all dp x cp ranks."""
    chunk_size: int = 512
    """Dispatch chunk (tokens); with cp > 1 the sequence length must be a multiple of cp * chunk_size."""
    timeout_minutes: float = 10.0
    """Process-group timeout: a collective waiting longer (a rank stalled or skipped a step) raises instead of hanging."""


@dataclass
class TrainConfig:
    steps: int = 100
    grad_accum: int = 1
    """Micro-batches (sequences) per dp rank per optimizer step."""
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = 10
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables clipping)."""
    dtype: str = "auto"
    """"bf16" (FSDP2 mixed precision: bf16 compute, fp32 weights and reductions), "fp32", "auto" (bf16 on GPU)."""
    seed: int = 0
    loss_chunk_tokens: int = 8192
    """The LM head and cross-entropy run over this many tokens at a time (full logits are never stored)."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save a resumable checkpoint every N steps (0: only at the end)."""
    resume: bool = True
    """Resume from the latest checkpoint under out_dir/checkpoints when there is one."""
    keep: int = 2
    """How many step checkpoints to keep (older ones are deleted)."""
    export_hf: bool = True
    """Write the final model as an HF safetensors directory (out_dir/hf) loadable by from_pretrained."""


@dataclass
class LoggingConfig:
    log_every: int = 10
    """Print a line and write metrics.jsonl every N steps."""
    progress: str = "auto"
    """"auto" (tqdm, else rich, else plain lines), "tqdm", "rich", "plain" or "none"."""
    tensorboard: bool = True
    """Also write TensorBoard events (out_dir/tb) when tensorboard is installed."""
    wandb: bool = False
    """Also log to Weights & Biases (needs the wandb package; WANDB_MODE=offline works without network)."""
    wandb_project: str | None = None
    """W&B project; None -> $WANDB_PROJECT, else "flexcp". The run is named after out_dir."""


@dataclass
class EvalConfig:
    path: str | None = None
    """Held-out JSONL in data.path's format; None with data.kind='recall': held-out synthetic sequences."""
    every: int = 0
    """Evaluate every N optimizer steps and after the last one (0: never)."""
    steps: int = 16
    """Sequences per evaluation (split over the dp ranks)."""


@dataclass
class FinetuneConfig:
    out_dir: str = "runs/flexcp"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "flexcp_tokenizer.json")

CHOICES: dict[str, tuple[str, ...]] = {
    "model.attn_implementation": ("magi", "sdpa", "flex_attention", "eager"),
    "data.kind": ("recall", "jsonl", "rollouts"),
    "data.recall.filler": ("repeat", "random"),
    "train.dtype": ("auto", "bf16", "fp32"),
    "logging.progress": ("auto", "tqdm", "rich", "plain", "none"),
    "model.lora.export": ("merged", "adapter"),
}


# ------------------------------------------------------------------------------------------ loading


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> FinetuneConfig:
    """Defaults, then the YAML file at ``path``, then ``key=value`` overrides (values parsed as YAML)."""
    data: dict[str, Any] = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"--config {path!r}: no such file; pass the path of a YAML config")
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"--config {path!r} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--config {path!r} must hold a mapping at top level; got {type(data).__name__}")
    for item in overrides:
        _apply_override(data, item)
    return from_dict(data)


def from_dict(data: dict[str, Any]) -> FinetuneConfig:
    """Build the config from a nested dict, rejecting unknown keys and wrong types."""
    return _build(FinetuneConfig, data, "")


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts (what the run saves next to its outputs)."""
    return dataclasses.asdict(cfg)


def _apply_override(data: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value, e.g. train.lr=1e-4")
    dotted, raw = item.split("=", 1)
    parts = dotted.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r}: {dotted!r} is not a dotted key like train.lr")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} holds a value, not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        node[parts[-1]] = raw


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of keys; got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{prefix}{key}'{hint}; valid keys under {where}: {', '.join(names)}")
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, name: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, {} if value is None else value, name + ".")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, name)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin is list:
        if isinstance(value, (list, tuple)):
            return [_coerce(args[0], v, f"{name}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    else:  # pragma: no cover - every schema type is handled above
        raise TypeError(f"unsupported config type {tp!r} for {name}")
    want = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"{name} must be {want}; got {value!r} ({type(value).__name__})")


# --------------------------------------------------------------------------------------- validation


def validate(cfg: FinetuneConfig, world_size: int) -> FinetuneConfig:
    """Check ``cfg`` for a run on ``world_size`` ranks; return it with ``parallel.dp`` resolved.

    Every problem is reported at once (one ConfigError listing them all), not one per run.
    """
    errors: list[str] = []
    _collect(errors, _check_values, cfg)
    if not errors:  # the cross-key checks assume sane values
        _collect(errors, _check_parallel, cfg, world_size)
        for check in (_check_model, _check_data, _check_features):
            _collect(errors, check, cfg)
    if len(errors) == 1:
        raise ConfigError(errors[0])
    if errors:
        raise ConfigError(f"{len(errors)} problems:\n" + "\n".join(f"  - {e}" for e in errors))
    return cfg


def _collect(errors: list[str], check: Any, *args: Any) -> None:
    try:
        check(*args)
    except ConfigError as exc:
        errors.append(str(exc))


def _check_values(cfg: FinetuneConfig) -> None:
    for dotted, allowed in CHOICES.items():
        value = _get(cfg, dotted)
        if value not in allowed:
            raise ConfigError(f"{dotted}={value!r} is not one of {', '.join(map(repr, allowed))}")
    _positive(cfg, "data.seq_len", "parallel.cp", "parallel.chunk_size", "train.steps", "train.grad_accum",
              "logging.log_every", "train.loss_chunk_tokens", "checkpoint.keep", "data.recall.num_pairs",
              "data.recall.num_values", "train.eps", "parallel.timeout_minutes", "eval.steps")
    _non_negative(cfg, "parallel.dp", "train.warmup_steps", "train.max_grad_norm", "train.weight_decay",
                  "checkpoint.every", "eval.every", "model.lora.r", "model.lora.alpha")
    t = cfg.train
    if t.lr <= 0:
        raise ConfigError(f"train.lr must be > 0; got {t.lr}")
    if not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError(f"train.min_lr_ratio must be in [0, 1]; got {t.min_lr_ratio}")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        raise ConfigError(f"train.betas must be two numbers in [0, 1); got {t.betas}")


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _positive(cfg: FinetuneConfig, *keys: str) -> None:
    for key in keys:
        if _get(cfg, key) <= 0:
            raise ConfigError(f"{key} must be > 0; got {_get(cfg, key)}")


def _non_negative(cfg: FinetuneConfig, *keys: str) -> None:
    for key in keys:
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0; got {_get(cfg, key)}")


def _check_parallel(cfg: FinetuneConfig, world_size: int) -> None:
    p = cfg.parallel
    if world_size % p.cp:
        raise ConfigError(
            f"world size {world_size} does not factor into dp x cp with parallel.cp={p.cp}; launch a multiple "
            f"of {p.cp} processes (torchrun --nproc_per_node ...) or set parallel.cp to a divisor of {world_size}"
        )
    dp = p.dp or world_size // p.cp
    if dp * p.cp != world_size:
        raise ConfigError(
            f"parallel.dp={p.dp} x parallel.cp={p.cp} = {dp * p.cp} ranks, but the world has {world_size}; "
            f"set parallel.dp={world_size // p.cp} (or 0 to derive it)"
        )
    p.dp = dp
    unit = p.cp * p.chunk_size
    if p.cp > 1 and cfg.data.seq_len % unit:
        up = -(-cfg.data.seq_len // unit) * unit
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} is not a multiple of parallel.cp x parallel.chunk_size = "
            f"{p.cp} x {p.chunk_size} = {unit} (every CP rank holds the same number of whole chunks); "
            f"use data.seq_len={up} or a parallel.chunk_size that divides {cfg.data.seq_len // p.cp}"
        )
    if p.cp > 1 and cfg.model.attn_implementation != "magi":
        raise ConfigError(
            f"parallel.cp={p.cp} needs model.attn_implementation='magi' (HF {cfg.model.attn_implementation!r} "
            "attention cannot see keys on other ranks)"
        )


def _check_model(cfg: FinetuneConfig) -> None:
    m = cfg.model
    if m.path is not None:
        if not os.path.isfile(os.path.join(m.path, "config.json")):
            raise ConfigError(
                f"model.path={m.path!r} is not a Hugging Face checkpoint directory (no config.json there); "
                "download the model first (no network is used) or leave model.path unset for the built-in preset"
            )
    else:
        from .model import PRESETS

        if m.preset not in PRESETS:
            raise ConfigError(f"model.preset={m.preset!r} is not one of {', '.join(map(repr, PRESETS))}")
    from .model import check_overrides

    check_overrides(m.overrides, m.path is not None, m.preset)
    if m.tokenizer is None:
        m.tokenizer = "byte" if m.path is None else m.path
    tok = m.tokenizer
    if tok != "byte" and not any(os.path.isfile(os.path.join(tok, f)) for f in _TOKENIZER_FILES):
        raise ConfigError(
            f"model.tokenizer={tok!r} holds no tokenizer ({', '.join(_TOKENIZER_FILES)}); set model.tokenizer to "
            "a tokenizer directory, or 'byte' for the built-in byte-level tokenizer"
        )


def _check_data(cfg: FinetuneConfig) -> None:
    d = cfg.data
    if d.kind == "rollouts" and cfg.model.attn_implementation != "magi":
        raise ConfigError(
            "data.kind='rollouts' needs model.attn_implementation='magi': HF "
            f"{cfg.model.attn_implementation!r} attention cannot express a prefix-tree mask"
        )
    if d.kind in ("jsonl", "rollouts"):
        if d.path is None:
            sample = "sft_chat.jsonl" if d.kind == "jsonl" else "rollouts.jsonl"
            raise ConfigError(f"data.kind={d.kind!r} reads a JSONL file: set data.path (a sample to try: "
                              f"data.path=flexcp/train/samples/{sample})")
        if not os.path.isfile(d.path):
            raise ConfigError(f"data.path={d.path!r}: no such file")
    if d.kind == "recall":
        from .data import RECALL_KEYS, RECALL_VALUES, recall_min_seq_len

        if d.recall.num_pairs > len(RECALL_KEYS):
            raise ConfigError(f"data.recall.num_pairs must be <= {len(RECALL_KEYS)} (one distinct key letter per "
                              f"pair); got {d.recall.num_pairs}")

        if d.recall.num_values > len(RECALL_VALUES):
            raise ConfigError(f"data.recall.num_values must be <= {len(RECALL_VALUES)}; got {d.recall.num_values}")
        need = recall_min_seq_len(d.recall.num_pairs)
        if d.seq_len < need:
            raise ConfigError(
                f"data.seq_len={d.seq_len} is too short for data.recall.num_pairs={d.recall.num_pairs}: the pairs "
                f"must fit in the second quarter of the sequence; use data.seq_len >= {need}"
            )


def _check_features(cfg: FinetuneConfig) -> None:
    """Evaluation, LoRA and Weights & Biases options."""
    e, lora = cfg.eval, cfg.model.lora
    if e.path is not None:
        if cfg.data.kind == "recall":
            raise ConfigError("eval.path is for data.kind 'jsonl' / 'rollouts'; the recall task evaluates on "
                              "held-out synthetic sequences: leave eval.path unset")
        if not os.path.isfile(e.path):
            raise ConfigError(f"eval.path={e.path!r}: no such file")
    elif e.every and cfg.data.kind != "recall":
        raise ConfigError(f"eval.every={e.every} with data.kind={cfg.data.kind!r} needs held-out data: set eval.path "
                          "to a JSONL file in data.path's format (or eval.every=0)")
    if lora.r:
        if not 0 <= lora.dropout < 1:
            raise ConfigError(f"model.lora.dropout must be in [0, 1); got {lora.dropout}")
        if not lora.target_modules:
            raise ConfigError("model.lora.target_modules is empty; name the modules to adapt, e.g. [q_proj, v_proj]")
        if importlib.util.find_spec("peft") is None:
            raise ConfigError("model.lora.r > 0 needs the peft package: pip install 'flexcp[lora]' (or model.lora.r=0)")
    if cfg.logging.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("logging.wandb=true needs the wandb package: pip install wandb (or logging.wandb=false)")
