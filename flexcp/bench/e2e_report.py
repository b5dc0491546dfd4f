"""The end-to-end benchmark's outputs from its rows: markdown tables, summary lines, the PNG plot.

``write_outputs`` writes ``e2e.md`` and ``e2e.png`` (matplotlib; without it the markdown says
the plot was not drawn) and returns the markdown. ``flexcp bench e2e --replot e2e.json``
redraws both from a saved JSON.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .e2e_workloads import WORKLOAD_PRESET, WORKLOADS
NOTES = {
    "native": "native = torch's context_parallel (ring attention over causal SDPA): it trains each pack as ONE "
              "causal sequence (documents attend across their boundaries: not the same training), so its "
              "attention cells are the whole causal triangle",
    "magi-unshared": "magi-unshared = the same rollouts without prefix sharing: prompt + completion per document "
                     "(the prompt is stored and computed once per completion)",
    "sdpa": "sdpa = HF's SDPA; on packs and windows HF hands it a dense S x S mask (it computes every cell)",
}


def unit(meta: dict) -> str:
    """What the per-device figures are per: a GPU, or a CPU process (``--cpu``)."""
    return "GPU" if meta.get("gpu_memory_gib") else "process"


def model_name(workload: str, meta: dict) -> str:
    """The model a workload trained: its 1B preset, or the tiny stand-in of a ``--tiny`` run."""
    preset = WORKLOAD_PRESET[workload]
    return f"tiny {preset.split('-')[0]}" if meta.get("tiny") else preset


def workload_title(workload: str, rows: list[dict], meta: dict) -> str:
    """A workload's title, from what ran (window, completions, model)."""
    if workload == "sliding":
        windows = sorted({r["window"] for r in table_rows(rows) if r["workload"] == "sliding" and r.get("window")})
        return f"sliding window {'/'.join(map(str, windows)) or '?'} ({model_name(workload, meta)})"
    return {"packed": "packed documents (corpus lengths)",
            "rollouts": f"shared-prefix rollouts (1 prompt, {meta.get('completions', 8)} completions)",
            "causal": "one causal sequence"}[workload]


def models_line(rows: list[dict], meta: dict) -> str:
    """The model each workload that ran trained on (the sliding one with its window)."""
    ran = [w for w in WORKLOADS if any(r["workload"] == w for r in table_rows(rows))]
    return "Models: " + "; ".join(workload_title(w, rows, meta) if w == "sliding" else f"{w}: {model_name(w, meta)}"
                                  for w in ran)


def progress_line(row: dict, meta: dict) -> str:
    """One line for a finished point or probe step, as the benchmark runs."""
    if row.get("probe"):
        head = f"{'with' if row['offload'] else 'without'} offloading, {_k(row['seq_len'])} tokens: "
        return head + (_status(row) or f"trains, peak {_num(row.get('peak_gib'), '.1f')} GiB, {row['step_s']:.1f} s/step")
    head = f"{row['workload']}, {row['contender']}, cp={row['cp']}, {_k(row['size'])} tokens: "
    status = _status(row)
    if status:
        return head + status
    return (head + f"{row['step_s']:.2f} s/step, {row['tokens_per_s_per_gpu']:,.0f} tokens/s per {unit(meta)}, "
            f"loss {row['loss']:.4f}")


def _k(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else f"{n:,}"


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _status(r: dict) -> str | None:
    if r.get("skipped"):
        return f"not run ({r['skipped']})"
    if r.get("oom"):
        return "OOM"
    if r.get("error"):
        return f"error: {r['error'][:120]}"
    return None


def table_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if not r.get("probe")]


def probe_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("probe")]


def format_table(rows: list[dict], per: str = "GPU") -> str:
    """The throughput table, one row per (workload, contender, cp, size); ``per``: what the rates are per."""
    head = ["workload", "contender", "cp", "S", "tokens/seq", "docs", "label tokens", "attn cells (x mask)",
            "step s", f"tokens/s per {per}", f"label tok/s per {per}", f"TFLOP/s per {per}", "peak GiB",
            "loss (step 1)", "timed steps"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table_rows(rows):
        launch = f" (launch {r['launch']})" if r.get("launch", 1) != 1 else ""  # rows merged from another launch
        cells = [r["workload"], r["contender"] + launch, str(r["cp"]), _k(r["size"])]
        status = _status(r)
        if "tokens" in r:
            ratio = r["attn_cells"] / max(r["useful_area"], 1)
            cells += [f"{r['tokens']:,}", str(r["docs"]), f"{r['label_tokens']:,}",
                      f"{r['attn_cells'] / 1e9:.2f}G ({ratio:.2f}x)"]
        else:
            cells += ["-"] * 4
        if status:
            cells += [status] + ["-"] * 6
        else:
            cells += [f"{r['step_s']:.3f}", f"{r['tokens_per_s_per_gpu']:,.0f}",
                      f"{r['label_tokens_per_s_per_gpu']:,.0f}", _num(r.get("useful_tflops_per_gpu"), ".0f"),
                      _num(r.get("peak_gib"), ".1f"), f"{r['loss']:.4f}", str(r["steps"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ok(r: dict) -> bool:
    return "step_s" in r


def speedups(rows: list[dict], per: str = "GPU") -> list[str]:
    """Per workload, cp and size: magi's tokens/s over each other contender's (label tokens/s for rollouts)."""
    by = defaultdict(dict)
    for r in table_rows(rows):
        if _ok(r):
            by[(r["workload"], r["cp"], r["size"])][r["contender"]] = r
    out = []
    for (w, cp, size), group in sorted(by.items()):
        magi = group.get("magi")
        if magi is None or len(group) < 2:
            continue
        key = "label_tokens_per_s_per_gpu" if w == "rollouts" else "tokens_per_s_per_gpu"
        parts = [f"{magi[key] / r[key]:.2f}x {name}" for name, r in group.items() if name != "magi"]
        losses = [r["loss"] for r in group.values()]
        out.append(f"- {w} {_k(size)}, cp={cp}: magi is " + ", ".join(parts)
                   + f" ({'label ' if w == 'rollouts' else ''}tokens/s per {per}); step-1 losses "
                   + ", ".join(f"{name} {r['loss']:.4f}" for name, r in group.items())
                   + f" (spread {max(losses) - min(losses):.1e})")
        shared, unshared = group.get("magi"), group.get("magi-unshared")
        if w == "rollouts" and unshared is not None:
            out.append(f"- rollouts {_k(size)}, cp={cp}: without prefix sharing the same rollouts are "
                       f"{unshared['tokens'] / shared['tokens']:.2f}x the tokens ({unshared['tokens']:,} vs "
                       f"{shared['tokens']:,}, both {shared['label_tokens']:,} label tokens) and "
                       f"{unshared['step_s'] / shared['step_s']:.2f}x the step time ({unshared['step_s']:.2f} s vs "
                       f"{shared['step_s']:.2f} s): " + _time_change(shared["step_s"], unshared["step_s"]))
    return out


def _time_change(shared_s: float, unshared_s: float) -> str:
    """What sharing the prefix does to the step time, in words that stay true when it is slower."""
    if shared_s <= unshared_s:
        return f"the prefix tree saves {1 - shared_s / unshared_s:.0%} of the time"
    return f"the prefix tree costs {shared_s / unshared_s - 1:.0%} more time here"


def format_probe(rows: list[dict], meta: dict) -> str:
    """The longest-sequence probe: its table, the longest length per mode, and where memory goes."""
    probe = probe_rows(rows)
    if not probe:
        return ""
    head = ["offload", "seq len", "result", "peak GiB", "reserved GiB", "at fwd start GiB", "at fwd end GiB",
            "host saved GiB", "step s", "tokens/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in probe:
        status = _status(r)
        cells = ["yes" if r["offload"] else "no", _k(r["seq_len"])]
        if status:
            cells += [status] + ["-"] * 7
        else:
            cells += ["trains", _num(r.get("peak_gib"), ".1f"), _num(r.get("reserved_gib"), ".1f"),
                      f"{r['fwd_start_gib']:.1f}", f"{r['fwd_end_gib']:.1f}", f"{r['host_saved_gib']:.1f}",
                      f"{r['step_s']:.1f}", f"{r['tokens_per_s']:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for offload in (False, True):
        mine = [r for r in probe if r["offload"] == offload]
        fits = [r for r in mine if r.get("fits")]
        if not fits:
            continue
        best = max(fits, key=lambda r: r["seq_len"])
        above = sorted((r for r in mine if r["seq_len"] > best["seq_len"]), key=lambda r: r["seq_len"])
        why = _status(above[0]) if above else "not tried"
        lines.append(f"- {'with' if offload else 'without'} activation offloading: longest sequence that trains "
                     f"{best['seq_len']:,} tokens (peak {_num(best.get('peak_gib'), '.1f')} GiB"
                     + (f" of {meta['gpu_memory_gib']:.0f}" if meta.get("gpu_memory_gib") else "")
                     + f", {best['step_s']:.1f} s/step); next length "
                     + (f"{above[0]['seq_len']:,}: {why}" if above else why))
        state = best["fwd_start_gib"]
        saved = best["fwd_end_gib"] - state
        work = best.get("peak_gib", best["fwd_end_gib"]) - best["fwd_end_gib"]
        per_tok = lambda gib: gib * 2**30 / best["seq_len"] / 1024  # noqa: E731
        lines.append(f"  - at {best['seq_len']:,}: model + optimizer state {state:.1f} GiB; activations saved by the "
                     f"forward {saved:.1f} GiB on the GPU ({per_tok(saved):.0f} KiB/token)"
                     + (f" and {best['host_saved_gib']:.1f} GiB on the host ({per_tok(best['host_saved_gib']):.0f} "
                        "KiB/token)" if offload else "")
                     + f"; backward working set (one layer's recomputation, its gradients, the parameter "
                       f"gradients) {work:.1f} GiB ({per_tok(work):.0f} KiB/token)")
    return "\n".join(lines)


def plot(rows: list[dict], meta: dict, path: Path) -> bool:
    """tokens/s per GPU (or CPU process) against sequence length, one panel per workload (+ the probe's peak memory)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    series = defaultdict(list)
    for r in table_rows(rows):
        if _ok(r):
            key = "label_tokens_per_s_per_gpu" if r["workload"] == "rollouts" else "tokens_per_s_per_gpu"
            series[(r["workload"], f"{r['contender']} cp={r['cp']}")].append((r["size"], r[key]))
    workloads = [w for w in WORKLOADS if any(k[0] == w for k in series)]
    probe = [r for r in probe_rows(rows) if r.get("fits")]
    panels = len(workloads) + (1 if probe else 0)
    if not panels:
        return False
    cols = min(3, panels)
    fig, axes = plt.subplots(-(-panels // cols), cols, figsize=(5.2 * cols, 4.0 * -(-panels // cols)), squeeze=False)
    flat = list(axes.flat)
    colors = {label: f"C{i}" for i, label in enumerate(sorted({k[1] for k in series}))}  # one per contender
    for ax, w in zip(flat, workloads):
        sizes = set()
        for (sw, label), pts in sorted(series.items()):
            if sw == w:
                xs, ys = zip(*sorted(pts))
                sizes.update(xs)
                ax.plot(xs, ys, marker="o", label=label, color=colors[label])
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(sizes), [_k(n) for n in sorted(sizes)])
        ax.minorticks_off()
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(f"{'label ' if w == 'rollouts' else ''}tokens/s per {unit(meta)}")
        ax.set_title(workload_title(w, rows, meta), fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    if probe:
        ax = flat[len(workloads)]
        for offload in (False, True):
            pts = sorted((r["seq_len"], r.get("peak_gib", 0.0)) for r in probe if r["offload"] == offload)
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", label="offload to host" if offload else "no offload")
        if meta.get("gpu_memory_gib"):
            ax.axhline(meta["gpu_memory_gib"], color="grey", ls="--", label="GPU memory")
            ooms = [r["seq_len"] for r in probe_rows(rows) if r.get("oom")]
            if ooms:
                ax.plot(ooms, [meta["gpu_memory_gib"]] * len(ooms), "rx", ms=9, label="out of memory")
        ax.xaxis.set_major_locator(matplotlib.ticker.MultipleLocator(131072))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1024:.0f}k"))
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel("peak GiB")
        ax.set_title(f"longest sequence one {unit(meta)} trains ({model_name('packed', meta)})", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in flat[panels:]:
        ax.set_visible(False)
    fig.suptitle(f"flexcp end-to-end, {meta['world']} x {meta['device']}, {meta['date']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_outputs(meta: dict, rows: list[dict], out: Path) -> str:
    """Write ``e2e.md`` and ``e2e.png`` under ``out``; return the markdown."""
    drew = plot(rows, meta, out / "e2e.png")
    used = {r["contender"] for r in table_rows(rows)}
    parts = [f"End-to-end training, {meta['world']} x {meta['device']}, {meta['dtype']}, activation checkpointing, "
             f"chunked loss, torch {meta['torch']}, transformers {meta['transformers']}, {meta['date']}", "",
             models_line(rows, meta), "",
             format_table(rows, unit(meta)), "", *speedups(rows, unit(meta)),
             *(f"- {NOTES[c]}" for c in NOTES if c in used)]
    probe = format_probe(rows, meta)
    if probe:
        cut = meta.get("probe_doc_len", "?")
        parts += ["", f"Longest sequence one {unit(meta)} trains ({model_name('packed', meta)}, magi, packs of "
                  f"documents cut to {cut} tokens):", "", probe]
    parts += ["", f"plot: {'e2e.png' if drew else 'not drawn (matplotlib is not installed)'}"]
    text = "\n".join(parts) + "\n"
    (out / "e2e.md").write_text(text)
    return text
