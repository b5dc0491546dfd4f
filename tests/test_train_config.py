"""The recipe's config: YAML + overrides, and up-front validation with errors that name the fix."""

from __future__ import annotations

import pytest

from flexcp.cli import main as flexcp_main
from flexcp.train.config import ConfigError, FinetuneConfig, from_dict, load_config, validate


def _check(overrides: list[str], world: int = 2) -> FinetuneConfig:
    return validate(load_config(None, overrides), world)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1.0e-3\n  steps: 7\nparallel: {cp: 2, chunk_size: 64}\ndata: {seq_len: 512}\n")
    cfg = load_config(str(path), ["train.lr=3e-4", "train.betas=[0.8, 0.9]", "model.overrides.num_hidden_layers=3"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)  # '3e-4' is a YAML string
    assert cfg.train.steps == 7 and cfg.train.betas == [0.8, 0.9]
    assert cfg.model.overrides == {"num_hidden_layers": 3}
    validate(cfg, 4)
    assert cfg.parallel.dp == 2 and cfg.model.tokenizer == "byte"


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["train.lrr=1"], 1, "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
        (["trian.lr=1"], 1, "unknown key 'trian'"),
        (["train.steps=ten"], 1, "train.steps must be int"),
        (["train.steps=1.5"], 1, "train.steps must be int"),
        (["train.lr=0"], 1, "train.lr must be > 0"),
        (["train"], 1, "must look like key=value"),
        (["parallel.cp=3", "data.seq_len=1536"], 4, "world size 4 does not factor into dp x cp"),
        (["parallel.cp=2", "parallel.dp=3"], 4, "set parallel.dp=2"),
        (["parallel.cp=2", "data.seq_len=1000"], 2, "use data.seq_len=1024"),
        (["parallel.cp=4", "parallel.chunk_size=512", "data.seq_len=1024"], 4,
         "multiple of parallel.cp x parallel.chunk_size"),
        (["parallel.cp=2", "model.attn_implementation=sdpa"], 2, "needs model.attn_implementation='magi'"),
        (["model.attn_implementation=flash"], 1, "model.attn_implementation='flash' is not one of"),
        (["model.path=/nonexistent/ckpt"], 1, "is not a Hugging Face checkpoint directory"),
        (["model.preset=huge"], 1, "model.preset='huge' is not one of"),
        (["model.tokenizer=/tmp"], 1, "holds no tokenizer"),
        (["data.kind=jsonl"], 1, "set data.path"),
        (["data.kind=jsonl", "data.path=/nonexistent.jsonl"], 1, "no such file"),
        (["data.kind=rollouts", "data.path=/dev/null", "model.attn_implementation=sdpa"], 1, "prefix-tree mask"),
        (["data.seq_len=64", "data.recall.num_pairs=4"], 1, "use data.seq_len >= 84"),
    ],
)
def test_bad_configs_fail_clearly(overrides, world, message):
    with pytest.raises(ConfigError, match=None) as info:
        _check(overrides, world)
    assert message in str(info.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="no such file"):
        load_config("/nonexistent/cfg.yaml")


def test_section_must_be_mapping():
    with pytest.raises(ConfigError, match="train must be a mapping"):
        from_dict({"train": 3})


def test_cli_reports_config_errors(capsys):
    with pytest.raises(SystemExit) as info:
        flexcp_main(["finetune", "train.lrr=1"])
    assert info.value.code == 2
    assert "config error: unknown key 'train.lrr'" in capsys.readouterr().err


def test_cli_check_prints_resolved_config(capsys):
    assert flexcp_main(["finetune", "--check", "train.steps=3"]) == 0
    out = capsys.readouterr().out
    assert "steps: 3" in out and "tokenizer: byte" in out and "dp: 1" in out
