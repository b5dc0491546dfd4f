"""cuDNN's backward workspace on CPU: the version policy, the token buckets in the graph key, the
workspace model against the H200 measurements, and the size guard (emulated graphs, no cuDNN)."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings

from cudnn_emulator import EmulatedCudnn
from flexcp.kernels.cudnn import workspace
from flexcp.kernels.cudnn.backend import packed_rows
from flexcp.kernels.cudnn.workspace import Shape, Versions, backward_workspace, padded_reason, token_bucket, too_large
from flexcp.mask import AttnMaskSpec, prefix_tree, varlen
from strategies import valid_specs
from test_cudnn_emulated import CASES, assert_exact, run

GOOD = Versions(91900, (1, 32), 9)
GIB = 2**30


@pytest.mark.parametrize(
    "versions, head_dim, why",
    [
        (GOOD, 128, None),
        (Versions(90600, (1, 8), 9), 64, None),
        (Versions(92100, (1, 32), 10), 128, None),
        (Versions(92700, (1, 40), 9), 128, None),
        (Versions(91900, (1, 7), 9), 128, "frontend 1.7"),
        (Versions(90599, (1, 32), 9), 128, "9.5.99 ignores"),
        (Versions(92200, (1, 32), 9), 128, "all-zero gradients"),
        (Versions(92699, (1, 32), 9), 128, "all-zero gradients"),
        (GOOD, 72, "head_dim 72"),
        (Versions(91900, (1, 32), 8), 128, "SM 8.x"),
        (Versions(91900, (1, 32), 12), 128, "SM 12.x"),
    ],
)
def test_version_policy(versions, head_dim, why):
    got = padded_reason(versions, head_dim)
    assert got is None if why is None else why in got


def test_frontend_versions_parse():
    assert workspace.parse_frontend("1.32.0") == (1, 32)
    assert workspace.parse_frontend("1.8.0rc1") == (1, 8)
    assert workspace.parse_frontend("unknown") == (0, 0)


def test_token_buckets_cover_and_stay_few():
    seen = set()
    for n in range(1, 1 << 17, 7):
        b = token_bucket(n)
        assert b >= max(n, 128) and b % 64 == 0
        assert b <= max(128, n + 63, n * 1.25)  # at most 25% spare workspace from 512 rows on
        seen.add(b)
    assert len(seen) == 7 + 4 * 8  # multiples of 64 from 128 to 512, then four per octave up to 2**17
    assert [token_bucket(n) for n in (1, 128, 129, 512, 262144, 262145)] == [128, 128, 192, 512, 262144, 327680]


# One H200, cuDNN 9.19, 16 heads d128, causal packs with one long document (docs/benchmarks.md):
# (documents, tokens, longest, padded GiB, by-tokens GiB with the scout's padded head-major stats).
MEASURED = [(7, 32768, 20000, 1.076, 0.258), (11, 65536, 45000, 3.806, 0.530),
            (16, 131072, 100000, 12.302, 1.095), (32, 262144, 200000, 49.21, 2.381)]  # fmt: skip


@pytest.mark.parametrize("docs, tokens, longest, padded, by_tokens", MEASURED)
def test_workspace_model_matches_the_measurements(docs, tokens, longest, padded, by_tokens):
    s = Shape(docs, longest, longest, 16, 16, 128)
    assert backward_workspace(s) / GIB == pytest.approx(padded, rel=2e-3)
    total = -(-tokens // 64) * 64
    t = Shape(docs, longest, longest, 16, 16, 128, total, total)
    head_major_stats = 4 * docs * 16 * longest - 4 * 16 * total  # the scout's stats were padded, flexcp's are ragged
    assert (backward_workspace(t) + head_major_stats) / GIB == pytest.approx(by_tokens, rel=2e-3)


def test_workspace_model_matches_the_failed_gqa_allocation():
    """The 256k pack (one 200k document + 2k documents, 32:8 heads) asked cuDNN for 257 GiB, padded."""
    assert backward_workspace(Shape(32, 262144, 262144, 32, 8, 128)) / GIB == pytest.approx(257, rel=3e-3)


def test_size_guard_refuses_the_measured_failure_only_where_padded():
    assert too_large(Shape(32, 200000, 200000, 16, 16, 128))  # wrong dQ on cuDNN 9.19
    assert not too_large(Shape(32, 200000, 200000, 16, 16, 128, 262144, 262144))  # right, sized by tokens
    assert not too_large(Shape(16, 65536, 65536, 16, 16, 128))  # 2**31 exactly


def backward_keys(backend) -> list:
    return [k for k in backend.graphs.keys if k.backward]


@settings(max_examples=25, deadline=None)
@given(valid_specs(max_len=70, max_slices=9))
def test_random_masks_by_tokens(spec):
    """Head dim 16: backward graphs of launches whose entries tile their rows carry token totals,
    the others run padded, and the emulator checks that every offset of every launch stays below
    the totals and that a token-sized launch's query offsets are packed from 0 (cuDNN 9.19's
    contract, measured)."""
    backend = EmulatedCudnn()
    assert_exact(*run(backend, spec, hq=4, hkv=2, d=16))
    prep = backend.prepare(spec.table, spec.total_seqlen, spec.total_seqlen_k, torch.device("cpu"))
    for la in prep.launches:
        shape = backend.backward_shape(la, 4, 2, 16, 0)
        assert bool(shape.total_q) == packed_rows(la)
        assert not shape.total_q or (shape.total_q >= 128 and shape.total_k >= 128)


@pytest.mark.parametrize("name", ["docs", "prefix", "shared_k", "overlapping_q", "window"])
def test_direct_sixteen_bit_gradients_stay_within_the_totals(name):
    spec = CASES[name]
    backend = EmulatedCudnn()
    q = torch.randn(spec.total_seqlen, 4, 16).bfloat16()
    k, v = (torch.randn(spec.total_seqlen_k, 2, 16).bfloat16() for _ in "kv")
    prep = backend.prepare(spec.table, spec.total_seqlen, spec.total_seqlen_k, q.device)
    out, lse = backend.forward(q, k, v, prep, 0.3, 0.0)
    backend.backward(torch.randn_like(q), q, k, v, out, lse, prep, 0.3, 0.0, torch.bfloat16)
    assert backward_keys(backend) and all(key.shape.total_q for key in backward_keys(backend))


def test_packs_of_similar_size_share_backward_graphs():
    backend = EmulatedCudnn()
    for lens in ([30, 70, 100], [29, 71, 102], [50, 153]):
        run(backend, varlen(lens), hq=2, hkv=2, d=16)
    assert len(backward_keys(backend)) == 2  # 200 and 202 tokens share one bucket; max_q 153 -> 256 is another
    assert {k.shape.total_q for k in backward_keys(backend)} == {token_bucket(202)} == {256}


def test_known_bad_version_runs_padded_with_one_warning():
    backend = EmulatedCudnn()
    backend.graphs.current = Versions(92300, (1, 32), 9)
    with pytest.warns(RuntimeWarning, match="all-zero gradients") as rec:
        assert_exact(*run(backend, CASES["prefix"], d=16))
        assert_exact(*run(backend, CASES["docs"], d=16))
    assert len([w for w in rec if "all-zero" in str(w.message)]) == 1
    assert backward_keys(backend) and all(k.shape.total_q == 0 for k in backward_keys(backend))


def test_oversized_backward_launches_run_on_the_fallback(monkeypatch):
    """Over the index limit, a launch's backward runs on the fallback (exactly) with one warning;
    its forward stays on cuDNN."""
    monkeypatch.setattr(workspace, "INDEX_LIMIT", 1000)
    backend = EmulatedCudnn()
    spec = prefix_tree([200, 150, 90], [[0, 1], [0, 2]])[0]
    with pytest.warns(RuntimeWarning, match="run on the reference fallback") as rec:
        assert_exact(*run(backend, spec, hq=2, hkv=2, d=16))
        assert_exact(*run(backend, spec, hq=2, hkv=2, d=16, seed=1))
    assert len(rec) == 1 and "even sized by tokens" in str(rec[0].message)
    assert backend.graphs.keys and not backward_keys(backend)


def test_padded_launches_over_the_limit_run_on_the_fallback(monkeypatch):
    monkeypatch.setattr(workspace, "INDEX_LIMIT", 1000)
    backend = EmulatedCudnn()
    backend.graphs.current = Versions(90500, (1, 32), 9)  # cuDNN 9.5: padded
    with pytest.warns(RuntimeWarning, match="padded because cuDNN 9.5.0 ignores"):
        assert_exact(*run(backend, AttnMaskSpec([(0, 40)], [(0, 40)], ["causal"], 40, 40), d=16))
    assert not backward_keys(backend)


def test_no_warning_where_sized_by_tokens():
    backend = EmulatedCudnn()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_exact(*run(backend, CASES["window"], d=16))


def one_long_document(tokens: int, longest: int) -> list[int]:
    """The issue's packs: one long document in the middle of 2k-token documents."""
    rest = tokens - longest
    lens = [2000] * (rest // 2000)
    lens[-1] += rest - sum(lens)
    return lens[: len(lens) // 2] + [longest] + lens[len(lens) // 2 :]


def predicted(backend, spec, hq=32, hkv=8, d=128, dtype=torch.bfloat16) -> int:
    prep = backend.prepare(spec.table, spec.total_seqlen, spec.total_seqlen_k, torch.device("cpu"))
    return backend.extra_memory_bytes(prep, heads_q=hq, heads_kv=hkv, head_dim=d, dtype=dtype)


def test_extra_memory_of_a_long_pack_is_the_token_sized_workspace(monkeypatch):
    """256k tokens, one 200k document, 32:8 heads d128: one launch writing 16-bit gradients in place,
    so the prediction is cuDNN's workspace alone: 12 GiB by tokens; padded, 257 GiB (what cuDNN
    9.19 tried to allocate), over the index limit, so the backward runs on the fallback."""
    spec = varlen(one_long_document(262144, 200000))
    by_tokens = predicted(EmulatedCudnn(), spec)
    assert by_tokens == backward_workspace(Shape(32, 262144, 262144, 32, 8, 128, 262144, 262144))
    assert by_tokens / GIB == pytest.approx(4 * 32 * 129 / 2**12 + 8, rel=1e-6)  # dQ + stats 4.03 GiB, dK/dV 8 GiB
    padded = EmulatedCudnn()
    padded.graphs.current = Versions(90500, (1, 32), 9)
    on_fallback = predicted(padded, spec)
    assert on_fallback >= 4 * 128 * (262144 * 32 + 2 * 262144 * 8) and on_fallback < by_tokens * 3
    monkeypatch.setattr(workspace, "INDEX_LIMIT", 2**40)
    assert predicted(padded, spec) / GIB == pytest.approx(257, rel=3e-3)


def test_extra_memory_matches_the_padded_64k_measurement(monkeypatch):
    """64k tokens, 11 documents, one of 39k (issue 20): 33.4 GiB extra measured with padded graphs
    (which the index limit now sends to the fallback: 4.3e9 accumulator elements)."""
    monkeypatch.setattr(workspace, "INDEX_LIMIT", 2**40)
    backend = EmulatedCudnn()
    backend.graphs.current = Versions(90500, (1, 32), 9)
    lens = [39000] + [2654] * 9 + [65536 - 39000 - 9 * 2654]
    assert predicted(backend, varlen(lens)) / GIB == pytest.approx(33.4, rel=0.05)


def test_extra_memory_counts_the_float32_sums_of_shared_rows():
    spec = prefix_tree([3000, 1000, 1000, 500], [[0, 1], [0, 2], [0, 3]])[0]  # completions share the prompt's keys
    backend = EmulatedCudnn()
    prep = backend.prepare(spec.table, spec.total_seqlen, spec.total_seqlen_k, torch.device("cpu"))
    got = backend.extra_memory_bytes(prep, heads_q=4, heads_kv=2, head_dim=16, dtype=torch.bfloat16)
    sums = 4 * 16 * (spec.total_seqlen * 4 * (any(prep.shared_rows)) + 2 * spec.total_seqlen_k * 2 * (not prep.disjoint_keys))
    assert not prep.disjoint_keys and got > sums > 0


def test_extra_memory_of_launches_on_the_fallback(monkeypatch):
    """Over the index limit every backward launch runs on the fallback: its full-size partials count."""
    monkeypatch.setattr(workspace, "INDEX_LIMIT", 1000)
    spec = varlen([300, 500])
    got = predicted(EmulatedCudnn(), spec, hq=2, hkv=2, d=16)
    assert got >= 4 * 16 * (800 * 2 + 2 * 800 * 2)
