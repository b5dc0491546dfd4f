"""``flexcp bench reference``: tokens/s and peak memory of the pure-PyTorch reference attention (CPU).

Each (tokens, mask) row runs in a fresh spawned process, so memory numbers do not leak
between rows. Time: one warm-up run, then the fastest of ``--repeats`` runs (the least disturbed
by other work on a shared machine); a row whose warm-up already takes longer than
``--single-run-s`` reports that one run instead. CPU share = process CPU time / wall
time of that run: about the thread count when the row had the cores to itself, lower
when other work competed (so the row's times are pessimistic).
Memory: the process's peak resident set size (``ru_maxrss``) minus its RSS right after
q, k, v were built, i.e. what attention adds at its high-water mark (scores of one tile,
autograd's saved tensors, gradients; freed-but-kept heap pages count too). Forward rows
run under ``no_grad``; forward+backward rows backpropagate a random ``dout``. GFLOP/s
count the mask's true area: fwd = 4 * area * hq * d, fwd+bwd = 3.5x that.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import resource
import shlex
import sys
import time
from pathlib import Path

import torch

from ..clihelp import new_parser
from ..kernels import attention, get_backend
from ..mask import AttnMaskSpec, causal, varlen
from .docdist import sample_pack
from .common import cpu_name

MASKS = ("causal", "varlen")


def build_spec(mask: str, tokens: int, seed: int) -> tuple[AttnMaskSpec, int]:
    """The benchmark mask and its document count (varlen: a corpus-histogram pack, docs <= half the pack)."""
    if mask == "causal":
        return causal(tokens), 1
    if mask == "varlen":
        lengths = sample_pack(tokens, rng=seed, max_doc_frac=0.5)
        return varlen(lengths.tolist()), len(lengths)
    raise ValueError(f"mask={mask!r} is unknown; choose from {MASKS}")


def _rss_bytes() -> int:
    """Current resident set size (Linux /proc; elsewhere the peak so far, which overstates it)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return _peak_rss_bytes()


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _load_average() -> float:
    """1-minute load average (other work on the machine slows every row; -1 where unknown)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return -1.0


def _run_once(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _timed(fn, repeats: int, single_run_s: float) -> tuple[float, float, int]:
    """(wall s, CPU share, timed runs): the fastest run after a warm-up, or the warm-up alone if it is slow."""
    first = _run_once(fn)
    runs = [first] if first[0] > single_run_s else [_run_once(fn) for _ in range(repeats)]
    wall, cpu = min(runs)
    return wall, cpu / wall, len(runs)


def measure(cfg: dict) -> dict:
    """Run one row (in the current process): forward, then forward+backward."""
    torch.set_num_threads(cfg["threads"])
    spec, docs = build_spec(cfg["mask"], cfg["tokens"], cfg["seed"])
    spec.validate()
    gen = torch.Generator().manual_seed(cfg["seed"])
    t, hq, hkv, d = cfg["tokens"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    q = torch.randn(t, hq, d, generator=gen, requires_grad=True)
    k = torch.randn(t, hkv, d, generator=gen, requires_grad=True)
    v = torch.randn(t, hkv, d, generator=gen, requires_grad=True)
    dout = torch.randn(t, hq, d, generator=gen)
    base = _rss_bytes()

    def forward() -> None:
        with torch.no_grad():
            attention(q, k, v, spec, backend="reference")

    def forward_backward() -> None:
        out, _ = attention(q, k, v, spec, backend="reference")
        torch.autograd.grad(out, (q, k, v), dout)

    fwd_s, fwd_cpu, fwd_runs = _timed(forward, cfg["repeats"], cfg["single_run_s"])
    fwd_peak = _peak_rss_bytes() - base
    both_s, both_cpu, both_runs = _timed(forward_backward, cfg["repeats"], cfg["single_run_s"])
    both_peak = _peak_rss_bytes() - base  # >= the forward's peak: fwd+bwd runs a forward too
    flops = 4.0 * spec.area() * hq * d
    return {
        **cfg,
        "docs": docs,
        "area": spec.area(),
        "input_bytes": sum(x.numel() * x.element_size() for x in (q, k, v, dout)),
        "fwd_s": fwd_s,
        "fwd_runs": fwd_runs,
        "fwd_cpu_share": fwd_cpu,
        "fwd_peak_bytes": max(fwd_peak, 0),
        "fwd_gflops": flops / fwd_s / 1e9,
        "fwdbwd_s": both_s,
        "fwdbwd_runs": both_runs,
        "fwdbwd_cpu_share": both_cpu,
        "fwdbwd_peak_bytes": max(both_peak, 0),
        "fwdbwd_gflops": 3.5 * flops / both_s / 1e9,
    }


def _tokens_label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def format_report(meta: dict, rows: list[dict]) -> str:
    """Markdown: one header line per fact, then the table."""
    mib = 1 << 20
    lines = [
        f"Machine: {meta['cpu']} ({meta['cores']} cores, {meta['threads']} torch threads), "
        f"Python {meta['python']}, torch {meta['torch']}. Date: {meta['date']}. Command: `{meta['command']}`. "
        f"Load average (1 min) before/after: {meta['load_before']:.1f} / {meta['load_after']:.1f}.",
        "",
        f"Reference backend (tiles {meta['block']}x{meta['block']}), float32, hq={meta['heads']}, "
        f"hkv={meta['kv_heads']}, d={meta['head_dim']}. Time: fastest of {meta['repeats']} runs after a warm-up "
        f"(a warm-up over {meta['single_run_s']:g} s is the one timed run; runs column, fwd / fwd+bwd). "
        f"CPU share: CPU time / wall time of that run, fwd / fwd+bwd (about {meta['threads']} when the row had "
        "the cores to itself). Peak MiB: peak RSS above the RSS after the inputs were built. "
        "dense MiB = one float32 score matrix [hq, S, S], for scale.",
        "",
        "| tokens | mask | docs | fwd s | fwd tok/s | fwd GFLOP/s | fwd peak MiB | fwd+bwd s | fwd+bwd tok/s "
        "| fwd+bwd GFLOP/s | fwd+bwd peak MiB | CPU share | runs | dense MiB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        dense = r["heads"] * r["tokens"] ** 2 * 4 / mib
        cells = [
            _tokens_label(r["tokens"]),
            r["mask"],
            str(r["docs"]),
            f"{r['fwd_s']:.2f}",
            f"{r['tokens'] / r['fwd_s']:,.0f}",
            f"{r['fwd_gflops']:.1f}",
            f"{r['fwd_peak_bytes'] / mib:,.0f}",
            f"{r['fwdbwd_s']:.2f}",
            f"{r['tokens'] / r['fwdbwd_s']:,.0f}",
            f"{r['fwdbwd_gflops']:.1f}",
            f"{r['fwdbwd_peak_bytes'] / mib:,.0f}",
            f"{r['fwd_cpu_share']:.1f} / {r['fwdbwd_cpu_share']:.1f}",
            f"{r['fwd_runs']} / {r['fwdbwd_runs']}",
            f"{dense:,.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("flexcp bench reference", "Speed (tokens/s) and peak memory of the pure-PyTorch reference attention on\n"
                        "the CPU; each row runs in its own process. Numbers: docs/benchmarks.md.")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 32768], help="sequence lengths")
    parser.add_argument("--masks", nargs="+", choices=MASKS, default=list(MASKS), help="mask families")
    parser.add_argument("--heads", type=int, default=2, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=1, help="key/value heads (GQA)")
    parser.add_argument("--head-dim", type=int, default=64, help="channels per head")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up")
    parser.add_argument("--single-run-s", type=float, default=10.0, help="time a row once if its warm-up is slower")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    meta = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": args.threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "command": shlex.join(["flexcp", "bench", "reference", *(sys.argv[1:] if argv is None else argv)]),
        "block": get_backend("reference").block_q,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "repeats": args.repeats,
        "single_run_s": args.single_run_s,
        "load_before": _load_average(),
    }
    keys = ("heads", "kv_heads", "head_dim", "repeats", "single_run_s", "threads", "seed")
    cfgs = [{"tokens": t, "mask": m, **{k: getattr(args, k) for k in keys}} for t in args.tokens for m in args.masks]
    rows = []
    ctx = mp.get_context("spawn")
    for cfg in cfgs:
        with ctx.Pool(1) as pool:  # a fresh process per row: ru_maxrss is a per-process high-water mark
            rows.append(pool.apply(measure, (cfg,)))
        print(f"done: {cfg['tokens']} tokens, {cfg['mask']}", file=sys.stderr)
    meta["load_after"] = _load_average()
    print(format_report(meta, rows))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        print(f"\nwrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
