"""Smoke test of ``flexcp bench reference`` on a tiny row (in-process; no timing asserts)."""

from __future__ import annotations

import pytest

from flexcp.bench.reference_bench import build_spec, format_report, measure


def test_build_spec():
    spec, docs = build_spec("varlen", 4096, seed=0)
    assert spec.total_seqlen == 4096 and docs == len(spec) >= 2
    assert build_spec("causal", 512, seed=0)[0].area() == 512 * 513 // 2
    with pytest.raises(ValueError, match="mask='full' is unknown"):
        build_spec("full", 512, seed=0)


def test_measure_and_report():
    cfg = {
        "tokens": 640,
        "mask": "causal",
        "heads": 2,
        "kv_heads": 1,
        "head_dim": 16,
        "repeats": 1,
        "single_run_s": 10.0,
        "threads": 1,
        "seed": 0,
    }
    row = measure(cfg)
    assert row["area"] == 640 * 641 // 2 and row["fwd_s"] > 0 and row["fwdbwd_s"] > 0
    assert row["fwd_runs"] == row["fwdbwd_runs"] == 1 and row["fwdbwd_peak_bytes"] >= 0
    meta = {
        "cpu": "cpu",
        "cores": 2,
        "threads": 1,
        "python": "3",
        "torch": "2",
        "date": "d",
        "command": "flexcp bench reference",
        "block": 512,
        "load_before": 0.5,
        "load_after": 1.0,
        "heads": 2,
        "kv_heads": 1,
        "head_dim": 16,
        "repeats": 1,
        "single_run_s": 10.0,
    }
    table = format_report(meta, [row]).splitlines()
    assert table[-1].startswith("| 640 | causal | 1 |") and table[-1].count("|") == table[-3].count("|")
