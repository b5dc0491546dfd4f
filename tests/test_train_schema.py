"""The config schema: typed fields check themselves, checking writes nothing, data kinds own their checks."""

from __future__ import annotations

import copy
import dataclasses
import typing

import pytest

from flexcp.sharding.plan import DEFAULT_CHUNK_SIZE
from flexcp.train.config import check, load_config, resolve, validate
from flexcp.train.data import DATA_KINDS, RECALL_FILLER, FileKind
from flexcp.train.schema import Bound, Filler, FinetuneConfig, Section


def _fields(section: Section, where: str = ""):
    """``(dotted name, owning section, field name, type)`` of every leaf field."""
    hints = typing.get_type_hints(type(section), include_extras=True)
    for f in dataclasses.fields(section):
        value, name = getattr(section, f.name), f"{where}.{f.name}" if where else f.name
        if isinstance(value, Section):
            yield from _fields(value, name)
        else:
            yield name, section, f.name, hints[f.name]


def _bounded():
    for name, _, _, tp in _fields(FinetuneConfig()):
        for meta in getattr(tp, "__metadata__", ()):
            if isinstance(meta, Bound):
                yield name, meta


def _chosen():
    for name, _, _, tp in _fields(FinetuneConfig()):
        if typing.get_origin(tp) is typing.Literal:
            yield name, typing.get_args(tp)


def _set(cfg: FinetuneConfig, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    node = cfg
    for part in path:
        node = getattr(node, part)
    setattr(node, last, value)


def test_defaults_are_valid_and_checking_writes_nothing():
    cfg = FinetuneConfig()
    assert cfg.problems() == []
    before = copy.deepcopy(cfg)
    assert check(cfg, 4) == [] and cfg == before  # check is pure
    assert resolve(cfg, 4) is cfg and cfg.parallel.dp == 4 and cfg.model.tokenizer == "byte"
    assert validate(cfg, 4) is cfg and cfg.parallel.dp == 4  # idempotent


@pytest.mark.parametrize("name, bound", list(_bounded()), ids=lambda x: x if isinstance(x, str) else "")
def test_every_bounded_field_rejects_a_value_just_outside(name, bound):
    edge = bound.gt if bound.gt is not None else bound.ge
    outside = edge if bound.gt is not None else edge - 1
    cfg = FinetuneConfig()
    _set(cfg, name, outside)  # built in code, not parsed: the section check still sees it
    problems = cfg.problems()
    assert len(problems) == 1 and problems[0].startswith(f"{name} must be ") and f"got {outside}" in problems[0]
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        validate(load_config(None, [f"{name}={outside}"]), 1)


@pytest.mark.parametrize("name, allowed", list(_chosen()))
def test_every_choice_field_lists_its_choices(name, allowed):
    cfg = FinetuneConfig()
    _set(cfg, name, "nope")
    assert cfg.problems() == [f"{name}='nope' is not one of {', '.join(map(repr, allowed))}"]


def test_several_bad_values_are_reported_together():
    cfg = load_config(None, ["train.lr=0", "logging.progress=loud", "train.betas=[0.9]", "data.kind=parquet"])
    problems = check(cfg, 1)
    assert len(problems) == 4 and problems[-1] == "data.kind='parquet' is not one of 'recall', 'jsonl', 'rollouts'"
    with pytest.raises(ValueError, match="4 problems"):
        validate(cfg, 1)


def test_chunk_size_default_is_the_dispatch_default():
    assert FinetuneConfig().parallel.chunk_size == DEFAULT_CHUNK_SIZE


def test_recall_fillers_are_the_schema_choices():
    assert set(RECALL_FILLER) == set(typing.get_args(Filler))


def test_data_kinds_are_read_only_and_own_their_checks(tmp_path):
    with pytest.raises(TypeError):
        DATA_KINDS["x"] = DATA_KINDS["recall"]  # type: ignore[index]
    files = [k for k in DATA_KINDS.values() if isinstance(k, FileKind)]
    assert {k.name for k in files} == {"jsonl", "rollouts"}
    for kind in files:
        cfg = load_config(None, [f"data.kind={kind.name}"])
        assert any("set data.path" in p and kind.sample in p for p in kind.problems(cfg))
        good = {"jsonl": '{"text": "a"}', "rollouts": '{"prompt": "p", "completions": ["c"]}'}[kind.name]
        (tmp_path / kind.sample).write_text(good + "\n")  # the file's records pass: only the config problem is left
        cfg = load_config(None, [f"data.kind={kind.name}", f"data.path={tmp_path / kind.sample}", "eval.every=5"])
        assert [p for p in kind.problems(cfg)] == [f"eval.every=5 with data.kind={kind.name!r} needs held-out data: "
                                                   "set eval.path to a JSONL file in data.path's format (or eval.every=0)"]
    cfg = load_config(None, ["eval.path=x.jsonl"])
    assert list(DATA_KINDS["recall"].problems(cfg)) == [
        "eval.path is for data.kind 'jsonl' / 'rollouts'; the recall task evaluates on held-out synthetic sequences: "
        "leave eval.path unset"]


def test_a_bad_checkpoint_path_is_one_problem_not_two():
    problems = check(load_config(None, ["model.path=/nonexistent/ckpt"]), 1)
    assert len(problems) == 1 and "not a Hugging Face checkpoint directory" in problems[0]
    problems = check(load_config(None, ["model.path=/nonexistent/ckpt", "model.tokenizer=/nonexistent/tok"]), 1)
    assert len(problems) == 2 and "holds no tokenizer" in problems[1]
