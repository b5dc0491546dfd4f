"""The recipe's config schema: one dataclass per section, typed fields, each section checking its own values.

A field's type says what it may hold: ``Literal[...]`` lists the choices, ``Annotated[int,
POSITIVE]`` bounds a number, and :meth:`Section.problems` checks both for every field of a
section (plus the section's own rules, e.g. ``train.betas``), naming each key by its dotted
path. Checks that need more than one section, the world size, files or other modules
(model presets, data kinds) are :func:`flexcp.train.config.validate`'s. This module imports
nothing from the recipe, so every other recipe module may import it.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Iterator, Literal

from ..sharding.plan import DEFAULT_CHUNK_SIZE


class ConfigError(ValueError):
    """A config value is wrong; the message names the key and the fix."""


@dataclass(frozen=True)
class Bound:
    """The interval a numeric field must lie in (``None``: unbounded on that side); used as ``Annotated`` metadata."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def problem(self, name: str, value: float) -> str | None:
        """The error for ``value`` outside the interval, else None."""
        low_ok = (self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
        high_ok = (self.lt is None or value < self.lt) and (self.le is None or value <= self.le)
        if low_ok and high_ok:
            return None
        low, high = self.gt if self.ge is None else self.ge, self.lt if self.le is None else self.le
        if high is None:
            return f"{name} must be {'>' if self.ge is None else '>='} {low:g}; got {value}"
        return f"{name} must be in {'(' if self.ge is None else '['}{low:g}, {high:g}{')' if self.le is None else ']'}; got {value}"


POSITIVE = Bound(gt=0)
NON_NEGATIVE = Bound(ge=0)

AttnImplementation = Literal["magi", "sdpa", "flex_attention", "eager"]
Dtype = Literal["auto", "bf16", "fp32"]
Progress = Literal["auto", "tqdm", "rich", "plain", "none"]
LoraExport = Literal["merged", "adapter"]
Filler = Literal["repeat", "random"]


def field_problem(tp: Any, value: Any, name: str) -> str | None:
    """What is wrong with ``value`` for a field of type ``tp`` beyond its Python type: not finite, a choice or a bound."""
    if problem := _finite_problem(value, name):
        return problem
    if typing.get_origin(tp) is Annotated:
        for meta in tp.__metadata__:
            if isinstance(meta, Bound) and (problem := meta.problem(name, value)):
                return problem
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) is Literal and value not in typing.get_args(tp):
        return f"{name}={value!r} is not one of {', '.join(map(repr, typing.get_args(tp)))}"
    return None


def _finite_problem(value: Any, name: str) -> str | None:
    """Every float in a config (a field, a list's item, a mapping's value) must be finite: inf / nan train on to NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{name} must be a finite number; got {value}"
    items = enumerate(value) if isinstance(value, list) else value.items() if isinstance(value, dict) else ()
    for key, item in items:
        if problem := _finite_problem(item, f"{name}[{key}]" if isinstance(value, list) else f"{name}.{key}"):
            return problem
    return None


class Section:
    """A config section (a dataclass): :meth:`problems` checks its fields' choices and bounds, then :meth:`rules`."""

    def problems(self, where: str = "") -> list[str]:
        """Every problem of this section and the sections in it; ``where`` is its dotted path ("" for the top)."""
        hints = typing.get_type_hints(type(self), include_extras=True)
        out: list[str] = []
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value, name = getattr(self, f.name), f"{where}.{f.name}" if where else f.name
            if isinstance(value, Section):
                out += value.problems(name)
            elif problem := field_problem(hints[f.name], value, name):
                out.append(problem)
        return out + list(self.rules(where))

    def rules(self, where: str) -> Iterator[str]:
        """Problems that involve several fields of this section (none by default)."""
        return iter(())


@dataclass
class LoraConfig(Section):
    r: Annotated[int, NON_NEGATIVE] = 0
    """LoRA rank; 0 disables LoRA (full fine-tuning). With r > 0 only the adapters train (through peft)."""
    alpha: Annotated[float, NON_NEGATIVE] = 16.0
    """LoRA scaling numerator: the update is (alpha / r) * B @ A."""
    dropout: float = 0.0
    """Dropout on the adapters' input (checked only with r > 0)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names (suffixes) that get adapters; ["all-linear"] for every linear layer but the LM head."""
    export: LoraExport = "merged"
    """What out_dir/hf holds: "merged" (adapters folded into the weights: a plain HF model) or "adapter" (peft)."""

    def rules(self, where: str) -> Iterator[str]:
        if not self.r:
            return
        if not 0 <= self.dropout < 1:
            yield f"{where}.dropout must be in [0, 1); got {self.dropout}"
        if not self.target_modules:
            yield f"{where}.target_modules is empty; name the modules to adapt, e.g. [q_proj, v_proj]"


@dataclass
class ModelConfig(Section):
    path: str | None = None
    """Local Hugging Face checkpoint directory (config.json + weights); None -> the built-in preset."""
    preset: str = "tiny"
    """Built-in architecture (random init) used when ``path`` is None: a key of ``model.PRESETS``."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Extra HF config fields for the preset (e.g. ``num_hidden_layers``)."""
    tokenizer: str | None = None
    """Tokenizer directory; None -> ``path`` if set, else the built-in byte-level tokenizer ("byte")."""
    attn_implementation: AttnImplementation = "magi"
    """"magi" (flexcp, any mask, any cp) or HF's "sdpa" / "flex_attention" / "eager" (cp = 1, causal or packed data)."""
    activation_checkpointing: bool = False
    compile: Literal["off", "inductor", "aot_eager"] = "off"
    """``torch.compile`` the model's forward with this backend ("off": eager). flexcp's attention is a custom
    op, so a compiled step is one graph per forward and a new batch's mask does not recompile."""
    offload_activations: bool = False
    """Keep the tensors the forward saves for backward in pinned host memory (``flexcp.hf.ActivationOffload``).

    With ``activation_checkpointing`` these are each layer's input (plus the final norm's and the loss's
    inputs): GPU memory per token drops by those, host memory grows by as much (one page-locked arena of
    exactly a step's bytes); the copies run on a side stream, overlapped with compute, and backward
    prefetches the next layer's input."""
    tiled_mlp: Annotated[int, NON_NEGATIVE] = 8192
    """Run each decoder layer's MLP over this many tokens at a time, forward and backward (0: off).

    Same results as the untiled MLP; its ``intermediate_size``-wide activations then exist for one
    chunk instead of the whole sequence (for Llama-3.2-1B shapes about 96 KiB per token, the largest
    part of a long sequence's backward working set), for one more MLP forward per step. On by default:
    a call runs untiled when it has at most this many tokens or when its intermediates easily fit the
    GPU's free memory (``flexcp.hf.tiled_mlp.fits_untiled``), so it costs time only where memory is short."""
    lora: LoraConfig = field(default_factory=LoraConfig)

    def tokenizer_or_default(self) -> str:
        """``tokenizer``, else what None means: the checkpoint's (``path``) or the byte tokenizer."""
        if self.tokenizer is not None:
            return self.tokenizer
        return "byte" if self.path is None else self.path


@dataclass
class RecallConfig(Section):
    num_pairs: Annotated[int, POSITIVE] = 1
    """Key/value pairs per sequence, all in its second quarter; each is queried once at the end."""
    num_values: Annotated[int, POSITIVE] = 16
    """Size of the value alphabet (chance accuracy = 1 / num_values)."""
    filler: Filler = "repeat"
    """Haystack around pairs and queries: "repeat" (one token, passkey-style) or "random" (letters; harder)."""


@dataclass
class DataConfig(Section):
    kind: str = "recall"
    """A key of ``data.DATA_KINDS``: "recall" (synthetic long-range recall), "jsonl" (text / chat, packed), "rollouts" (prefix trees)."""
    path: str | None = None
    """JSONL file for the kinds that read one ("jsonl" and "rollouts")."""
    seq_len: Annotated[int, POSITIVE] = 2048
    """Tokens per packed sequence (one sequence per micro-batch, sharded over the CP group)."""
    shuffle: bool = True
    recall: RecallConfig = field(default_factory=RecallConfig)


@dataclass
class ParallelConfig(Section):
    cp: Annotated[int, POSITIVE] = 1
    """Context-parallel group size: every sequence is sharded over ``cp`` ranks."""
    dp: Annotated[int, NON_NEGATIVE] = 0
    """Data-parallel size; 0 -> world_size // cp. FSDP2 shards over all dp x cp ranks."""
    chunk_size: Annotated[int, POSITIVE] = DEFAULT_CHUNK_SIZE
    """Dispatch chunk (tokens); with cp > 1 the sequence length must be a multiple of cp * chunk_size."""
    timeout_minutes: Annotated[float, POSITIVE] = 10.0
    """Process-group timeout: a collective waiting longer (a rank stalled or skipped a step) raises instead of hanging."""

    def dp_for(self, world_size: int) -> int:
        """``dp``, else what 0 means on ``world_size`` ranks: ``world_size // cp``."""
        return self.dp or world_size // self.cp


@dataclass
class TrainConfig(Section):
    steps: Annotated[int, POSITIVE] = 100
    grad_accum: Annotated[int, POSITIVE] = 1
    """Micro-batches (sequences) per dp rank per optimizer step."""
    lr: Annotated[float, POSITIVE] = 3e-4
    min_lr_ratio: Annotated[float, Bound(ge=0, le=1)] = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: Annotated[int, NON_NEGATIVE] = 10
    weight_decay: Annotated[float, NON_NEGATIVE] = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: Annotated[float, POSITIVE] = 1e-8
    max_grad_norm: Annotated[float, NON_NEGATIVE] = 1.0
    """Clip the global gradient norm to this (0 disables clipping)."""
    dtype: Dtype = "auto"
    """"bf16" (FSDP2 mixed precision: bf16 compute, fp32 weights and reductions), "fp32", "auto" (bf16 on GPU)."""
    seed: int = 0
    loss_chunk_tokens: Annotated[int, POSITIVE] = 8192
    """The LM head and cross-entropy run over this many tokens at a time (full logits are never stored)."""

    def rules(self, where: str) -> Iterator[str]:
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            yield f"{where}.betas must be two numbers in [0, 1); got {self.betas}"


@dataclass
class CheckpointConfig(Section):
    every: Annotated[int, NON_NEGATIVE] = 0
    """Save a resumable checkpoint every N steps (0: only at the end)."""
    resume: bool = True
    """Resume from the latest checkpoint under out_dir/checkpoints when there is one (refused when the
    config differs in what the run computes: model, data, cp, optimizer; see ``allow_config_change``)."""
    allow_config_change: bool = False
    """Resume even when the config differs from the saved run's in settings that change the run."""
    overwrite: bool = False
    """With ``resume=false``: delete a previous run's outputs in out_dir (checkpoints, metrics, tb, hf, config)
    and start over; without it a run refuses to start beside another run's checkpoints."""
    keep: Annotated[int, POSITIVE] = 2
    """How many step checkpoints to keep (older ones are deleted)."""
    export_hf: bool = True
    """Write the final model as an HF safetensors directory (out_dir/hf) loadable by from_pretrained."""


@dataclass
class LoggingConfig(Section):
    log_every: Annotated[int, POSITIVE] = 10
    """Print a console line every N steps (this step's loss and the mean since the last line); metrics.jsonl records every step."""
    progress: Progress = "auto"
    """"auto" (tqdm, else rich, else plain lines), "tqdm", "rich", "plain" or "none"."""
    tensorboard: bool = True
    """Also write TensorBoard events (out_dir/tb) when tensorboard is installed."""
    wandb: bool = False
    """Also log to Weights & Biases (needs the wandb package; WANDB_MODE=offline works without network)."""
    wandb_project: str | None = None
    """W&B project; None -> $WANDB_PROJECT, else "flexcp". The run is named after out_dir."""


@dataclass
class EvalConfig(Section):
    path: str | None = None
    """Held-out JSONL in data.path's format; None with synthetic data (data.kind='recall'): held-out synthetic sequences."""
    every: Annotated[int, NON_NEGATIVE] = 0
    """Evaluate every N optimizer steps and after the last one (0: never)."""
    steps: Annotated[int, POSITIVE] = 16
    """Sequences per evaluation (split over the dp ranks)."""


@dataclass
class FinetuneConfig(Section):
    out_dir: str = "runs/flexcp"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
