"""Dispatch solver report: load imbalance of each solver on real packed batches, and planning time.

Packs are drawn from the corpus document-length histogram (``flexcp.bench.docdist``) and
masked varlen-causal. For every pack length and CP size the table shows the mean and
worst imbalance (max rank workload / mean) over ``--packs`` packs per solver, and the
median time of ``build_plan`` with the default solver. A second table times planning of
a 1M-token batch at large CP (fresh spec each repeat: slice table, validation,
workloads and solver are all inside the timing).

Run: ``flexcp bench solver`` or ``python -m flexcp.bench.solver_report [--json PATH]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from ..clihelp import new_parser
from ..sharding import DEFAULT_CHUNK_SIZE, SOLVERS, build_plan
from ..mask import varlen
from .common import cpu_name
from .docdist import sample_doc_lengths, sample_pack

SOLVER_ORDER = list(SOLVERS)  # greedy (default), lpt, zigzag, contiguous


def _timed_plan(lengths: np.ndarray, cp: int, chunk_size: int, solver: str) -> tuple[float, float]:
    """(milliseconds, imbalance) of build_plan on a freshly built spec."""
    spec = varlen(lengths.tolist())
    start = time.perf_counter()
    plan = build_plan(spec, cp, chunk_size, solver)
    return (time.perf_counter() - start) * 1e3, plan.imbalance


def imbalance_rows(pack_lens: list[int], cps: list[int], packs: int, chunk_size: int, max_doc_frac: float) -> list[dict]:
    """One row per (pack length, cp): per-solver mean/max imbalance and greedy planning time."""
    rows = []
    for pack_len in pack_lens:
        batches = [sample_pack(pack_len, rng=seed, max_doc_frac=max_doc_frac) for seed in range(packs)]
        for cp in cps:
            row = {"tokens": pack_len, "cp": cp, "docs_mean": float(np.mean([len(b) for b in batches]))}
            for solver in SOLVER_ORDER:
                runs = [_timed_plan(b, cp, chunk_size, solver) for b in batches]
                ms, imb = np.array(runs).T
                row[solver] = {"mean": float(imb.mean()), "max": float(imb.max()), "ms_median": float(np.median(ms))}
            rows.append(row)
    return rows


def timing_rows(tokens: int, cps: list[int], chunk_size: int, repeats: int) -> list[dict]:
    """build_plan time for ``tokens`` tokens: a corpus pack and a pack of 2,000 documents."""
    corpus = sample_pack(tokens, rng=0, max_doc_frac=0.5)
    raw = sample_doc_lengths(2000, rng=0).astype(np.float64)
    docs2k = np.floor(raw / raw.sum() * tokens).astype(np.int64)  # 2,000 corpus-shaped docs scaled to fill
    docs2k[: tokens - docs2k.sum()] += 1
    rows = []
    for name, lengths in (("corpus pack", corpus), ("2,000 documents", docs2k)):
        for cp in cps:
            _timed_plan(lengths, cp, chunk_size, "greedy")  # warm-up
            runs = np.array([_timed_plan(lengths, cp, chunk_size, "greedy") for _ in range(repeats)])
            rows.append(
                {
                    "batch": name,
                    "tokens": tokens,
                    "docs": len(lengths),
                    "cp": cp,
                    "ms_median": float(np.median(runs[:, 0])),
                    "ms_max": float(runs[:, 0].max()),
                    "imbalance": float(runs[0, 1]),
                }
            )
    return rows


def format_report(meta: dict, imbalance: list[dict], timing: list[dict]) -> str:
    """Markdown tables for docs/benchmarks.md."""
    lines = [
        f"Machine: {meta['cpu']} ({meta['cores']} cores), Python {meta['python']}, numpy {meta['numpy']}. "
        f"Date: {meta['date']}. Command: `{meta['command']}`.",
        "",
        f"Imbalance = max rank workload / mean, mean and worst over {meta['packs']} packs per row "
        f"(varlen causal, chunk_size={meta['chunk_size']}, documents capped at "
        f"{meta['max_doc_frac']:g} of the pack); plan ms = median `build_plan` time, default solver.",
        "",
        "| tokens | cp | docs/pack | greedy (default) | lpt | zigzag | contiguous | plan ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in imbalance:
        cells = [f"{r[s]['mean']:.4f} / {r[s]['max']:.4f}" for s in SOLVER_ORDER]
        lines.append(
            f"| {r['tokens'] // 1024}k | {r['cp']} | {r['docs_mean']:.0f} | " + " | ".join(cells) + f" | {r['greedy']['ms_median']:.2f} |"
        )
    lines += [
        "",
        "Planning time of the default solver (fresh spec each run: slice table, validation, workloads, solver):",
        "",
        "| batch | tokens | docs | cp | median ms | max ms | imbalance |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in timing:
        lines.append(
            f"| {r['batch']} | {r['tokens']:,} | {r['docs']:,} | {r['cp']} | {r['ms_median']:.1f} | "
            f"{r['ms_max']:.1f} | {r['imbalance']:.5f} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("flexcp bench solver", "How evenly each dispatch solver spreads the attention work of packed batches\n"
                        "over the CP ranks, and how long planning takes (CPU). Numbers: docs/benchmarks.md.")
    parser.add_argument("--tokens", type=int, nargs="+", default=[32768, 131072], help="pack lengths")
    parser.add_argument("--cp", type=int, nargs="+", default=[2, 4, 8, 16], help="CP sizes")
    parser.add_argument("--packs", type=int, default=20, help="packs per (tokens, cp)")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="dispatch chunk (tokens)")
    parser.add_argument("--max-doc-frac", type=float, default=0.5, help="document cap as a fraction of the pack")
    parser.add_argument("--timing-tokens", type=int, default=1 << 20, help="batch size of the planning-time table")
    parser.add_argument("--timing-cp", type=int, nargs="+", default=[8, 64], help="CP sizes of the planning-time table")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per planning-time row")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    meta = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "date": datetime.date.today().isoformat(),
        "command": shlex.join(["flexcp", "bench", "solver", *(sys.argv[1:] if argv is None else argv)]),
        "packs": args.packs,
        "chunk_size": args.chunk_size,
        "max_doc_frac": args.max_doc_frac,
    }
    imbalance = imbalance_rows(args.tokens, args.cp, args.packs, args.chunk_size, args.max_doc_frac)
    timing = timing_rows(args.timing_tokens, args.timing_cp, args.chunk_size, args.repeats)
    print(format_report(meta, imbalance, timing))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "imbalance": imbalance, "timing": timing}, indent=2))
        print(f"\nwrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
