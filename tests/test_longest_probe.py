"""The longest-sequence probe (flexcp.bench.longest) runs end to end on CPU with the tiny preset."""

import json

from flexcp.bench import longest


def test_probe_dry_run_writes_every_part(tmp_path):
    assert longest.main(["--cpu", "--tiny", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "longest.json").read_text())["rows"]
    parts = {r["part"] for r in rows}
    assert {"1 speed", "2 levers", "2 losses", "3 pack vs causal", "4 llama-3b", "5 longest",
            "6 offload longest"} <= parts
    steps = [r for r in rows if "seq_len" in r and r["part"] not in ("build", "2 losses")]
    assert all(r.get("fits") for r in steps), [r for r in steps if not r.get("fits")]
    losses = next(r for r in rows if r["part"] == "2 losses")
    assert losses["within_bf16"] and len(losses["losses_plain"]) == 2
    offloaded = [r for r in steps if "offload" in r["levers"]]
    assert offloaded and all(r["offloaded_gib"] > 0 for r in offloaded)
    md = (tmp_path / "longest.md").read_text()
    assert "| 5 longest |" in md and "plain vs every lever" in md and (tmp_path / "longest.png").exists()
