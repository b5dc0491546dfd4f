"""``python -m flexcp.bench.gpu_check``: the GPU differential check of every backend, and the packs' memory (issue 20).

One device call, two parts (``--part check``, ``--part packs``, default both):

* **check** -- random slice masks (up to 1,000 slices of all four types over a grid of row
  and key bands, so q ranges overlap and k ranges are shared; empty-ish one-token bands
  included), named masks (causal, varlen packs, prefix tree, sliding window, a softcap
  case) and rank 0's host / remote stage tables of real plans at cp = 2, 3, 4, through
  ``triton``, ``cudnn``, ``torch_sdpa`` and ``auto`` (backend contract: forward, then
  backward from the forward's out/lse, gradients in the inputs' dtype; float32 for host
  stages), in bf16 and fp16. Judged per tensor (out, lse, dq, dk, dv) against dense
  float64 attention of the same 16-bit inputs: relative error (Frobenius, finite rows)
  ``err <= 2 * err_ref + floor``, where ``err_ref`` is the dense *16-bit* reference's own
  error (the same dense attention computed in the 16-bit dtype) and ``floor`` a quarter of
  the dtype's unit roundoff (bf16 2**-10, fp16 2**-13); plus rows without keys: lse exactly
  -inf and out exactly 0, and nothing NaN. A backend's documented refusal
  (``unsupported``, e.g. cuDNN has no softcap) is recorded as such, not as a failure.
  Each call's extra peak memory (peak allocated minus inputs and outputs) is recorded
  against q/k/v's bytes, beside the backend's own prediction (``extra_memory_bytes``).
* **packs** -- issue 20's "Done when" numbers, 32:8 heads, d128, bf16: fwd+bwd extra peak
  memory of ``auto``, ``cudnn``, ``triton`` (and FlexAttention up to 64k tokens) on the
  32k chat pack (39 documents, lognormal lengths of median 600), 64k (11 documents, one of
  39k), the 57k prefix tree (4 prompts x 8 completions), 128k (one 100k document + 2k
  documents) and 256k (one 200k document + 2k documents); fwd+bwd time of ``auto`` vs
  FlexAttention on the 32k chat pack (``kernel_bench.run_case``; target >= 1.2x).

Writes ``gpu_check.jsonl`` (records as they come), ``gpu_check.json`` (environment, every
record, summary) and ``gpu_check.md`` to
``--out`` (default ``$OUT``, else the working directory); prints the tables. A time budget
(``--check-budget-s`` 240 for the check, ``--budget-s`` 420 in all) skips what is left,
recorded as skipped. ``--dry-run`` lists
the cases and builds every mask without a GPU. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..kernels import get_backend
from ..kernels.backend import qkv_bytes
from ..mask import AttnMaskSpec, prefix_tree, sliding_window, varlen
from .docdist import sample_pack

BACKENDS = ("triton", "cudnn", "torch_sdpa", "auto")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TENSORS = ("out", "lse", "dq", "dk", "dv")
FLOOR = {torch.bfloat16: 2.0**-10, torch.float16: 2.0**-13, torch.float32: 2.0**-26}
"""Absolute floor on the relative error: a quarter of the dtype's unit roundoff."""
GIB = 2**30


@dataclass
class Case:
    name: str
    spec: AttnMaskSpec
    hq: int
    hkv: int
    d: int
    softcap: float = 0.0
    host: bool = False  # a CP host stage: float32 gradient partials, as the distributed layer asks

    def describe(self) -> dict:
        s = self.spec
        return {"case": self.name, "tq": s.total_seqlen, "tk": s.total_seqlen_k, "slices": len(s.q_ranges),
                "heads": f"{self.hq}:{self.hkv}", "d": self.d, "softcap": self.softcap}  # fmt: skip


# --------------------------------------------------------------------------- masks
def grid_mask(tq: int, tk: int, slices: int, seed: int, sizes: tuple = (1, 16, 32, 48)) -> AttnMaskSpec:
    """``slices`` random cells of a grid of row bands x key bands (band sizes drawn from ``sizes``),
    each of a random type (BI_CAUSAL only where it has at least as many keys as rows): q ranges
    overlap (a row band appears in many slices), k ranges are shared, no cell is covered twice,
    and the few band sizes keep cuDNN's distinct band signatures (graph builds) few."""
    rng = np.random.default_rng(seed)

    def cuts(total: int) -> list[int]:
        out = [0]
        while out[-1] < total:
            out.append(min(total, out[-1] + int(rng.choice(sizes))))
        return out

    rows, cols = cuts(tq), cuts(tk)
    cells = [(i, j) for i in range(len(rows) - 1) for j in range(len(cols) - 1)]
    if slices > len(cells):
        raise ValueError(f"slices={slices}: a {tq} x {tk} grid of these band sizes has only {len(cells)} cells")
    q_ranges, k_ranges, types = [], [], []
    for c in sorted(rng.choice(len(cells), size=slices, replace=False).tolist()):
        i, j = cells[c]
        qs, qe, ks, ke = rows[i], rows[i + 1], cols[j], cols[j + 1]
        kinds = ["full", "causal", "inv_causal"] + (["bi_causal"] if ke - ks >= qe - qs else [])
        q_ranges.append((qs, qe)), k_ranges.append((ks, ke)), types.append(kinds[int(rng.integers(len(kinds)))])
    return AttnMaskSpec(q_ranges, k_ranges, types, tq, tk)


def chat_pack(tokens: int = 32768, docs: int = 39, median: int = 600, seed: int = 0) -> list[int]:
    """``docs`` lognormal document lengths (median ``median``, sigma 1), scaled to sum to ``tokens``."""
    raw = np.random.default_rng(seed).lognormal(np.log(median), 1.0, size=docs)
    lens = np.maximum(1, np.floor(raw * tokens / raw.sum())).astype(np.int64)
    lens[int(np.argmax(lens))] += tokens - int(lens.sum())
    return lens.tolist()


def one_long_document(tokens: int, longest: int, others: int = 2000) -> list[int]:
    """One long document in the middle of documents of ``others`` tokens (the last one takes the rest)."""
    rest = tokens - longest
    lens = [others] * max(1, rest // others)
    lens[-1] += rest - sum(lens)
    return lens[: len(lens) // 2] + [longest] + lens[len(lens) // 2 :]


def tree_forest(prompts: int = 4, completions: int = 8, prompt_len: int = 6144, completion_len: int = 1024) -> AttnMaskSpec:
    """``prompts`` prompts each shared by ``completions`` completions (57,344 tokens by default)."""
    lens, paths = [], []
    for _ in range(prompts):
        root = len(lens)
        lens.append(prompt_len)
        for _ in range(completions):
            paths.append([root, len(lens)])
            lens.append(completion_len)
    return prefix_tree(lens, paths)[0]


def check_cases(random_masks: int = 3) -> list[Case]:
    """Every case of the check part: random, named, then CP stage tables."""
    from .kernel_bench import stage_masks

    cases = [Case("random_1000_1024x1024", grid_mask(1024, 1024, 1000, seed=0), 4, 2, 64)]  # issue 20's case
    shapes = [(768, 1280, 300, (1, 32, 64)), (512, 512, 60, (1, 8, 24, 64, 100)), (1024, 640, 400, (16, 32, 48))]
    for n in range(random_masks - 1):
        tq, tk, slices, sizes = shapes[n % len(shapes)]
        cases.append(Case(f"random_{slices}_{tq}x{tk}_s{n + 1}", grid_mask(tq, tk, slices, seed=n + 1, sizes=sizes), 8, 2, 128))
    named = {
        "causal_2048": AttnMaskSpec.causal(2048),
        "varlen_small_docs": varlen([1, 700, 33, 1, 1290, 64, 2004, 3]),
        "varlen_corpus_4096": varlen(sample_pack(4096, rng=0).tolist()),
        "prefix_tree": prefix_tree([1024, 300, 300, 257, 1, 200], [[0, 1], [0, 2], [0, 3, 4], [0, 5]])[0],
        "sliding_window_512": sliding_window([3000, 1096], 512),
    }
    cases += [Case(name, spec, 8, 2, 128) for name, spec in named.items()]
    cases.append(Case("varlen_softcap30", varlen([700, 1348]), 8, 2, 128, softcap=30.0))
    cases += [Case(name, spec, 8, 2, 128, host=name.endswith("_host")) for name, spec in
              stage_masks(cp_sizes=(2, 3, 4), per_rank=1024, chunk=128)]  # fmt: skip
    return cases


def packs() -> dict[str, AttnMaskSpec]:
    """Issue 20's packs, in its order."""
    return {
        "32k_chat_39_docs": varlen(chat_pack()),
        "64k_11_docs_one_39k": varlen(one_long_document(65536, 39000, others=2653)),
        "57k_tree_4x8": tree_forest(),
        "128k_one_100k": varlen(one_long_document(131072, 100000)),
        "256k_one_200k": varlen(one_long_document(262144, 200000)),
    }


# --------------------------------------------------------------------------- judging
def dense_attention(q, k, v, mask: torch.Tensor, scale: float, softcap: float, dtype: torch.dtype):
    """Dense attention computed in ``dtype`` (float64: the truth; 16-bit: the reference whose own error
    scales the bound). Rows without keys give out 0 and lse -inf. Differentiable."""
    g = q.shape[1] // k.shape[1]
    qd, kd, vd = q.to(dtype), k.to(dtype).repeat_interleave(g, 1), v.to(dtype).repeat_interleave(g, 1)
    s = torch.einsum("qhd,khd->hqk", qd, kd) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    has = mask.any(1)
    s = s.masked_fill(~mask, float("-inf")).masked_fill(~has[:, None], 0.0)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]) * mask
    out = torch.einsum("hqk,khd->qhd", p, vd)
    return out, lse.masked_fill(~has, float("-inf")).t()


def dense_results(q, k, v, do, mask, scale: float, softcap: float, dtype: torch.dtype) -> dict:
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    out, lse = dense_attention(*leaves, mask, scale, softcap, dtype)
    grads = torch.autograd.grad(out, leaves, do.to(dtype), allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]
    return dict(zip(TENSORS, (out.detach(), lse.detach(), *grads)))


def rel_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    """Relative Frobenius error over finite entries of the truth (lse is -inf on rows without keys)."""
    finite = torch.isfinite(truth)
    a, b = x.double()[finite], truth.double()[finite]
    denom = float(b.norm())
    num = float((a - b).norm())
    return num / denom if denom > 0 else num


def judge(got: dict, truth: dict, ref_err: dict, dtype: torch.dtype, has_keys: torch.Tensor) -> dict:
    """Per tensor: error, bound, pass; and the structural checks (NaN, rows without keys)."""
    res, problems = {}, []
    for t in TENSORS:
        err = rel_err(got[t], truth[t])
        bound = 2 * ref_err[t] + FLOOR[dtype]
        res[t] = {"err": err, "ref_err": ref_err[t], "bound": bound, "ok": bool(err <= bound)}
        if not res[t]["ok"]:
            problems.append(f"{t} err {err:.3g} > {bound:.3g}")
        if torch.isnan(got[t]).any():
            problems.append(f"{t} has NaN")
    empty = ~has_keys
    if empty.any():
        if not torch.isneginf(got["lse"][empty]).all():
            problems.append("lse not -inf on rows without keys")
        if (got["out"][empty] != 0).any():
            problems.append("out not 0 on rows without keys")
    return {"tensors": res, "problems": problems, "ok": not problems}


# --------------------------------------------------------------------------- measuring
def tensor_bytes(*xs: torch.Tensor) -> int:
    return sum(x.numel() * x.element_size() for x in xs)


def run_contract(backend, spec: AttnMaskSpec, q, k, v, do, scale: float, softcap: float, grad_dtype, measure: bool):
    """Forward then backward through the backend contract; with ``measure``, a warm-up call first and
    the measured call's extra peak device memory (peak minus what was allocated before and its outputs)."""
    prep = backend.prepare(spec.table, spec.total_seqlen, spec.total_seqlen_k, q.device)

    def call():
        out, lse = backend.forward(q, k, v, prep, scale, softcap)
        return (out, lse, *backend.backward(do, q, k, v, out, lse, prep, scale, softcap, grad_dtype))

    if not measure:
        return call(), prep, None
    call()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    res = call()
    torch.cuda.synchronize()
    return res, prep, torch.cuda.max_memory_allocated() - base - tensor_bytes(*res)


def check_case(case: Case, backends: list[str], dtypes: list[torch.dtype], device: str) -> list[dict]:
    """One case through every backend and dtype: records with errors, bounds, memory and refusals."""
    spec, out = case.spec, []
    tq, tk = spec.total_seqlen, spec.total_seqlen_k
    gen = torch.Generator(device=device).manual_seed(0)
    base = [torch.randn(s, generator=gen, device=device) for s in ((tq, case.hq, case.d), (tk, case.hkv, case.d),
                                                                      (tk, case.hkv, case.d), (tq, case.hq, case.d))]  # fmt: skip
    mask = spec.to_dense(device=device)
    has_keys = mask.any(1)
    scale = case.d**-0.5
    for dtype in dtypes:
        q, k, v, do = (x.to(dtype) for x in base)
        truth = dense_results(q, k, v, do, mask, scale, case.softcap, torch.float64)
        ref = dense_results(q, k, v, do, mask, scale, case.softcap, dtype)
        ref_err = {t: rel_err(ref[t], truth[t]) for t in TENSORS}
        del ref
        own = qkv_bytes(tq, tk, heads_q=case.hq, heads_kv=case.hkv, head_dim=case.d, dtype=dtype)
        for name in backends:
            rec = {**case.describe(), "dtype": str(dtype).replace("torch.", ""), "backend": name}
            backend = get_backend(name)
            why = backend.unsupported(q, k, case.softcap)
            if why:
                out.append({**rec, "status": "refused", "why": why})
                continue
            grad_dtype = None if case.host else dtype
            try:
                res, prep, extra = run_contract(backend, spec, q, k, v, do, scale, case.softcap, grad_dtype,
                                                measure=device == "cuda")
            except Exception as e:  # noqa: BLE001 - a crash is a failed check, recorded with its message
                out.append({**rec, "status": "fail", "problems": [f"{type(e).__name__}: {e}"[:400]]})
                continue
            verdict = judge(dict(zip(TENSORS, res)), truth, ref_err, dtype, has_keys)
            predicted = backend.extra_memory_bytes(prep, heads_q=case.hq, heads_kv=case.hkv, head_dim=case.d, dtype=dtype)
            rec.update(status="pass" if verdict["ok"] else "fail", problems=verdict["problems"],
                       tensors=verdict["tensors"], qkv_bytes=own, extra_bytes=extra, predicted_bytes=int(predicted),
                       extra_vs_qkv=None if extra is None else extra / own)  # fmt: skip
            if name == "auto":
                rec["route"] = backend.route(prep, q, k, case.softcap).describe()
            out.append(rec)
    return out


def pack_memory(name: str, spec: AttnMaskSpec, contenders: list[str], flex=None, hq: int = 32, hkv: int = 8,
                d: int = 128) -> list[dict]:  # fmt: skip
    """Extra peak memory of one fwd+bwd per contender on a pack (bf16), beside q/k/v's bytes and the prediction;
    flexcp's results also as relative errors vs Triton's (run first), which catches a silently wrong gradient
    at sizes the dense check cannot reach (cuDNN's padded backward gave a wrong dQ at 256k)."""
    from .kernel_bench import _bhsd, _inputs

    tq = spec.total_seqlen
    q, k, v, do = _inputs(tq, tq, hq, hkv, d)
    own = qkv_bytes(tq, tq, heads_q=hq, heads_kv=hkv, head_dim=d, dtype=q.dtype)
    rows, triton = [], None
    for c in sorted(contenders, key=lambda c: c != "triton"):
        rec = {"pack": name, "tokens": tq, "slices": len(spec.q_ranges), "contender": c, "qkv_gib": own / GIB}
        try:
            if c == "flex":
                rec["extra_gib"] = _flex_memory(flex, spec, q, k, v, do, _bhsd) / GIB
            else:
                backend = get_backend(c)
                res, prep, extra = run_contract(backend, spec, q, k, v, do, d**-0.5, 0.0, q.dtype, measure=True)
                rec["extra_gib"] = extra / GIB
                rec["predicted_gib"] = backend.extra_memory_bytes(prep, heads_q=hq, heads_kv=hkv, head_dim=d, dtype=q.dtype) / GIB
                if c == "triton":
                    triton = res
                elif triton is not None:
                    rec["rel_err_vs_triton"] = {t: rel_err(a, b) for t, a, b in zip(TENSORS, res, triton)}
                if c == "auto":
                    rec["route"] = backend.route(prep, q, k, 0.0).describe()
                del res
        except Exception as e:  # noqa: BLE001 - recorded (an OOM is a result here), the next contender runs
            rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        torch.cuda.empty_cache()
        rows.append(rec)
    return rows


def _flex_memory(flex, spec: AttnMaskSpec, q, k, v, do, bhsd) -> int:
    """FlexAttention's extra peak bytes of one fwd+bwd (its block mask built beforehand)."""
    bm = flex.block_mask(flex_mask(spec), spec.total_seqlen, q.device)
    leaves = [bhsd(x).requires_grad_() for x in (q, k, v)]
    do4 = bhsd(do)

    def call():
        out = flex(*leaves, bm)
        out.backward(do4)
        return out

    call()
    for x in leaves:
        x.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = call()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base - tensor_bytes(out, *(x.grad for x in leaves))


def flex_mask(spec: AttnMaskSpec):
    """FlexAttention inputs of a causal varlen pack or a prefix forest (node relation: 2 causal self, 1 full ancestor)."""
    from .kernel_bench import REL_SLOTS, FlexMask

    qr, kr, ty = spec.q_ranges, spec.k_ranges, spec.mask_types
    starts = sorted({a for a, _ in qr})
    if len(starts) > REL_SLOTS:
        raise ValueError(f"{len(starts)} nodes; FlexAttention's relation table holds {REL_SLOTS}")
    index = {a: n for n, a in enumerate(starts)}
    node = np.zeros(spec.total_seqlen, dtype=np.int32)
    for (a, b) in qr:
        node[a:b] = index[a]
    rel = np.zeros((REL_SLOTS, REL_SLOTS), dtype=np.int8)
    for (a, _), (c, _), t in zip(qr, kr, ty):
        rel[index[a], index[c]] = 2 if str(getattr(t, "value", t)) == "causal" else 1
    return FlexMask(node, rel, spec.total_seqlen + 1)


def chat_speed(spec: AttnMaskSpec, flex, rep_ms: int = 300) -> dict:
    """fwd+bwd ms of auto and FlexAttention on the chat pack (kernel_bench's method) and their ratio."""
    from .kernel_bench import run_case

    row = run_case("varlen", spec, flex_mask(spec), 32, 8, 128, ["auto", "flex"], rep_ms, flex)
    auto_ms, flex_ms = row.ms["auto"][1], row.ms["flex"][1]
    return {"auto_fwdbwd_ms": auto_ms, "flex_fwdbwd_ms": flex_ms, "speedup_vs_flex": flex_ms / auto_ms,
            "target": 1.2, "route": row.route, "err_vs_flex": row.err_vs_flex}  # fmt: skip


# --------------------------------------------------------------------------- reports
def environment(device: str) -> dict:
    """The card and versions (kernel_bench's, plus cuDNN's frontend and backend and the graph cache's builds)."""
    if device != "cuda":
        return {"device": device, "torch": torch.__version__}
    from .kernel_bench import environment as card

    env = card()
    try:
        import cudnn

        env.update(cudnn_backend=int(cudnn.backend_version()), cudnn_frontend=getattr(cudnn, "__version__", "?"))
        env["cudnn_graph_cache"] = asdict(get_backend("cudnn").graphs.stats)
        env["cudnn_refused"] = dict(get_backend("cudnn").refused)  # signatures cuDNN would not build (ran on Triton)
    except ImportError as e:
        env["cudnn_frontend"] = f"not importable: {e}"
    return env


def summarize(records: list[dict]) -> dict:
    """Counts per backend x dtype: pass, fail, refused, skipped; the worst error/bound ratio; max extra memory."""
    out: dict = {}
    for r in records:
        s = out.setdefault(f"{r['backend']}/{r['dtype']}", {"pass": 0, "fail": 0, "refused": 0, "skipped": 0,
                                                            "worst_err_over_bound": 0.0, "max_extra_vs_qkv": 0.0})  # fmt: skip
        s[r["status"]] += 1
        for t in r.get("tensors", {}).values():
            s["worst_err_over_bound"] = max(s["worst_err_over_bound"], t["err"] / t["bound"])
        if r.get("extra_vs_qkv") is not None:
            s["max_extra_vs_qkv"] = max(s["max_extra_vs_qkv"], r["extra_vs_qkv"])
    return out


def markdown(summary: dict, records: list[dict], pack_rows: list[dict], speed: dict | None) -> str:
    """The summary, the failures, the check's memory per case (bf16), the packs' memory and the chat pack's speed."""
    lines = ["| backend/dtype | pass | fail | refused | skipped | worst err/bound | max extra / qkv |", "|---|---|---|---|---|---|---|"]
    for key, s in sorted(summary.items()):
        lines.append(f"| {key} | {s['pass']} | {s['fail']} | {s['refused']} | {s['skipped']} | "
                     f"{s['worst_err_over_bound']:.2f} | {s['max_extra_vs_qkv']:.2f} |")  # fmt: skip
    failures = [r for r in records if r["status"] == "fail"]
    if failures:
        lines += ["", "Failures:"] + [f"- {f['case']} {f['backend']} {f['dtype']}: {'; '.join(f['problems'])}" for f in failures]
    measured = [r for r in records if r.get("extra_bytes") is not None and r["dtype"] == "bfloat16"]
    if measured:
        names = list(dict.fromkeys(r["backend"] for r in measured))
        lines += ["", "Extra peak memory per fwd+bwd call / q,k,v bytes (bf16), measured (predicted):", "",
                  "| case | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]  # fmt: skip
        for case in dict.fromkeys(r["case"] for r in measured):
            by = {r["backend"]: r for r in measured if r["case"] == case}
            cells = [f"{by[n]['extra_vs_qkv']:.2f} ({by[n]['predicted_bytes'] / by[n]['qkv_bytes']:.2f})" if n in by else "-"
                     for n in names]  # fmt: skip
            lines.append(f"| {case} | " + " | ".join(cells) + " |")
    if pack_rows:
        names = list(dict.fromkeys(r["contender"] for r in pack_rows))
        lines += ["", "| pack | " + " | ".join(f"{n} extra GiB" for n in names)
                  + " | qkv GiB | auto predicted GiB | max rel err vs triton (auto / cudnn) |", "|---|" + "---|" * (len(names) + 3)]  # fmt: skip
        for pack in dict.fromkeys(r["pack"] for r in pack_rows):
            rows = {r["contender"]: r for r in pack_rows if r["pack"] == pack}

            def cell(n):
                r = rows.get(n)
                return "-" if r is None else r.get("error", "skipped") if "extra_gib" not in r else f"{r['extra_gib']:.2f}"

            def err(n):
                e = rows.get(n, {}).get("rel_err_vs_triton")
                return "-" if not e else f"{max(e.values()):.4f}"

            first = next(iter(rows.values()))
            pred = rows.get("auto", {}).get("predicted_gib")
            lines.append(f"| {pack} | " + " | ".join(cell(n) for n in names) + f" | {first['qkv_gib']:.2f} | "
                         + ("-" if pred is None else f"{pred:.2f}") + f" | {err('auto')} / {err('cudnn')} |")  # fmt: skip
    if speed and "error" not in speed:
        lines += ["", f"32k chat pack fwd+bwd: auto {speed['auto_fwdbwd_ms']:.2f} ms, FlexAttention "
                      f"{speed['flex_fwdbwd_ms']:.2f} ms: {speed['speedup_vs_flex']:.2f}x (target >= 1.2x)"]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flexcp.bench.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("check", "packs", "all"), default="all", help="what to run (default: all)")
    p.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated (default: {','.join(BACKENDS)})")
    p.add_argument("--dtypes", default="bf16,fp16", help="comma-separated of bf16, fp16 (default: bf16,fp16)")
    p.add_argument("--random-masks", type=int, default=3, help="random masks in the check, the first is 1,000 slices (default: 3)")
    p.add_argument("--check-budget-s", type=float, default=240.0,
                   help="start no new check case after this many seconds (default: 240)")
    p.add_argument("--budget-s", type=float, default=420.0, help="start nothing new after this many seconds (default: 420)")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="output folder (default: $OUT, else .)")
    p.add_argument("--cases", default="", help="run only cases whose name contains one of these comma-separated parts")
    p.add_argument("--device", default="cuda", help="cuda (default); cpu runs the check part without memory, for tests")
    p.add_argument("--dry-run", action="store_true", help="list the cases and build every mask; no GPU needed")
    a = p.parse_args(argv)
    backends = [b for b in a.backends.split(",") if b]
    dtypes = [DTYPES[x] for x in a.dtypes.split(",") if x]
    wanted = [x for x in a.cases.split(",") if x]
    cases = check_cases(a.random_masks) if a.part in ("check", "all") else []
    cases = [c for c in cases if not wanted or any(w in c.name for w in wanted)]
    pack_specs = packs() if a.part in ("packs", "all") and a.device == "cuda" else {}
    if a.dry_run:
        for c in cases:
            print(json.dumps(c.describe()))
        for name, spec in pack_specs.items():
            print(json.dumps({"pack": name, "tokens": spec.total_seqlen, "slices": len(spec.q_ranges)}))
        print(f"{len(cases)} check cases x {len(backends)} backends x {len(dtypes)} dtypes; {len(pack_specs)} packs")
        return 0
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA device (use --dry-run to list the cases)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stream = open(out / "gpu_check.jsonl", "w")  # every record as it comes, so a crash keeps what ran

    def log(rec: dict) -> None:
        stream.write(json.dumps(rec, default=str) + "\n")
        stream.flush()
        print(json.dumps({k: v for k, v in rec.items() if k != "tensors"}, default=str), flush=True)

    t0 = time.perf_counter()
    left = lambda budget: budget - (time.perf_counter() - t0)  # noqa: E731
    records: list[dict] = []
    for case in cases:
        if left(a.check_budget_s) <= 0:
            records += [{**case.describe(), "backend": b, "dtype": str(dt).replace("torch.", ""), "status": "skipped"}
                        for b in backends for dt in dtypes]  # fmt: skip
            continue
        try:
            recs = check_case(case, backends, dtypes, a.device)
        except Exception as e:  # noqa: BLE001 - e.g. the dense reference out of memory: this case fails, the rest run
            recs = [{**case.describe(), "backend": b, "dtype": str(dt).replace("torch.", ""), "status": "fail",
                     "problems": [f"case error {type(e).__name__}: {str(e)[:300]}"]} for b in backends for dt in dtypes]  # fmt: skip
        for rec in recs:
            records.append(rec)
            log(rec)
        if a.device == "cuda":
            torch.cuda.empty_cache()
    check_s = time.perf_counter() - t0
    pack_rows: list[dict] = []
    speed = None
    flex = None
    # ours on every pack first (the Done-when memory), then the chat pack's speed, then FlexAttention's memory
    steps = [(name, spec, ["auto", "cudnn", "triton"]) for name, spec in pack_specs.items()]
    steps += [(name, spec, ["flex"]) for name, spec in pack_specs.items() if spec.total_seqlen <= 65536]
    for name, spec, contenders in steps:
        if left(a.budget_s) <= 0:
            pack_rows += [{"pack": name, "tokens": spec.total_seqlen, "contender": c, "qkv_gib": 0.0} for c in contenders]
            continue
        if contenders == ["flex"] and flex is None:
            from .kernel_bench import _Flex

            flex = _Flex()
            chat = next((s for nm, s in pack_specs.items() if nm.startswith("32k_chat")), None)
            if chat is not None:
                try:
                    speed = chat_speed(chat, flex)
                except Exception as e:  # noqa: BLE001 - recorded; FlexAttention's memory still runs
                    speed = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                log(speed)
        for rec in pack_memory(name, spec, contenders, flex):
            pack_rows.append(rec)
            log(rec)
    summary = summarize(records)
    failures = [r for r in records if r["status"] == "fail"]
    report = {"environment": environment(a.device), "argv": sys.argv[1:] if argv is None else argv, "check_s": check_s,
              "total_s": time.perf_counter() - t0, "summary": summary, "records": records, "packs": pack_rows,
              "chat_speed": speed}  # fmt: skip
    stream.close()
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    md = markdown(summary, records, pack_rows, speed)
    refused = report["environment"].get("cudnn_refused")
    if refused:
        md += f"\ncuDNN refused {len(refused)} band signatures (their launches ran on Triton): {refused}\n"
    (out / "gpu_check.md").write_text(md)
    print(md)
    print(f"check {check_s:.0f} s, total {report['total_s']:.0f} s; written to {out}/gpu_check.json and gpu_check.md")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
