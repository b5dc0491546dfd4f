"""End-to-end training throughput of the recipe: a random-init ~1.1B Llama at 32k-128k tokens.

For each attention setup it trains the ``llama-1b`` preset (bf16 compute, FSDP2 over all
GPUs, activation checkpointing) on single causal sequences of each length and reports,
per GPU: tokens/s, model TFLOP/s (6 N T + causal attention area, see
``flexcp.train.metrics``) and peak allocated memory (max over ranks). Setups:

- ``sdpa cp=1``: Hugging Face's SDPA attention, each GPU trains its own sequence (dp = world);
- ``magi cp=1|2|4``: flexcp's attention, each sequence sharded over cp GPUs (dp = world / cp);
- ``native cp=2|4``: torch's ``context_parallel`` (ring attention over causal SDPA, head-tail
  load balancing, see ``flexcp.bench.native_cp``), same sharding of each sequence over cp GPUs.

A step that runs out of memory ends that setup. After the table lengths, ``--probe``
lengths (one untimed-warm-up step each) look for the longest sequence each setup can
train; a probe whose predicted step time (quadratic in length) exceeds ``--probe-max-s``
or the remaining ``--budget-s`` is reported as not run. Setups run largest cp first (the
budget, if anything, cuts the slow cp = 1 runs); the summary adds, per setup, the length
at which peak memory would reach 95% of the card (linear in length from its two longest
runs). One launch measures everything:

    torchrun --nproc_per_node 4 -m flexcp.bench.e2e_bench --out results/e2e

Writes ``<out>/e2e.json`` (after every measurement) and ``<out>/e2e.md``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..runtime import clear_cache
from ..train.config import from_dict
from ..train.data import build_source
from ..train.loop import Trainer, close_distributed
from ..train.metrics import peak_memory_gb
from .native_cp import NativeCPTrainer


def _cfg(impl: str, cp: int, seq_len: int, args: argparse.Namespace) -> dict:
    return {
        "out_dir": str(args.out / "run"),
        "model": {"preset": args.preset, "attn_implementation": impl, "activation_checkpointing": True},
        "data": {"kind": "recall", "seq_len": seq_len},
        "parallel": {"cp": cp, "chunk_size": args.chunk_size},
        "train": {"steps": 1 << 30, "lr": 1e-4, "warmup_steps": 0, "dtype": "fp32" if args.cpu else "bf16"},
        "checkpoint": {"resume": False, "export_hf": False},
        "logging": {"progress": "none"},
    }


def _set_seq_len(trainer: Trainer, seq_len: int) -> None:
    trainer.cfg.data.seq_len = seq_len
    trainer.source = build_source(trainer.cfg, trainer.tokenizer)


def _all_max(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def measure(trainer: Trainer, steps: int, warmup: int) -> dict:
    """Time ``steps`` optimizer steps after ``warmup``; OOM -> ``{"oom": True}`` (on every rank)."""
    dev = trainer.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    oom, times, flops, tokens = False, [], 0.0, 0
    try:
        for i in range(warmup + steps):
            m = trainer.train_step()
            if i >= warmup:
                times.append(m.seconds)
                flops, tokens = flops + m.flops, tokens + m.tokens
    except torch.OutOfMemoryError:
        oom = True
    if _all_max(float(oom), dev):
        return {"oom": True}
    world = dist.get_world_size()
    seconds = _all_max(sum(times), dev)
    return {
        "oom": False,
        "step_s": seconds / steps,
        "tokens_per_s_per_gpu": tokens / seconds / world,
        "tflops_per_gpu": flops / seconds / world / 1e12,
        "peak_gb": _all_max(peak_memory_gb(dev), dev),
    }


def _skip(seq_len: int, args, deadline: float, last: dict | None, probing: bool) -> str | None:
    """Why a length is not measured: the time budget, or (probes) a predicted step time over --probe-max-s."""
    if last is None or not probing:
        return "time budget" if time.monotonic() > deadline else None
    predicted = last["step_s"] * (seq_len / last["seq_len"]) ** 2  # attention dominates at these lengths
    if predicted > args.probe_max_s or time.monotonic() + 2 * predicted > deadline:
        return f"predicted {predicted:.0f} s/step"
    return None


def _build_trainer(impl: str, cp: int, seq_len: int, args) -> Trainer:
    if impl == "native":  # an sdpa cp=1 config, sharded by torch's context_parallel
        return NativeCPTrainer(from_dict(_cfg("sdpa", 1, seq_len, args)), cp)
    return Trainer(from_dict(_cfg(impl, cp, seq_len, args)))


def run_setup(impl: str, cp: int, lengths: list[int], args, deadline: float, log) -> None:
    """Measure one setup over ``lengths`` (table lengths, then probes), ``log`` each row; stop at the first OOM."""
    trainer, last = None, None
    for n, seq_len in enumerate(lengths):
        probing = n >= args.table_lengths
        reason = _skip(seq_len, args, deadline, last, probing)
        if reason is not None:
            log({"impl": impl, "cp": cp, "seq_len": seq_len, "skipped": reason})
            continue
        try:
            if trainer is None:
                trainer = _build_trainer(impl, cp, seq_len, args)
            _set_seq_len(trainer, seq_len)
            res = measure(trainer, 1 if probing else args.steps, 0 if probing else args.warmup)
        except torch.OutOfMemoryError:  # building the model itself
            res = {"oom": True}
        row = {"impl": impl, "cp": cp, "dp": dist.get_world_size() // cp, "seq_len": seq_len, "probe": probing, **res}
        log(row)
        if res["oom"]:
            break
        last = row
    trainer = None  # free this setup's model, optimizer and keys before the next
    clear_cache()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _k(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


IMPL_ORDER = {"sdpa": 0, "magi": 1, "native": 2}


def memory_projection(rows: list[dict], capacity_gb: float | None) -> dict[tuple[str, int], int]:
    """Per setup, the length whose peak memory reaches 95% of the card (linear through its two longest runs)."""
    if not capacity_gb:
        return {}
    out = {}
    for key in {(r["impl"], r["cp"]) for r in rows}:
        ok = sorted((r["seq_len"], r["peak_gb"]) for r in rows
                    if (r["impl"], r["cp"]) == key and not r.get("skipped") and not r["oom"])
        if len(ok) < 2 or ok[-1][0] == ok[-2][0] or ok[-1][1] <= ok[-2][1]:
            continue
        (s0, m0), (s1, m1) = ok[-2], ok[-1]
        out[key] = int(s1 + (0.95 * capacity_gb - m1) * (s1 - s0) / (m1 - m0)) // 1024 * 1024
    return out


def format_table(meta: dict, rows: list[dict]) -> str:
    lines = [f"End-to-end training, {meta['model']}, {meta['world']} x {meta['device']}, {meta['dtype']}, "
             f"activation checkpointing, torch {meta['torch']}, {meta['date']}", "",
             "| attention | cp | dp | seq len | tokens/s per GPU | TFLOP/s per GPU | peak GiB | step s |",
             "|---|---|---|---|---|---|---|---|"]
    rows = sorted(rows, key=lambda r: (r["cp"], IMPL_ORDER.get(r["impl"], 9), r["seq_len"]))
    for r in rows:
        if r.get("skipped"):
            cells = [f"not run ({r['skipped']})", "-", "-", "-"]
        elif r["oom"]:
            cells = ["OOM", "-", "-", "-"]
        else:
            cells = [f"{r['tokens_per_s_per_gpu']:,.0f}", f"{r['tflops_per_gpu']:.3g}", f"{r['peak_gb']:.1f}",
                     f"{r['step_s']:.2f}"]
        head = [r["impl"], str(r["cp"]), str(r.get("dp", "-")), _k(r["seq_len"])]
        lines.append("| " + " | ".join(head + cells) + " |")
    longest: dict[tuple[str, int], int] = {}
    for r in rows:
        if not r.get("skipped") and not r["oom"]:
            key = (r["impl"], r["cp"])
            longest[key] = max(longest.get(key, 0), r["seq_len"])
    lines += ["", "Longest sequence trained (OOM or time limits the rest, see rows): " + ", ".join(
        f"{impl} cp={cp}: {_k(n)}" for (impl, cp), n in sorted(longest.items()))]
    projected = memory_projection(rows, meta.get("gpu_memory_gb"))
    if projected:
        lines += ["", f"Memory-projected longest sequence (peak memory linear in length from the two longest runs, "
                      f"to 95% of {meta['gpu_memory_gb']:.0f} GiB): " + ", ".join(
                          f"{impl} cp={cp}: ~{_k(n)}" for (impl, cp), n in sorted(projected.items()))]
    if any(r["impl"] == "native" for r in rows):
        lines += ["", "native: torch's context_parallel (ring attention over causal SDPA, head-tail load balancing, "
                      "K/V heads repeated for GQA), flexcp.bench.native_cp"]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="flexcp bench e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[32768, 65536, 131072])
    p.add_argument("--probe", type=int, nargs="*", default=[262144, 524288],
                   help="longer lengths tried with one step each, to find each setup's longest sequence")
    p.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4], help="CP sizes (magi; native too where > 1)")
    p.add_argument("--no-sdpa", action="store_true", help="skip the HF SDPA cp=1 baseline")
    p.add_argument("--native-cp", dest="native_cp", action="store_true", default=True,
                   help="also run torch's native context parallelism at each --cp size > 1 (default)")
    p.add_argument("--no-native", dest="native_cp", action="store_false", help="skip the native CP setups")
    p.add_argument("--preset", default="llama-1b")
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=1, help="timed steps per table length")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--budget-s", type=float, default=240.0, help="no new measurement starts after this")
    p.add_argument("--probe-max-s", type=float, default=30.0, help="skip a probe whose predicted step is longer")
    p.add_argument("--out", type=Path, default=Path("results/e2e"))
    p.add_argument("--cpu", action="store_true",
                   help="smoke run on CPU with gloo (use --preset tiny and short lengths)")
    args = p.parse_args(argv)
    args.table_lengths = len(args.seq_lens)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("flexcp bench e2e needs CUDA GPUs (launch with torchrun --nproc_per_node N), or --cpu")
    start = time.monotonic()
    # a rank stuck in a collective after another rank's OOM gives up instead of hanging for 10 minutes
    timeout = datetime.timedelta(seconds=300)
    if args.cpu:
        device = torch.device("cpu")
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        dist.init_process_group("gloo", timeout=timeout)
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=timeout)
    world, rank = dist.get_world_size(), dist.get_rank()
    name = "CPU" if args.cpu else torch.cuda.get_device_name(device)
    capacity = None if args.cpu else torch.cuda.get_device_properties(device).total_memory / 2**30
    meta = {"model": f"preset {args.preset}", "world": world, "device": name, "gpu_memory_gb": capacity,
            "dtype": "fp32" if args.cpu else "bf16", "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "argv": argv}
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def log(row: dict) -> None:
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
            (args.out / "e2e.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))

    if args.native_cp and args.cpu and rank == 0:
        print("native CP skipped on --cpu: torch's context_parallel runs only the CUDA SDPA kernels", flush=True)
    native = args.native_cp and not args.cpu
    setups = [] if args.no_sdpa else [("sdpa", 1)]
    for cp in (cp for cp in args.cp if world % cp == 0):  # magi cp=N next to native cp=N
        setups += [("magi", cp)] + ([("native", cp)] if native and cp > 1 else [])
    setups.sort(key=lambda s: (-s[1], s[0] == "sdpa"))  # largest cp first: the budget cuts the cp = 1 runs
    lengths = sorted(args.seq_lens) + sorted(args.probe)
    deadline = start + args.budget_s
    try:
        for impl, cp in setups:
            run_setup(impl, cp, lengths, args, deadline, log)
    finally:
        if rank == 0:
            (args.out / "e2e.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
            table = format_table(meta, rows)
            (args.out / "e2e.md").write_text(table)
            print("\n" + table, flush=True)
        close_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
