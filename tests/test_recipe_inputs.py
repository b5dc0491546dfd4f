"""The recipe's inputs: bad data lines and config values get an error naming file:line or key and the fix."""

from __future__ import annotations

import json

import pytest

from flexcp.cli import main as flexcp_main
from flexcp.train.config import ConfigError, load_config, validate
from flexcp.train.data import JsonlSource, RolloutSource
from flexcp.train.tokenizer import ByteTokenizer


def _source(tmp_path, lines, cls=JsonlSource, raw: bytes | None = None):
    path = tmp_path / "d.jsonl"
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return cls(str(path), ByteTokenizer(), 64, 0, False), str(path)


@pytest.mark.parametrize("lines, match", [
    ([{"text": "ok"}, {"text": None}], r"d.jsonl:2: 'text' must be a string; got null"),
    ([{"text": 5}], r"d.jsonl:1: 'text' must be a string; got 5"),
    ([{"messages": "hello"}], r"d.jsonl:1: 'messages' must be a list .* got str 'hello'"),
    ([{"messages": [{"role": "user", "content": None}]}], r"d.jsonl:1: messages\[0\]: 'role' and 'content' must be strings"),
])
def test_bad_records_name_file_and_line(tmp_path, lines, match):
    with pytest.raises(ValueError, match=match):
        _source(tmp_path, lines)


def test_empty_file_names_the_path(tmp_path):
    with pytest.raises(ValueError, match=r"d.jsonl holds no records"):
        _source(tmp_path, ["", "  "])


def test_latin1_byte_names_line_and_fix(tmp_path):
    raw = json.dumps({"text": "fine"}).encode() + b"\n" + b'{"text": "caf\xe9"}\n'
    with pytest.raises(ValueError, match=r"d.jsonl:2 is not UTF-8 \(byte 0xe9 .*iconv -f latin1 -t utf-8"):
        _source(tmp_path, [], raw=raw)


def test_chat_without_assistant_turn_is_skipped_loudly(tmp_path):
    user_only = {"messages": [{"role": "user", "content": "hi"}]}
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    with pytest.warns(RuntimeWarning, match=r"skipped 1 chat record\(s\) without an assistant turn .* line\(s\) 2"):
        src, _ = _source(tmp_path, [chat, user_only])
    assert len(src.docs) == 1 and src.get(0).num_label_tokens > 0
    with pytest.raises(ValueError, match=r"no record has an assistant turn .*lines 1, 2"):
        _source(tmp_path, [user_only, user_only])


def test_rollout_fields_must_be_strings(tmp_path):
    with pytest.raises(ValueError, match=r"d.jsonl:1: 'prompt' must be a string"):
        _source(tmp_path, [{"prompt": None, "completions": ["a"]}], RolloutSource)
    with pytest.raises(ValueError, match=r"d.jsonl:1: completions\[1\] must be a string"):
        _source(tmp_path, [{"prompt": "p", "completions": ["a", 3]}], RolloutSource)
    with pytest.raises(ValueError, match=r"d.jsonl:1: 'messages' must be a list"):
        _source(tmp_path, [{"messages": "p", "completions": ["a"]}], RolloutSource)


@pytest.mark.parametrize("overrides, message", [
    (["train.eps=-1"], "train.eps must be > 0"),
    (["data.recall.num_pairs=40", "data.seq_len=4096"], "data.recall.num_pairs must be <= 26"),
    (["model.overrides.num_hidden_layer=3"], "model.overrides.num_hidden_layer is not a LlamaConfig field (it would be ignored); "
                                             "did you mean 'num_hidden_layers'?"),
    (["parallel.timeout_minutes=0"], "parallel.timeout_minutes must be > 0"),
])
def test_config_errors_caught_up_front(overrides, message):
    with pytest.raises(ConfigError) as exc:
        validate(load_config(None, overrides), 1)
    assert message in str(exc.value)


def test_check_flag_reports_them(capsys):
    with pytest.raises(SystemExit) as exc:
        flexcp_main(["finetune", "--check", "train.eps=-1"])
    assert exc.value.code == 2 and "train.eps must be > 0" in capsys.readouterr().err


def test_overrides_with_a_model_path_are_rejected(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="apply only to the built-in preset"):
        validate(load_config(None, [f"model.path={tmp_path}", "model.tokenizer=byte",
                                    "model.overrides.num_hidden_layers=2"]), 1)


def test_legacy_llama_keys_are_accepted():
    cfg = validate(load_config(None, ["model.overrides.rope_theta=50000", "model.overrides.num_hidden_layers=2"]), 1)
    assert cfg.model.overrides["rope_theta"] == 50000


def test_every_bad_data_line_is_reported_before_the_run_starts(tmp_path, capsys):
    """Invalid JSON and a wrong field type in one file: each bad line on its own line, rc 2, nothing started."""
    good = json.dumps({"text": "ok"})
    lines = [good, good, '{"text": "broken', good, json.dumps({"text": None}), "[1, 2]"]
    lines += [json.dumps({"text": 7})] * 22  # more bad lines than are listed one by one
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit) as exc:  # the real launch, not --check: the data is checked first
        flexcp_main(["finetune", "data.kind=jsonl", f"data.path={data}", f"out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and not (tmp_path / "run").exists()
    listed = [line.strip() for line in err.splitlines() if line.strip().startswith(f"- {data}")]
    assert listed[0] == f"- {data}:3 is not valid JSON (Unterminated string starting at, column 10); write one JSON object per line"
    assert listed[1].startswith(f"- {data}:5: 'text' must be a string; got null") and "drop the line" in listed[1]
    assert listed[2].startswith(f"- {data}:6: must be a JSON object")
    assert [line.split(":")[1] for line in listed[3:20]] == [str(n) for n in range(7, 24)]  # 20 lines listed
    assert listed[20] == f"- {data}: 5 more bad lines (25 in all); fix the lines above and run again with --check to list the rest"
    assert len(listed) == 21
