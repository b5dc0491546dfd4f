"""Tables and plot of the longest-sequence probe (``flexcp.bench.longest``): ``longest.md``, ``longest.png``."""

from __future__ import annotations

import datetime
from pathlib import Path

import torch

from .e2e_memory import host_memory_gib


def meta(args, device: torch.device) -> dict:
    """The machine and the probe's settings, for the JSON and the table's header."""
    import transformers

    gpu = device.type == "cuda"
    return {"device": torch.cuda.get_device_name(device) if gpu else "CPU",
            "gpu_memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30 if gpu else None,
            "host_memory_gib": host_memory_gib(), "torch": torch.__version__, "transformers": transformers.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "attention_backend": "auto", "doc_len": args.doc_len, "mlp_chunk": args.mlp_chunk,
            "budget_s": args.budget_s}


def _len(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1_000_000 else f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _num(row: dict, key: str, fmt: str = "{:.1f}") -> str:
    v = row.get(key)
    return "-" if v is None else fmt.format(v)


def _result(row: dict) -> str:
    if "skipped" in row:
        return f"not run ({row['skipped']})"
    if row.get("oom"):
        return "OOM"
    if "error" in row:
        return "error: " + row["error"][:80]
    return "trains"


def table(rows: list[dict]) -> str:
    """One line per step row: what ran, the result, the memory split and the speed."""
    head = ("| part | model | attention | levers | workload | seq len | result | peak GiB | state | kept | backward "
            "| slack | host GiB | step s | tokens/s |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "seq_len" not in r or r.get("part") in ("build", "2 losses"):
            continue
        out.append(f"| {r['part']} | {r['model']} | {r.get('attention', 'magi')} | {r.get('levers', '-')} | "
                   f"{r.get('workload', '-')} | {_len(r['seq_len'])} | {_result(r)} | {_num(r, 'peak_gib')} | "
                   f"{_num(r, 'state_gib')} | {_num(r, 'kept_gib')} | {_num(r, 'backward_gib')} | "
                   f"{_num(r, 'slack_gib')} | {_num(r, 'offloaded_gib')} | {_num(r, 'step_s')} | "
                   f"{_num(r, 'tokens_per_s', '{:,.0f}')} |")
    return "\n".join(out)


def notes(rows: list[dict]) -> list[str]:
    """The loss comparison and the pack-vs-causal peak ratio, as sentences."""
    out = []
    for r in rows:
        if r.get("part") == "2 losses" and "max_rel_diff" in r:
            out.append(f"- losses over {r['steps']} steps at {_len(r['seq_len'])}, plain vs every lever: "
                       f"{[round(x, 4) for x in r['losses_plain']]} vs {[round(x, 4) for x in r['losses_levers']]}, "
                       f"max relative difference {r['max_rel_diff']:.2e} (within bf16 rounding: {r['within_bf16']})")
        elif r.get("part") == "2 losses":
            out.append(f"- losses: {r.get('skipped') or r.get('error') or 'OOM'}")
    pv = [r for r in rows if r.get("part") == "3 pack vs causal" and "peak_gib" in r]
    if len(pv) == 2:
        pack, causal = (pv[0], pv[1]) if pv[0]["workload"] != "causal" else (pv[1], pv[0])
        ratio = pack["peak_gib"] / causal["peak_gib"]
        out.append(f"- {_len(pack['seq_len'])} pack of {pack.get('docs')} documents peaks at {pack['peak_gib']:.2f} "
                   f"GiB, one causal sequence at {causal['peak_gib']:.2f} GiB: ratio {ratio:.3f}")
    for r in rows:
        if r.get("host_capped"):
            out.append(f"- {r['part']}: {_len(r['target'])} tokens would offload {r['host_need_gib']:.0f} GiB to the "
                       f"host, {r['host_free_gib']:.0f} GiB was free: capped at {_len(r['seq_len'])}")
    return out


def draw(rows: list[dict], path: Path) -> None:
    """Peak GiB against length per (model, attention, levers), OOMs marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[dict]] = {}
    for r in rows:
        if "seq_len" in r and ("peak_gib" in r or r.get("oom")):
            series.setdefault(f"{r['model']} {r.get('attention', 'magi')} {r.get('levers', '')}", []).append(r)
    for name, rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r["seq_len"])
        ok = [r for r in rs if "peak_gib" in r]
        line = ax.plot([r["seq_len"] / 1e6 for r in ok], [r["peak_gib"] for r in ok], "o-", label=name)
        for r in rs:
            if r.get("oom"):
                ax.axvline(r["seq_len"] / 1e6, ls=":", color=line[0].get_color())
    ax.set_xlabel("tokens per sequence (millions)")
    ax.set_ylabel("peak GPU memory (GiB)")
    ax.set_title("Longest sequence on one GPU (dotted: out of memory)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(meta: dict, rows: list[dict], out: Path, plot: bool = True) -> str:
    """``longest.md`` (and ``longest.png``) in ``out``; returns the markdown."""
    md = "\n".join([f"Longest-sequence probe on {meta['device']} ({meta['date']}), torch {meta['torch']}, "
                    f"transformers {meta['transformers']}, attention backend {meta['attention_backend']}, "
                    f"packs of documents up to {meta['doc_len']} tokens, MLP chunk {meta['mlp_chunk']}.", "",
                    table(rows), "", *notes(rows), ""])
    (out / "longest.md").write_text(md)
    if plot:
        try:
            draw(rows, out / "longest.png")
        except ImportError:
            pass
    return md
