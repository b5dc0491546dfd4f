"""The recipe's config: load it (YAML plus ``key=value`` overrides into :mod:`.schema`) and validate it for a run.

:func:`validate` checks everything up front (unknown keys and types when loading; then
every section's values, the dp x cp factorization of the world, sequence length vs the CP
group, the model, the data kind's own checks, missing files and packages), so a bad config
fails before any process group, model or data is built. Checking writes nothing;
:func:`resolve` is the one place that fills the derived values (``parallel.dp``,
``model.tokenizer``), and nothing in the recipe writes the config after it.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import types
import typing
from typing import Any, Iterator

import yaml

from .data import DATA_KINDS
from .model import model_problems
from .schema import (  # noqa: F401  (the config's names, importable from here)
    CheckpointConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    FinetuneConfig,
    LoggingConfig,
    LoraConfig,
    ModelConfig,
    ParallelConfig,
    RecallConfig,
    TrainConfig,
)


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
    """``value`` as type ``tp`` (hints without ``Annotated``); choices and bounds are :func:`check`'s."""
    if typing.get_origin(tp) is typing.Literal:
        tp = type(typing.get_args(tp)[0])
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
    """Check ``cfg`` for a run on ``world_size`` ranks, then :func:`resolve` it; returns ``cfg``.

    Every problem is reported at once (one ConfigError listing them all), not one per run.
    """
    problems = check(cfg, world_size)
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems))
    return resolve(cfg, world_size)


def check(cfg: FinetuneConfig, world_size: int) -> list[str]:
    """Every problem of ``cfg`` for ``world_size`` ranks (reads ``cfg``, writes nothing).

    Each section's own values first; the checks across sections, files and packages run
    only when those are sane (they assume them).
    """
    problems = cfg.problems()
    if cfg.data.kind not in DATA_KINDS:
        problems.append(f"data.kind={cfg.data.kind!r} is not one of {', '.join(map(repr, DATA_KINDS))}")
    if problems:
        return problems
    return [*_parallel_problems(cfg, world_size), *model_problems(cfg.model),
            *DATA_KINDS[cfg.data.kind].problems(cfg), *_package_problems(cfg)]


def resolve(cfg: FinetuneConfig, world_size: int) -> FinetuneConfig:
    """Fill the derived values of a checked ``cfg`` in place (``parallel.dp``, ``model.tokenizer``); returns it."""
    cfg.parallel.dp = cfg.parallel.dp_for(world_size)
    cfg.model.tokenizer = cfg.model.tokenizer_or_default()
    return cfg


def _parallel_problems(cfg: FinetuneConfig, world_size: int) -> Iterator[str]:
    """The dp x cp layout against the world and the sequence: the first problem only (each assumes the last)."""
    p = cfg.parallel
    if world_size % p.cp:
        yield (f"world size {world_size} does not factor into dp x cp with parallel.cp={p.cp}; launch a multiple "
               f"of {p.cp} processes (torchrun --nproc_per_node ...) or set parallel.cp to a divisor of {world_size}")
        return
    dp = p.dp_for(world_size)
    if dp * p.cp != world_size:
        yield (f"parallel.dp={p.dp} x parallel.cp={p.cp} = {dp * p.cp} ranks, but the world has {world_size}; "
               f"set parallel.dp={world_size // p.cp} (or 0 to derive it)")
        return
    unit = p.cp * p.chunk_size
    if p.cp > 1 and cfg.data.seq_len % unit:
        up = -(-cfg.data.seq_len // unit) * unit
        yield (f"data.seq_len={cfg.data.seq_len} is not a multiple of parallel.cp x parallel.chunk_size = "
               f"{p.cp} x {p.chunk_size} = {unit} (every CP rank holds the same number of whole chunks); "
               f"use data.seq_len={up} or a parallel.chunk_size that divides {cfg.data.seq_len // p.cp}")
        return
    if p.cp > 1 and cfg.model.attn_implementation != "magi":
        yield (f"parallel.cp={p.cp} needs model.attn_implementation='magi' (HF {cfg.model.attn_implementation!r} "
               "attention cannot see keys on other ranks)")


def _package_problems(cfg: FinetuneConfig) -> Iterator[str]:
    """Optional packages the chosen features need."""
    if cfg.model.lora.r and importlib.util.find_spec("peft") is None:
        yield "model.lora.r > 0 needs the peft package: pip install 'flexcp[lora]' (or model.lora.r=0)"
    if cfg.logging.wandb and importlib.util.find_spec("wandb") is None:
        yield "logging.wandb=true needs the wandb package: pip install wandb (or logging.wandb=false)"
