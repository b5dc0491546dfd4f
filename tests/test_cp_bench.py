"""`flexcp bench cp`: the baselines' slice tables against dense masks, and a gloo run at cp = 1, 2.

The gloo run checks what makes the GPU numbers trustworthy: the all-gather and ring
baselines compute the same outputs and gradients as flexcp on every mask family, the
byte counts follow their formulas (flexcp never receives more than all-gather), and the
JSON carries the fields the report needs.
"""

import json

import numpy as np
import pytest
import torch

from flexcp.bench import cp_bench
from flexcp.bench.cp_baselines import block_table
from flexcp.cli import BENCHES
from flexcp.sharding import build_plan
from flexcp.mask import AttnMaskSpec
from multiproc import run_spawned

HQ, HKV, D, TOKENS = 4, 2, 16, 256
BENCH_ARGS = [
    "--backend", "gloo", "--device", "cpu", "--cp", "1", "2", "--tokens-per-gpu", str(TOKENS), "--chunk-size", "32",
    "--heads", str(HQ), "--kv-heads", str(HKV), "--head-dim", str(D), "--window", "64", "--dtype", "fp32",
    "--warmup", "0", "--reps", "1", "--ring-masks", *cp_bench.MASKS,
]


def _specs():
    return [
        AttnMaskSpec.causal(61),
        AttnMaskSpec.varlen([1, 20, 3, 30, 7]),
        AttnMaskSpec.prefix_tree([20, 9, 14, 5], [[0, 1], [0, 2, 3]])[0],
        AttnMaskSpec.sliding_window([40, 25], 6),
        AttnMaskSpec.sliding_window([50], 5, causal=False),
        AttnMaskSpec([(3, 20), (30, 50)], [(10, 40), (0, 35)], ["inv_causal", "bi_causal"], 55),
    ]


@pytest.mark.parametrize("solver", ["greedy", "zigzag"])
def test_block_tables_are_the_mask_in_shard_coordinates(solver):
    cp = 3
    for spec in _specs():
        plan = build_plan(spec, cp, 4, solver)
        n = plan.local_len
        dense = torch.zeros(plan.padded_seqlen, plan.padded_seqlen, dtype=torch.bool)
        dense[: spec.total_seqlen, : spec.total_seqlen] = spec.to_dense()
        rows = [torch.from_numpy(plan.global_indices(r)) for r in range(cp)]
        for r in range(cp):
            # all-gather layout: every rank's shard, in rank order
            table = block_table(spec.table, plan, r, range(cp), np.arange(cp) * n)
            got = AttnMaskSpec.from_table(table, n, cp * n).validate().to_dense()
            assert torch.equal(got, dense[rows[r]][:, torch.cat(rows)]), (spec, r)
            # ring: one source shard at a time
            for src in range(cp):
                table = block_table(spec.table, plan, r, [src], np.zeros(cp, dtype=np.int64))
                got = AttnMaskSpec.from_table(table, n, n).validate().to_dense()
                assert torch.equal(got, dense[rows[r]][:, rows[src]]), (spec, r, src)


def _bench(rank, world_size, out):
    return cp_bench.main([*BENCH_ARGS, "--out", out])


def test_gloo_run_schemes_agree_and_report(tmp_path):
    out = tmp_path / "cp.json"
    assert run_spawned(_bench, 2, str(out), timeout=240) == [0, 0]
    report = json.loads(out.read_text())
    meta, rows = report["meta"], report["rows"]
    for field in ("card", "world_size", "kernel_backend", "torch", "triton", "date", "command", "dtype", "heads"):
        assert field in meta
    assert meta["world_size"] == 2 and meta["kernel_backend"] == "reference"
    got = {(r["mask"], r["cp"], r["scheme"]) for r in rows}
    assert got == {(m, cp, s) for m in cp_bench.MASKS for cp in (1, 2) for s in cp_bench.SCHEMES}
    kv_row, grad_row = 2 * HKV * D * 4, 2 * HKV * D * 4  # fp32 K/V rows, float32 dK/dV rows
    for r in rows:
        tag = (r["mask"], r["cp"], r["scheme"])
        assert r["total_tokens"] == r["cp"] * TOKENS and r["area"] > 0 and r["imbalance"] >= 1.0
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["fwd_tflops"] > 0 and r["fwd_bwd_tflops"] > 0
        assert r["fwd_efficiency"] is not None and r["fwd_bwd_efficiency"] is not None
        if r["scheme"] == "flexcp":
            assert r["max_abs_diff"] is None
        else:
            assert r["diff_reference"] == "flexcp"
            assert max(r["max_abs_diff"].values()) < 1e-4, tag
        n = r["padded_tokens"] // r["cp"]
        if r["cp"] == 1:
            assert r["recv_bytes_fwd"] == r["recv_bytes_fwd_bwd"] == 0
            assert r["fwd_efficiency"] == 1.0
        elif r["scheme"] == "allgather":
            assert (r["recv_bytes_fwd"], r["recv_bytes_fwd_bwd"]) == (n * kv_row, n * (kv_row + grad_row))
        elif r["scheme"] == "ring":
            assert (r["recv_bytes_fwd"], r["recv_bytes_fwd_bwd"]) == (n * kv_row, n * kv_row + 2 * n * grad_row)
    by_tag = {(r["mask"], r["cp"], r["scheme"]): r for r in rows}
    for mask in cp_bench.MASKS:
        flex, ag = by_tag[(mask, 2, "flexcp")], by_tag[(mask, 2, "allgather")]
        assert flex["recv_bytes_fwd"] <= ag["recv_bytes_fwd"], mask  # zero-redundant: never more than all keys
        assert flex["imbalance"] == ag["imbalance"]  # same dispatch plan
    assert by_tag[("causal", 2, "flexcp")]["recv_bytes_fwd"] > 0
    assert by_tag[("causal", 2, "ring")]["imbalance"] == 1.0  # zigzag balances one causal sequence


def test_single_process_run_without_torchrun(tmp_path, capsys):
    out = tmp_path / "one.json"
    args = ["--device", "cpu", "--cp", "1", "2", "--tokens-per-gpu", "64", "--chunk-size", "16", "--heads", "2",
            "--head-dim", "8", "--masks", "causal", "--warmup", "0", "--reps", "1", "--out", str(out)]
    assert cp_bench.main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["cp"], r["scheme"]) for r in rows] == [(1, "flexcp"), (1, "allgather"), (1, "ring")]
    assert "| causal | 1 | flexcp |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, match",
    [
        (["--heads", "6", "--kv-heads", "4"], "multiple of --kv-heads"),
        (["--cp", "0"], "--cp values"),
        (["--tokens-per-gpu", "0"], "--tokens-per-gpu"),
        (["--prompt-frac", "1.5"], "--prompt-frac"),
        (["--device", "cpu", "--cp", "4"], "world size 1"),
    ],
)
def test_bad_arguments_name_the_fix(args, match):
    with pytest.raises(ValueError, match=match):
        cp_bench.main(args)


def test_cli_lists_the_bench():
    assert BENCHES["cp"][0] == "flexcp.bench.cp_bench"
