"""What a run records: every logged step (the last one always), eval, sinks (TensorBoard, W&B), reruns."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import types

import numpy as np
import torch

from multiproc import run_spawned

from flexcp.train.metrics import MetricsLogger, StepMetrics, fmt_number


def _step(n: int) -> StepMetrics:
    return StepMetrics(step=n, loss=1.0 / n, acc=0.5, lr=1e-3, grad_norm=1.0, tokens=1000, label_tokens=10,
                       flops=1e9, seconds=0.5)


class _Sink:
    def __init__(self) -> None:
        self.logged: list[tuple[int, dict]] = []
        self.closed = False

    def log(self, values: dict, step: int) -> None:
        self.logged.append((step, values))

    def close(self) -> None:
        self.closed = True


def _records(out_dir) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


def test_last_step_is_always_logged(tmp_path, capsys):
    sink = _Sink()
    log = MetricsLogger(str(tmp_path), 5, 0, 10, "none", True, torch.device("cpu"), 1, [sink])
    for n in range(1, 6):
        log.log(_step(n))
    log.close()
    records = _records(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]  # one record per step, whatever log_every is
    assert [r["loss"] for r in records] == [1.0, 0.5, 1 / 3, 0.25, 0.2]  # each step's own loss
    assert [s for s, _ in sink.logged] == [1, 2, 3, 4, 5] and sink.closed
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("step")]
    assert len(lines) == 2 and lines[0].startswith("step      1 | loss 1.0000 | acc 0.500 | lr")  # first step: no mean
    assert lines[1].startswith("step      5 | loss 0.2000 | acc 0.500 | loss_avg4 0.3208 | acc_avg4 0.500 | lr")
    summary = out[out.index("summary:"):]
    assert "loss                     0.2\n" in summary and "loss_avg5                0.4567" in summary  # last 5 steps


def test_stopping_early_records_the_last_step(tmp_path):
    log = MetricsLogger(str(tmp_path), 100, 0, 10, "none", True, torch.device("cpu"), 1)
    for n in range(1, 4):
        log.log(_step(n))
    log.close()
    assert [r["step"] for r in _records(tmp_path)] == [1, 2, 3]


def test_summary_of_no_steps_has_no_nan(tmp_path, capsys):
    s = MetricsLogger(str(tmp_path), 5, 5, 10, "none", True, torch.device("cpu"), 1).close()
    assert s == {"steps": 0, "final_step": 5}
    assert "nan" not in capsys.readouterr().out


def test_one_number_format():
    assert [fmt_number(v) for v in (10210.4, 5106, 0.01234567, 3.0, 2e-5, "x")] == [
        "10,210", "5,106", "0.01235", "3", "2e-05", "x"]


def test_finished_progress_bar_is_drawn_once(tmp_path, capsys):
    log = MetricsLogger(str(tmp_path), 3, 0, 1, "tqdm", True, torch.device("cpu"), 1)
    for n in range(1, 4):
        log.log(_step(n))
    log.write("after the bar")
    log.close()
    err = capsys.readouterr().err
    assert err.count("3/3") == 1, err


def test_wandb_sink_with_a_stand_in_module(tmp_path, monkeypatch):
    calls: dict = {"log": []}

    class Run:
        def log(self, values, step):
            calls["log"].append((step, values))

        def finish(self):
            calls["finished"] = True

    def init(**kwargs):
        calls["init"] = kwargs
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    from flexcp.train.loggers import WANDB_ID_FILE, build_sinks

    out_dir = tmp_path / "my-run"
    out_dir.mkdir()
    sinks = build_sinks(str(out_dir), False, True, None, {"train": {"lr": 1.0}})
    log = MetricsLogger(str(out_dir), 2, 0, 1, "none", True, torch.device("cpu"), 1, sinks)
    log.log(_step(1))
    log.log_eval(1, 0.5, 0.25, 4)
    log.close()
    init = calls["init"]
    assert init["project"] == "flexcp" and init["name"] == "my-run" and init["config"] == {"train": {"lr": 1.0}}
    assert init["id"] == (out_dir / WANDB_ID_FILE).read_text() and init["resume"] == "allow"
    assert [s for s, _ in calls["log"]] == [1, 1] and calls["log"][1][1] == {"eval/loss": 0.5, "eval/acc": 0.25}
    assert calls["finished"]
    again = build_sinks(str(out_dir), False, True, "proj", {})  # a resumed run continues the same W&B run
    assert calls["init"]["id"] == init["id"] and calls["init"]["project"] == "proj"
    again[0].close()


def test_wandb_is_off_by_default_and_never_required():
    from flexcp.train.config import ConfigError, load_config, validate

    cfg = validate(load_config(None, []), 1)
    assert cfg.logging.wandb is False
    try:
        import wandb  # noqa: F401
    except ImportError:
        try:
            validate(load_config(None, ["logging.wandb=true"]), 1)
        except ConfigError as exc:
            assert "pip install wandb" in str(exc)
        else:
            raise AssertionError("logging.wandb=true without wandb installed must be a config error")


def _cfg(out_dir: str, cp: int, **sections) -> dict:
    cfg = {
        "out_dir": out_dir,
        "model": {"preset": "tiny"},
        "data": {"kind": "recall", "seq_len": 256},
        "parallel": {"cp": cp, "chunk_size": 32},
        "train": {"steps": 4, "grad_accum": 2, "lr": 3e-3, "warmup_steps": 0, "loss_chunk_tokens": 64},
        "checkpoint": {"resume": True},
        "logging": {"progress": "none", "log_every": 3},
        "eval": {"every": 3, "steps": 4},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


def _fit_twice(rank: int, world: int, cfg: dict) -> dict:
    from flexcp.train.config import from_dict
    from flexcp.train.loop import Trainer

    first = Trainer(from_dict(cfg))
    summary = first.fit()
    direct = first.evaluate(cfg["eval"]["steps"])  # what the logged final eval must be
    hf = os.path.join(cfg["out_dir"], "hf", "model.safetensors")
    exported = os.stat(hf).st_mtime_ns
    second = Trainer(from_dict(cfg))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rerun = second.fit()
    return {"summary": summary, "direct": direct, "rerun": rerun, "rerun_out": printed.getvalue(),
            "hf_mtimes": (exported, os.stat(hf).st_mtime_ns)}


def test_eval_is_logged_and_a_finished_run_is_left_alone(tmp_path):
    out = str(tmp_path / "run")
    got = run_spawned(_fit_twice, 2, _cfg(out, cp=2), timeout=300)[0]
    records = _records(out)
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 4]  # eval.every=3 and after the last step
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    np.testing.assert_allclose([evals[-1]["eval_loss"], evals[-1]["eval_acc"]], got["direct"], rtol=1e-12)
    assert got["summary"]["eval_loss"] == evals[-1]["eval_loss"]
    assert 0 < evals[-1]["eval_loss"] < 20 and 0 <= evals[-1]["eval_acc"] <= 1
    rerun = got["rerun"]
    assert rerun["finished"] and rerun["final_step"] == 4 and "tokens_per_s" not in rerun
    assert _records(out) == records  # nothing appended
    before, after = got["hf_mtimes"]
    assert before == after  # hf/ not rewritten
    assert "is already finished" in got["rerun_out"] and "summary" not in got["rerun_out"]

    from transformers import AutoModelForCausalLM, AutoTokenizer  # the export loads with plain transformers

    model = AutoModelForCausalLM.from_pretrained(os.path.join(out, "hf"))
    tok = AutoTokenizer.from_pretrained(os.path.join(out, "hf"))
    ids = torch.tensor([tok.encode("K 7 ? K")])
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tok))


def test_eval_on_held_out_jsonl(tmp_path):
    from flexcp.train import sample_data

    data = {"kind": "jsonl", "path": os.path.join(sample_data.SAMPLES_DIR, "sft_chat.jsonl"), "seq_len": 256}
    ev = {"path": os.path.join(sample_data.SAMPLES_DIR, "sft_chat_eval.jsonl"), "every": 2, "steps": 2}
    cfg = _cfg(str(tmp_path / "jsonl"), cp=1, data=data, eval=ev, train={"steps": 2})
    run_spawned(_fit_twice, 1, cfg, timeout=300)
    (record,) = [r for r in _records(tmp_path / "jsonl") if "eval_loss" in r]
    assert record["step"] == 2 and record["eval_sequences"] == 2 and np.isfinite(record["eval_loss"])


def test_tensorboard_on_without_tensorboard_installed_gives_a_notice(monkeypatch):
    import importlib.util

    from flexcp.train import loggers

    real = importlib.util.find_spec
    monkeypatch.setattr(loggers.importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    notice = loggers.missing_sink_notice(True)
    assert "TensorBoard is not installed" in notice and "pip install tensorboard" in notice
    assert "logging.tensorboard=false" in notice
    assert loggers.missing_sink_notice(False) is None
    assert loggers.build_sinks("unused", True, False, None, {}) == []  # nothing written to tb/
