"""The GPU differential check's CPU parts: its masks, its judging rule (a CPU backend passes, a broken
one fails), and the dry run listing every case."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flexcp.bench import gpu_check
from flexcp.kernels import ReferenceBackend
from flexcp.mask.types import BI_CAUSAL, CAUSAL, FULL, INV_CAUSAL


def test_grid_mask_has_the_issue_s_shape():
    spec = gpu_check.grid_mask(1024, 1024, 1000, seed=0)
    spec.validate()  # no cell covered twice
    t = spec.table
    assert len(t) == 1000 and set(t.types.tolist()) == {FULL, CAUSAL, INV_CAUSAL, BI_CAUSAL}
    assert len(set(spec.q_ranges)) < 1000 and len(set(spec.k_ranges)) < 1000  # overlapping q, shared k
    assert (t.qe - t.qs).min() == 1  # one-token bands


def test_packs_have_the_issue_s_shapes():
    packs = gpu_check.packs()
    assert [s.total_seqlen for s in packs.values()] == [32768, 65536, 57344, 131072, 262144]
    chat = gpu_check.chat_pack()
    assert len(chat) == 39 and sum(chat) == 32768 and 300 < np.median(chat) < 1200
    lens = gpu_check.one_long_document(65536, 39000, others=2653)
    assert len(lens) == 11 and sum(lens) == 65536 and max(lens) == 39000


class Broken(ReferenceBackend):
    """The reference with dQ off by 2% (what a lost cell or a bad index does)."""

    def backward(self, *args, **kwargs):
        dq, dk, dv = super().backward(*args, **kwargs)
        return dq * 1.02, dk, dv


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_rule_passes_a_right_backend_and_fails_a_wrong_one(monkeypatch, dtype):
    backends = {"reference": ReferenceBackend(), "broken": Broken()}
    monkeypatch.setattr(gpu_check, "get_backend", backends.__getitem__)
    case = gpu_check.Case("grid", gpu_check.grid_mask(96, 80, 30, seed=3, sizes=(1, 8, 16)), 4, 2, 16)
    recs = {r["backend"]: r for r in gpu_check.check_case(case, ["reference", "broken"], [dtype], "cpu")}
    assert recs["reference"]["status"] == "pass", recs["reference"]["problems"]
    assert recs["broken"]["status"] == "fail" and recs["broken"]["problems"][0].startswith("dq err")
    assert all(recs["reference"]["tensors"][t]["err"] <= recs["reference"]["tensors"][t]["bound"] for t in gpu_check.TENSORS)


def test_a_documented_refusal_is_not_a_failure(monkeypatch):
    class NoSoftcap(ReferenceBackend):
        def unsupported(self, q, k, softcap):
            return "no softcap here" if softcap > 0 else None

    monkeypatch.setattr(gpu_check, "get_backend", lambda name: NoSoftcap())
    case = gpu_check.Case("softcap", gpu_check.varlen([20, 12]), 2, 2, 16, softcap=30.0)
    (rec,) = gpu_check.check_case(case, ["nosoftcap"], [torch.bfloat16], "cpu")
    assert rec["status"] == "refused" and gpu_check.summarize([rec])["nosoftcap/bfloat16"]["refused"] == 1


def test_dry_run_lists_every_case(capsys):
    assert gpu_check.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "random_1000_1024x1024" in out and "cp4_varlen_remote0" in out and "256k_one_200k" in out


def test_markdown_reports_every_part():
    rec = {"case": "c", "backend": "triton", "dtype": "bfloat16", "status": "pass", "problems": [],
           "tensors": {"out": {"err": 1e-3, "bound": 4e-3}}, "extra_bytes": 10, "qkv_bytes": 100,
           "predicted_bytes": 20, "extra_vs_qkv": 0.1}  # fmt: skip
    bad = {**rec, "backend": "cudnn", "status": "fail", "problems": ["dq err 0.8 > 0.01"]}
    packs = [{"pack": "p", "contender": "triton", "qkv_gib": 1.0, "extra_gib": 0.5},
             {"pack": "p", "contender": "auto", "qkv_gib": 1.0, "extra_gib": 0.7, "predicted_gib": 0.6,
              "rel_err_vs_triton": {"dq": 0.003}},
             {"pack": "p", "contender": "cudnn", "qkv_gib": 1.0, "error": "OutOfMemoryError: ..."}]  # fmt: skip
    speed = {"auto_fwdbwd_ms": 10.0, "flex_fwdbwd_ms": 13.0, "speedup_vs_flex": 1.3}
    md = gpu_check.markdown(gpu_check.summarize([rec, bad]), [rec, bad], packs, speed)
    assert "| triton/bfloat16 | 1 | 0 |" in md and "cudnn bfloat16: dq err 0.8" in md
    assert "| c | 0.10 (0.20) | 0.10 (0.20) |" in md and "OutOfMemoryError" in md and "0.0030 / -" in md
    assert "1.30x (target >= 1.2x)" in md


def test_main_runs_the_check_part_on_cpu(tmp_path, monkeypatch):
    """The whole plumbing (cases, judging, logs, summary, JSON and markdown) on one small case, CPU reference."""
    monkeypatch.setattr(gpu_check, "get_backend", lambda name: ReferenceBackend())
    argv = ["--part", "check", "--device", "cpu", "--backends", "reference", "--dtypes", "bf16",
            "--cases", "random_60", "--out", str(tmp_path)]  # fmt: skip
    assert gpu_check.main(argv) == 0
    import json

    report = json.loads((tmp_path / "gpu_check.json").read_text())
    s = report["summary"]["reference/bfloat16"]
    assert (s["pass"], s["fail"], s["refused"], s["skipped"]) == (1, 0, 0, 0) and 0 < s["worst_err_over_bound"] <= 1
    assert (tmp_path / "gpu_check.jsonl").read_text().count("\n") == 1 and "reference/bfloat16" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.parametrize("spec", [gpu_check.tree_forest(2, 3, 5, 3), gpu_check.varlen([4, 1, 7])], ids=["forest", "varlen"])
def test_flex_baseline_mask_is_the_spec(spec):
    """FlexAttention's inputs (kernel_bench's mask_mod over node relations) cover exactly the spec's cells."""
    fm = gpu_check.flex_mask(spec)
    qi, ki = np.arange(spec.total_seqlen)[:, None], np.arange(spec.total_seqlen)[None, :]
    r = fm.rel[fm.node[qi], fm.node[ki]]
    dense = (r == 1) | ((r == 2) & (qi >= ki) & (qi - ki < fm.window))
    assert np.array_equal(dense, spec.to_dense().numpy())
