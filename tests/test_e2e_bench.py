"""The end-to-end benchmark on CPU: workload builders, a tiny run of every CPU contender, the probe, the report.

The full benchmark needs a GPU (FlexAttention has no CPU backward; native CP runs CUDA
SDPA); here the same code runs the tiny presets for one or two steps, and the checks are
on what the numbers must satisfy whatever the speed: the same batch gives the same first
loss under every contender and layout, cp = 2 gives cp = 1's loss, the tables and the plot
are written.
"""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch

from flexcp.bench import e2e_workloads as wl
from flexcp.bench.e2e_memory import _predict, search
from flexcp.bench.e2e_report import format_probe, progress_line, speedups, write_outputs
from flexcp.train.data import IGNORE_INDEX
from multiproc import run_spawned

VOCAB = 300


# ------------------------------------------------------------------------------------ workloads


def test_packed_documents_fill_the_pack_with_corpus_lengths():
    seq = wl.packed_documents(4096, VOCAB, seed=3)
    assert seq.input_ids.numel() == 4096 and int(seq.input_ids.max()) < VOCAB
    starts = np.flatnonzero(seq.position_ids.numpy() == 0)
    lengths = np.diff(np.append(starts, 4096))
    assert lengths.max() <= 2048  # capped at half the pack
    assert seq.spec.area() == sum(n * (n + 1) // 2 for n in lengths.tolist())
    ends = starts[1:] - 1  # the last token of each document has no target
    assert (seq.labels[torch.as_tensor(ends)] == IGNORE_INDEX).all()
    assert seq.num_label_tokens == 4096 - len(lengths)
    cut = wl.packed_documents(4096, VOCAB, seed=3, max_doc_len=300)
    assert int(cut.position_ids.max()) == 299 and cut.num_label_tokens < seq.num_label_tokens
    with pytest.raises(ValueError, match="max_doc_len"):
        wl.packed_documents(64, VOCAB, max_doc_len=0)


def test_rollout_layouts_hold_the_same_targets():
    r = wl.rollouts(1024, VOCAB, seed=1, completions=5, prompt_frac=0.25)
    g = r.group
    assert len(g.completions) == 5 and len(g.prompt) == 256
    assert r.shared.input_ids.numel() == 1024 == g.num_tokens  # the tree fills the sequence exactly
    assert r.unshared.input_ids.numel() == sum(len(g.prompt) + len(c) for c in g.completions)
    assert r.shared.num_label_tokens == r.unshared.num_label_tokens == sum(len(c) for c in g.completions)

    def pairs(seq):  # (position, input token, target) of every supervised token
        keep = seq.labels != IGNORE_INDEX
        return sorted(zip(seq.position_ids[keep].tolist(), seq.input_ids[keep].tolist(), seq.labels[keep].tolist()))

    assert pairs(r.shared) == pairs(r.unshared)
    padded = wl.rollouts(1024, VOCAB, seed=1, completions=5, multiple_of=512).unshared
    assert padded.input_ids.numel() % 512 == 0 and padded.num_label_tokens == r.unshared.num_label_tokens
    with pytest.raises(ValueError, match="no room"):
        wl.rollouts(16, VOCAB, completions=8)


def test_attention_cells_per_contender():
    causal = wl.causal_sequence(1000, VOCAB)
    pack = wl.packed_documents(1000, VOCAB)
    full = 1000 * 1001 // 2
    assert wl.attention_cells("magi", causal) == causal.spec.area() == full
    dense = causal.spec.to_dense().numpy()
    i, j = np.indices(dense.shape)
    assert wl.windowed_area(causal, 100) == int((dense & (i - j < 100)).sum())
    assert wl.attention_cells("flex_attention", causal, 100) == wl.windowed_area(causal, 100)
    assert wl.attention_cells("sdpa", causal) == full  # is_causal
    assert wl.attention_cells("sdpa", causal, 100) == wl.attention_cells("sdpa", pack) == 1000 * 1000  # dense mask
    assert wl.attention_cells("native", pack) == full > pack.spec.area()
    with pytest.raises(ValueError, match="contender"):
        wl.attention_cells("eager", pack)


# ------------------------------------------------------------------------------- tiny runs


def _bench(rank: int, world: int, argv: list[str]) -> list[dict]:
    from flexcp.bench.e2e_bench import main

    main(argv)
    out = argv[argv.index("--out") + 1]
    return json.loads(open(f"{out}/e2e.json").read())["rows"] if rank == 0 else []


def _rows(rows, **match):
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def test_tiny_run_of_every_cpu_contender(tmp_path):
    argv = ["--cpu", "--tiny", "--sizes", "256", "--steps", "1", "--warmup", "1", "--chunk-size", "64",
            "--probe-start", "256", "512", "--out", str(tmp_path)]
    rows = run_spawned(_bench, 1, argv, timeout=600)[0]
    table = [r for r in rows if not r.get("probe")]
    assert {(r["workload"], r["contender"]) for r in table} == {
        ("packed", "magi"), ("rollouts", "magi"), ("rollouts", "magi-unshared"), ("causal", "magi"),
        ("packed", "sdpa"), ("causal", "sdpa"), ("sliding", "magi")}
    assert all("step_s" in r and r["tokens_per_s_per_gpu"] > 0 for r in table), table
    for w in ("packed", "causal"):  # same weights, same batch: the same first loss
        magi, sdpa = _rows(table, workload=w, contender="magi")[0], _rows(table, workload=w, contender="sdpa")[0]
        assert magi["loss"] == pytest.approx(sdpa["loss"], rel=1e-5)
    tree, flat = _rows(table, contender="magi", workload="rollouts")[0], _rows(table, contender="magi-unshared")[0]
    assert tree["loss"] == pytest.approx(flat["loss"], rel=1e-5)
    assert tree["label_tokens"] == flat["label_tokens"] and flat["tokens"] > 2 * tree["tokens"]
    sliding = _rows(table, workload="sliding")[0]
    assert sliding["window"] == 64 and sliding["useful_area"] < sliding["mask_area"]
    probe = [r for r in rows if r.get("probe")]
    assert [(r["offload"], r["seq_len"], r["fits"]) for r in probe] == [
        (False, 256, True), (False, 512, True), (True, 256, True), (True, 512, True)]
    assert probe[1]["loss"] == pytest.approx(probe[3]["loss"], rel=1e-6)  # offloading changes nothing computed
    md = (tmp_path / "e2e.md").read_text()
    assert "| packed | magi | 1 | 256 |" in md and "prefix tree saves" in md and "longest sequence that trains" in md
    assert (tmp_path / "e2e.png").stat().st_size > 1000


def test_tiny_cp2_matches_cp1(tmp_path):
    argv = ["--cpu", "--tiny", "--sizes", "256", "--steps", "1", "--warmup", "1", "--chunk-size", "64",
            "--cp", "1", "2", "--workloads", "packed", "rollouts", "--contenders", "magi", "magi-unshared",
            "--no-probe", "--out", str(tmp_path)]
    rows = run_spawned(_bench, 2, argv, timeout=600)[0]
    for w, c in (("packed", "magi"), ("rollouts", "magi"), ("rollouts", "magi-unshared")):
        one, two = _rows(rows, workload=w, contender=c, cp=1)[0], _rows(rows, workload=w, contender=c, cp=2)[0]
        assert (one["dp"], two["dp"]) == (2, 1)
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-5), (w, c)


# ------------------------------------------------------------------------------------- probe search


class _FakeMode:
    """Peak memory 10 + 0.001 GiB per token; a length fits while its peak stays under 100 GiB."""

    def __init__(self, offload: bool = False) -> None:
        self.offload, self.trainer, self.rows = offload, object(), []

    def log(self, row: dict) -> None:
        self.rows.append(row)

    def run(self, n: int) -> dict:
        peak = 10 + 0.001 * n
        row = {"seq_len": n, "fits": peak <= 100, "offload": self.offload}
        if row["fits"]:
            row.update(peak_gib=peak, step_s=n * 1e-6, host_saved_gib=0.0002 * n)
        self.log(row)
        return row


def _args(**kw):
    base = dict(probe_start=[10_000, 20_000], probe_granule=1000, probe_points=4, host_frac=0.5)
    return types.SimpleNamespace(**{**base, **kw})


def test_probe_brackets_the_memory_limit():
    mode = _FakeMode()
    search(mode, _args(), deadline=float("inf"), target_gib=99.5)  # the line predicts 89.5k; 90k is the limit
    assert [(r["seq_len"], r["fits"]) for r in mode.rows] == [
        (10_000, True), (20_000, True), (89_000, True), (90_000, True), (91_000, False)]
    high = _FakeMode()
    search(high, _args(probe_points=8), deadline=float("inf"), target_gib=150.0)  # predicts 140k: bisect down
    assert [(r["seq_len"], r["fits"]) for r in high.rows][2:] == [
        (140_000, False), (80_000, True), (110_000, False), (95_000, False), (87_000, True), (91_000, False),
        (90_000, True)]
    assert _predict([{"seq_len": 1, "peak_gib": 5.0}, {"seq_len": 2, "peak_gib": 5.0}], 9.0, 1) == 2


def test_probe_stops_at_the_host_memory_cap(monkeypatch):
    from flexcp.bench import e2e_memory

    monkeypatch.setattr(e2e_memory, "host_memory_gib", lambda field="MemTotal": 10.0)
    mode = _FakeMode(offload=True)
    search(mode, _args(), deadline=float("inf"), target_gib=95.0)  # host: 0.5 * 10 GiB / 0.0002 GiB = 25k tokens
    assert [(r["seq_len"], r.get("fits")) for r in mode.rows] == [
        (10_000, True), (20_000, True), (25_000, True), (26_000, None)]
    assert mode.rows[-1]["skipped"].startswith("host memory")


def test_probe_respects_the_time_budget():
    mode = _FakeMode()
    search(mode, _args(), deadline=0.0, target_gib=95.0)
    assert mode.rows == [{"probe": True, "offload": False, "seq_len": 10_000, "skipped": "time budget"}]


# ---------------------------------------------------------------------------------------- report


def _row(workload, contender, size, step_s, tokens, label_tokens, loss=1.0):
    return {"workload": workload, "contender": contender, "cp": 1, "size": size, "tokens": tokens,
            "label_tokens": label_tokens, "docs": 1, "attn_cells": 10, "useful_area": 10, "step_s": step_s,
            "tokens_per_s_per_gpu": tokens / step_s, "label_tokens_per_s_per_gpu": label_tokens / step_s,
            "loss": loss, "steps": 3, "peak_gib": 1.0}


def test_report_ratios_and_probe_summary(tmp_path):
    rows = [_row("packed", "magi", 1024, 1.0, 1024, 1000), _row("packed", "flex_attention", 1024, 1.6, 1024, 1000),
            _row("rollouts", "magi", 1024, 1.0, 1024, 700), _row("rollouts", "magi-unshared", 1024, 2.5, 2800, 700),
            {"workload": "packed", "contender": "sdpa", "cp": 1, "size": 1024, "oom": True}]
    lines = speedups(rows)
    assert "magi is 1.60x flex_attention" in lines[0]
    assert any("2.73x the tokens" in s and "2.50x the step time" in s and "saves 60%" in s for s in lines)
    probe = [{"probe": True, "offload": False, "seq_len": n, "fits": True, "peak_gib": p, "reserved_gib": p,
              "fwd_start_gib": 16.0, "fwd_end_gib": 16.0 + p / 2, "host_saved_gib": 0.0, "step_s": 1.0,
              "tokens_per_s": n} for n, p in ((1 << 17, 30.0), (1 << 18, 50.0))]
    probe.append({"probe": True, "offload": False, "seq_len": 3 << 17, "fits": False, "oom": True})
    text = format_probe(probe, {"gpu_memory_gib": 140.0})
    assert "longest sequence that trains 262,144 tokens" in text and "next length 393,216: OOM" in text
    meta = {"world": 1, "device": "CPU", "dtype": "fp32", "torch": "t", "transformers": "x", "date": "d",
            "gpu_memory_gib": 140.0, "probe_doc_len": 8192}
    md = write_outputs(meta, rows + probe, tmp_path)
    assert "| packed | sdpa | 1 | 1k |" in md and "OOM" in md and (tmp_path / "e2e.png").exists()


def test_smoke_run_says_what_it_ran(tmp_path):
    from flexcp.bench.e2e_bench import PROBE_START, parse_args

    assert not parse_args(["--cpu", "--tiny"]).probe  # no 128k / 256k probe in a smoke run
    assert parse_args(["--cpu", "--tiny", "--probe-start", "256", "512"]).probe  # unless asked for
    assert parse_args([]).probe and parse_args([]).probe_start == PROBE_START
    sliding = {**_row("sliding", "magi", 256, 1.0, 256, 255), "window": 64}
    rows = [_row("rollouts", "magi", 256, 2.0, 256, 185), _row("rollouts", "magi-unshared", 256, 1.0, 697, 185), sliding]
    meta = {"world": 1, "device": "CPU", "dtype": "fp32", "torch": "t", "transformers": "x", "date": "d",
            "gpu_memory_gib": None, "tiny": True, "completions": 4}
    md = write_outputs(meta, rows, tmp_path)
    for wrong in ("per GPU", "llama-1b", "mistral-1b", "4096", "saves -"):
        assert wrong not in md, wrong
    assert "Models: rollouts: tiny llama; sliding window 64 (tiny mistral)" in md and "tokens/s per process" in md
    assert "the prefix tree costs 100% more time here" in md
    assert progress_line(rows[0], meta) == "rollouts, magi, cp=1, 256 tokens: 2.00 s/step, 128 tokens/s per process, loss 1.0000"
    assert progress_line({"probe": True, "offload": True, "seq_len": 512, "oom": True}, meta) == \
        "with offloading, 512 tokens: OOM"


# ---------------------------------------------------------------------------------- recipe options


def _train_two(offload: bool):
    from flexcp.train.config import from_dict
    from flexcp.train.loop import Trainer

    cfg = from_dict({"out_dir": "/tmp/flexcp_test_offload",
                     "model": {"preset": "tiny", "activation_checkpointing": True, "offload_activations": offload},
                     "data": {"kind": "recall", "seq_len": 128}, "train": {"steps": 4, "dtype": "fp32"},
                     "checkpoint": {"resume": False, "export_hf": False}, "logging": {"progress": "none"}})
    trainer = Trainer(cfg)
    return trainer, [(m.loss, m.grad_norm) for m in (trainer.train_step(), trainer.train_step())]


def test_offload_activations_keeps_layer_inputs_on_the_host():
    trainer, with_offload = _train_two(True)
    layers = trainer.lm.config.num_hidden_layers
    hidden = trainer.lm.config.hidden_size
    trainer.offload.min_bytes = 0  # the tiny model's tensors are below the 1 MiB default
    trainer.train_step()
    # every checkpointed layer's input [1, 128, hidden] (fp32) went to the host arena
    assert trainer.offload.saved_bytes >= layers * 128 * hidden * 4
    assert trainer.offload.host_bytes >= trainer.offload.saved_bytes
    assert "activations offloaded to host" in trainer.describe()
    _, without = _train_two(False)
    assert np.ravel(with_offload) == pytest.approx(np.ravel(without), rel=1e-6)


def test_recipe_accepts_flex_attention_and_the_mistral_preset():
    from flexcp.train.config import ConfigError, from_dict, validate
    from flexcp.train.model import preset_config

    validate(from_dict({"model": {"attn_implementation": "flex_attention"}}), 1)
    with pytest.raises(ConfigError, match="needs model.attn_implementation='magi'"):
        validate(from_dict({"model": {"attn_implementation": "flex_attention"}, "parallel": {"cp": 2}}), 2)
    cfg = preset_config("mistral-1b", 300)
    assert cfg.model_type == "mistral" and cfg.sliding_window == 4096 and cfg.num_hidden_layers == 16
    assert preset_config("llama-1b", 300).model_type == "llama"
    with pytest.raises(ConfigError, match="not a transformers model type"):
        preset_config("tiny", 300, {"model_type": "nonexistent"})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tiny_gpu_contenders_agree(tmp_path):
    """On a GPU every cp = 1 contender runs (HF flex_attention included) and the first losses agree."""
    from flexcp.bench.e2e_bench import main

    main(["--tiny", "--sizes", "1024", "--steps", "1", "--workloads", "packed", "sliding", "--no-probe",
          "--extras", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "e2e.json").read_text())["rows"]
    for w in ("packed", "sliding"):
        mine = _rows(rows, workload=w)
        assert {r["contender"] for r in mine} == {"magi", "flex_attention", "sdpa"}
        assert all("step_s" in r for r in mine), mine
        losses = [r["loss"] for r in mine]
        assert max(losses) - min(losses) < 2e-2 * max(losses)  # bf16 compute
