"""Packed-batch sampler and the solver report script (small arguments: seconds, not minutes)."""

import json

import numpy as np
import pytest

from flexcp.bench import solver_report
from flexcp.bench.docdist import load_bins, sample_doc_lengths, sample_pack


def test_bins_match_the_shared_histogram():
    bins = load_bins()
    assert len(bins.prob) == 14 and bins.prob.sum() == pytest.approx(1.0)
    assert bins.lo[0] == 1 and bins.hi[-1] == 196608  # empty documents are not drawn
    assert (bins.hi >= bins.lo).all()


@pytest.mark.parametrize("pack_len,frac", [(1, 0.5), (1000, 0.1), (32768, 0.5), (131072, 1.0)])
def test_pack_fills_exactly_and_respects_the_cap(pack_len, frac):
    lengths = sample_pack(pack_len, rng=3, max_doc_frac=frac)
    assert lengths.sum() == pack_len
    assert (lengths >= 1).all() and lengths.max() <= max(1, int(frac * pack_len))
    assert np.array_equal(lengths, sample_pack(pack_len, rng=3, max_doc_frac=frac))  # seeded


def test_doc_lengths_follow_the_histogram():
    lengths = sample_doc_lengths(20000, rng=0)
    assert 0.68 < (lengths <= 1024).mean() < 0.75  # README: about 71% are at most 1K tokens
    assert 0.02 < (lengths > 8192).mean() < 0.035  # and about 2.6% exceed 8K


def test_bad_pack_arguments():
    with pytest.raises(ValueError, match="pack_len"):
        sample_pack(0)
    with pytest.raises(ValueError, match="max_doc_frac"):
        sample_pack(100, max_doc_frac=0)


def test_report_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "solver.json"
    argv = ["--tokens", "8192", "--cp", "2", "4", "--packs", "2", "--timing-tokens", "16384", "--timing-cp", "4"]
    assert solver_report.main(argv + ["--repeats", "2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| 8k | 4 |" in text and "2,000 documents" in text
    data = json.loads(out.read_text())
    assert [r["cp"] for r in data["imbalance"]] == [2, 4]
    for row in data["imbalance"]:
        assert set(row) >= {"greedy", "lpt", "zigzag", "contiguous"}
        assert row["greedy"]["max"] >= row["greedy"]["mean"] >= 1.0
