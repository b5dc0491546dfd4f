"""``flexcp demo`` end to end: two CPU processes, cp = 2, the recall task is learned (the full demo, ~1.5 min)."""

from __future__ import annotations

import json
import os

from flexcp.cli import main as flexcp_main


def test_demo_learns_recall_across_cp_shards(tmp_path, capsys):
    env_before = dict(os.environ)
    rc = flexcp_main(["demo", f"out_dir={tmp_path}", "logging.progress=none"])
    out = capsys.readouterr().out
    assert os.environ == env_before  # the workers' CPU-only environment does not leak into the caller
    result = json.loads((tmp_path / "demo_result.json").read_text())
    chance = 1 / 16
    assert result["acc_before"] < 3 * chance
    assert result["acc_after"] > 8 * chance, out  # well above chance: learned through cross-rank attention
    assert rc == 0 and "learned, through attention across CP shards" in out
    assert "on different ranks in 100% of queries" in out
    assert (tmp_path / "hf" / "model.safetensors").exists() and (tmp_path / "metrics.jsonl").exists()
