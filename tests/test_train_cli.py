"""The recipe's command line: --check for the intended world, thread default, help, exit codes, samples, tokenizer."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import resources

import pytest

from flexcp.cli import main as flexcp_main
from flexcp.train import sample_data
from flexcp.train.config import ConfigError, load_config, validate

CONFIGS = resources.files("flexcp.train") / "configs"
SAMPLES = {"jsonl": "sft_chat.jsonl", "rollouts": "rollouts.jsonl"}


def _shipped() -> list[str]:
    return sorted(p.name for p in CONFIGS.iterdir() if p.name.endswith(".yaml"))


def _data_override(name: str) -> list[str]:
    kind = load_config(str(CONFIGS / name)).data.kind
    return [f"data.path={os.path.join(sample_data.SAMPLES_DIR, SAMPLES[kind])}"] if kind in SAMPLES else []


@pytest.mark.parametrize("name", _shipped())
def test_check_validates_every_shipped_config_without_launching(name, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert flexcp_main(["finetune", "--config", str(CONFIGS / name), "--check", *_data_override(name)]) == 0
    out = capsys.readouterr().out
    cfg = load_config(str(CONFIGS / name))
    world = cfg.parallel.cp  # default: the smallest world the config fits
    assert out.startswith(f"# valid for a world of {world}: dp=1 x cp={cfg.parallel.cp}\n")
    assert out.count("out_dir:") == 1
    # the intended launch, e.g. 8 processes
    assert flexcp_main(["finetune", "--config", str(CONFIGS / name), "--check", "--nproc-per-node", str(2 * world),
                        *_data_override(name)]) == 0
    assert f"dp=2 x cp={cfg.parallel.cp}" in capsys.readouterr().out


def test_check_reports_all_problems_once_and_only_on_rank_0(capsys, monkeypatch):
    cfg = str(CONFIGS / "sft_jsonl.yaml")
    with pytest.raises(SystemExit) as info:
        flexcp_main(["finetune", "--config", cfg, "--check", "--nproc-per-node", "3"])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert "2 problems" in err and "world size 3 does not factor" in err and "set data.path" in err
    assert err.count("config error") == 1
    monkeypatch.setenv("RANK", "1")  # another rank under torchrun: same exit status, silent
    with pytest.raises(SystemExit) as info:
        flexcp_main(["finetune", "--config", cfg, "--check", "--nproc-per-node", "3"])
    assert info.value.code == 2 and capsys.readouterr().err == ""
    assert flexcp_main(["finetune", "--check", "--nproc-per-node", "2", "parallel.cp=2", "data.seq_len=1024"]) == 0
    assert capsys.readouterr().out == ""


def test_validate_collects_independent_errors():
    with pytest.raises(ConfigError) as info:
        validate(load_config(None, ["model.preset=huge", "data.kind=jsonl", "parallel.cp=3"]), 2)
    text = str(info.value)
    assert "3 problems" in text and "model.preset='huge'" in text and "set data.path" in text and "world size 2" in text


def test_nproc_per_node_needs_check(capsys):
    with pytest.raises(SystemExit) as info:
        flexcp_main(["finetune", "--nproc-per-node", "2"])
    assert info.value.code == 2 and "only apply to --check" in capsys.readouterr().err


def test_bare_flexcp_prints_help_and_exits_2(capsys):
    assert flexcp_main([]) == 2
    assert "usage: flexcp" in capsys.readouterr().err
    assert flexcp_main(["bench"]) == 2


def test_finetune_help_is_plain_text(capsys):
    with pytest.raises(SystemExit) as info:
        flexcp_main(["finetune", "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "--nproc-per-node" in out
    assert "``" not in out and "::" not in out  # no reStructuredText markup


@pytest.mark.parametrize("omp, want", [(None, 1), ("2", 2)])
def test_plain_finetune_defaults_to_one_thread_like_torchrun(omp, want):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if omp:
        env["OMP_NUM_THREADS"] = omp
    code = "import torch; from flexcp.train.cli import default_threads; default_threads(); print(torch.get_num_threads())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert int(out) == want


def test_sample_data_is_what_the_script_generates():
    for name in sample_data.FILES:
        path = os.path.join(sample_data.SAMPLES_DIR, name)
        with open(path) as f:
            assert f.read() == sample_data.render(name), f"{path}: rerun python -m flexcp.train.sample_data"
        assert os.path.getsize(path) < 300_000


def test_sample_data_loads_in_the_recipe():
    from flexcp.train.data import JsonlSource, RolloutSource
    from flexcp.train.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    chat = JsonlSource(os.path.join(sample_data.SAMPLES_DIR, "sft_chat.jsonl"), tok, 1024, 0, True)
    rollouts = RolloutSource(os.path.join(sample_data.SAMPLES_DIR, "rollouts.jsonl"), tok, 1024, 0, True)
    for src in (chat, rollouts):
        seq = src.get(0)
        assert 0 < seq.num_label_tokens < seq.input_ids.numel()


def test_byte_tokenizer_exports_in_hf_format(tmp_path):
    from transformers import AutoTokenizer

    from flexcp.train.tokenizer import ByteTokenizer, load_tokenizer

    ours = ByteTokenizer()
    ours.save(str(tmp_path))
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "héllo, wörld\n\t日本 </x> 42"
    assert hf.encode(text, add_special_tokens=False) == ours.encode(text)
    assert hf.decode(ours.encode(text)) == text
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id, len(hf)) == (
        ours.pad_id, ours.bos_id, ours.eos_id, ours.vocab_size)
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2 + 2?"},
            {"role": "assistant", "content": "4"}]
    for messages, gen in ((chat, False), (chat[:2], True)):
        rendered = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
        rendered = rendered["input_ids"] if hasattr(rendered, "keys") else rendered
        assert list(rendered) == ours.render_chat(messages, add_generation_prompt=gen)
    assert isinstance(load_tokenizer(str(tmp_path)), ByteTokenizer)  # flexcp reads it back as its own
