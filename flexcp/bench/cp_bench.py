"""``flexcp bench cp``: distributed attention per GPU, flexcp beside all-gather and ring baselines.

For each mask family (causal, varlen-causal packs drawn from the corpus document-length
histogram, a prefix tree of one prompt and its completions, a causal sliding window) and
each CP size, with the same tokens per GPU, it times forward and forward+backward of:

- ``flexcp``: ``build_key`` + ``calc_attn`` (load-balanced dispatch, zero-redundant
  GroupCast / GroupReduce overlapped with compute);
- ``allgather``: all-gather full K/V, same dispatch plan (torch native CP's scheme);
- ``ring``: ring attention over a zigzag sharding (causal masks by default).

All three run the kernel ``flexcp.kernels.select_backend(--kernel, ...)`` returns. Reported
per GPU: TFLOP/s on the mask's true area (fwd = 4 * area * heads * head_dim / cp, fwd+bwd
= 3.5x), the median time over reps of the slowest rank, network bytes received per rank,
the dispatch plan's load imbalance, scaling efficiency against cp = 1 (same tokens per
GPU), and, with ``--check`` (default), the largest difference of every scheme's output and
gradients from flexcp's.

One launch of world size N measures every requested cp <= N on the sub-group of ranks
0..cp-1 while the other ranks wait at a barrier:

    torchrun --nproc_per_node 4 -m flexcp.bench.cp_bench --cp 1 2 4 --out results/cp_bench.json
    torchrun --nproc_per_node 2 -m flexcp.bench.cp_bench --backend gloo --device cpu \\
        --tokens-per-gpu 256 --chunk-size 32 --heads 4 --head-dim 16 --window 64 --dtype fp32
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from ..clihelp import new_parser
from ..sharding import DEFAULT_CHUNK_SIZE, SOLVERS, build_plan
from ..kernels import select_backend
from ..kernels.backend import AttnBackend
from ..mask import AttnMaskSpec, causal, prefix_tree, sliding_window, varlen
from ..runtime import DEFAULT_NUM_STAGES, build_key, calc_attn, clear_cache
from ..runtime.placement import choose_plan
from ..runtime.key import lookup
from .cp_baselines import AllGatherScheme, CpScheme, RingScheme
from .docdist import sample_pack
from .common import cpu_name

MASKS = ("causal", "varlen", "prefix_tree", "sliding_window")
SCHEMES = ("flexcp", "allgather", "ring")  # flexcp first: the others are checked against it
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FWD_BWD_FLOPS = 3.5  # fwd+bwd flops / fwd flops (bwd = 2.5x fwd)


# ------------------------------------------------------------------------------------------ masks


def build_mask(name: str, total: int, args: argparse.Namespace) -> tuple[AttnMaskSpec, dict]:
    """The mask family ``name`` over ``total`` tokens and a description of it for the report."""
    if name == "causal":
        return causal(total), {}
    if name == "varlen":
        lengths = sample_pack(total, rng=args.seed)
        return varlen(lengths.tolist()), {"docs": len(lengths), "longest_doc": int(lengths.max())}
    if name == "prefix_tree":
        prompt = max(1, round(total * args.prompt_frac))
        rest = total - prompt
        if rest < args.completions:
            raise ValueError(
                f"prefix_tree over {total} tokens leaves {rest} for {args.completions} completions; "
                "lower --completions or --prompt-frac, or raise --tokens-per-gpu"
            )
        sizes = np.full(args.completions, rest // args.completions)
        sizes[: rest % args.completions] += 1
        paths = [[0, i + 1] for i in range(args.completions)]
        return prefix_tree([prompt, *sizes.tolist()], paths)[0], {"prompt": prompt, "completions": args.completions}
    if name == "sliding_window":
        return sliding_window([total], args.window), {"window": args.window}
    raise ValueError(f"mask {name!r} is unknown; choose from {MASKS}")


# -------------------------------------------------------------------------------------- schemes


class FlexcpScheme(CpScheme):
    """flexcp's runtime API: ``build_key`` once, ``calc_attn`` per call."""

    name = "flexcp"

    def __init__(self, spec: AttnMaskSpec, group, args: argparse.Namespace, dtype: torch.dtype) -> None:
        self.key = build_key(
            spec, group, num_heads_q=args.heads, num_heads_kv=args.kv_heads, head_dim=args.head_dim,
            chunk_size=args.chunk_size, solver=args.solver, num_stages=args.num_stages,
        )
        entry = lookup(self.key)
        super().__init__(entry.plan, entry.group, args.kv_heads, args.head_dim, dtype)
        self.kernel = args.kernel
        self.casts = entry.state.cast_plans
        self.rank_plan = entry.state.plan

    def attn(self, q, k, v):
        return calc_attn(q, k, v, self.key, backend=self.kernel)

    def recv_bytes(self) -> tuple[int, int]:
        fwd = sum(c.volume(self.kv_row_bytes).bytes_received for c in self.casts)
        grads = sum(c.volume(self.grad_row_bytes).transposed().bytes_received for c in self.casts)
        return fwd, fwd + grads  # the backward re-casts K/V, then reduces dK/dV

    def kernel_slices(self) -> int:
        return len(self.rank_plan.host_table) + sum(len(s.table) for s in self.rank_plan.stages)


def make_scheme(name: str, spec: AttnMaskSpec, group, args, dtype, backend: AttnBackend, device) -> CpScheme:
    if name == "flexcp":
        return FlexcpScheme(spec, group, args, dtype)
    cp = 1 if group is None else dist.get_world_size(group)
    if name == "allgather":  # shards exactly like flexcp (same solver, 'auto' resolved the same way)
        plan = choose_plan(spec, cp, args.chunk_size, args.solver, args.num_stages, args.heads, args.kv_heads)[0]
    else:
        plan = build_plan(spec, cp, args.chunk_size, solver="zigzag")
    cls = AllGatherScheme if name == "allgather" else RingScheme
    return cls(spec.table, plan, group, backend, args.kv_heads, args.head_dim, dtype, device)


# ---------------------------------------------------------------------------------- measurement


def _barrier(group, device: torch.device) -> None:
    if group is not None:
        dist.all_reduce(torch.zeros(1, device=device), group=group)


def _group_max(values: list[float], group, device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


def time_ms(fn: Callable[[], object], warmup: int, reps: int, device: torch.device, group) -> list[float]:
    """Per-rep milliseconds of ``fn`` on the slowest rank of ``group`` (ranks start each rep together)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _barrier(group, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return _group_max(times, group, device)


def _global_inputs(total: int, args, dtype, device) -> list[torch.Tensor]:
    """q, k, v, dout over the whole sequence, identical on every rank (seeded)."""
    g = torch.Generator(device=device).manual_seed(args.seed)
    shapes = [(total, args.heads, args.head_dim), *[(total, args.kv_heads, args.head_dim)] * 2,
              (total, args.heads, args.head_dim)]
    return [torch.randn(s, generator=g, device=device, dtype=dtype) for s in shapes]


def run_case(mask: str, cp: int, group, args, dtype, backend: AttnBackend, device) -> list[dict]:
    """Every scheme on one mask at one cp (called on the group's ranks); rows identical on all of them."""
    total = cp * args.tokens_per_gpu
    spec, info = build_mask(mask, total, args)
    area = spec.area()
    fwd_flops = 4 * area * args.heads * args.head_dim / cp
    inputs = _global_inputs(total, args, dtype, device)
    reference, rows = None, []
    for name in [s for s in SCHEMES if s in args.schemes]:
        if name == "ring" and mask not in args.ring_masks:
            continue
        scheme = make_scheme(name, spec, group, args, dtype, backend, device)
        q, k, v, dout = (scheme.shard(x) for x in inputs)
        q, k, v = (x.requires_grad_() for x in (q, k, v))

        def fwd():
            with torch.no_grad():
                scheme.attn(q, k, v)

        def fwd_bwd():
            out, _ = scheme.attn(q, k, v)
            return torch.autograd.grad(out, (q, k, v), dout)

        fwd_ms = float(np.median(time_ms(fwd, args.warmup, args.reps, device, group)))
        fb_ms = float(np.median(time_ms(fwd_bwd, args.warmup, args.reps, device, group)))
        counts = _group_max([*scheme.recv_bytes(), scheme.kernel_slices()], group, device)
        recv_fwd, recv_fb, slices = (int(x) for x in counts)
        diffs = scale = None
        if args.check:
            out, _ = scheme.attn(q, k, v)
            result = [scheme.unshard(x.detach()) for x in (out, *torch.autograd.grad(out, (q, k, v), dout))]
            if reference is None:
                reference = (name, result)
            else:
                diffs = {
                    what: float((a.float() - b.float()).abs().max())
                    for what, a, b in zip(("out", "dq", "dk", "dv"), result, reference[1])
                }
                scale = {what: float(b.float().abs().max()) for what, b in zip(diffs, reference[1])}
        rows.append({
            "mask": mask, "cp": cp, "scheme": name, "tokens_per_gpu": args.tokens_per_gpu,
            "total_tokens": total, "padded_tokens": scheme.plan.padded_seqlen, "area": area,
            "slices": len(spec), "mask_info": info, "imbalance": scheme.plan.imbalance,
            "fwd_ms": fwd_ms, "fwd_bwd_ms": fb_ms,
            "fwd_tflops": fwd_flops / fwd_ms / 1e9, "fwd_bwd_tflops": FWD_BWD_FLOPS * fwd_flops / fb_ms / 1e9,
            "recv_bytes_fwd": recv_fwd, "recv_bytes_fwd_bwd": recv_fb, "kernel_slices_max": slices,
            "max_abs_diff": diffs, "max_abs_reference": scale, "diff_reference": reference[0] if diffs else None,
        })
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"  {mask} cp={cp} {name}: fwd {fwd_ms:.2f} ms, fwd+bwd {fb_ms:.2f} ms", file=sys.stderr, flush=True)
        del scheme, q, k, v, dout
        clear_cache()
    return rows


def add_efficiency(rows: list[dict]) -> None:
    """Per-GPU TFLOP/s at cp over the same scheme's at cp = 1 (same mask family, same tokens per GPU)."""
    base = {(r["mask"], r["scheme"]): r for r in rows if r["cp"] == 1}
    for r in rows:
        b = base.get((r["mask"], r["scheme"]))
        for m in ("fwd", "fwd_bwd"):
            r[f"{m}_efficiency"] = r[f"{m}_tflops"] / b[f"{m}_tflops"] if b else None


# ---------------------------------------------------------------------------------- reporting


def format_table(meta: dict, rows: list[dict]) -> str:
    """Markdown report: one paragraph of setup, then one table row per (mask, cp, scheme)."""

    def num(x, fmt):
        return "—" if x is None else format(x, fmt)

    def tflops(x):
        return format(x, ".1f" if x >= 1 else ".2g")  # CPU smoke runs are far below 1

    def cells(r):
        d = r["max_abs_diff"]
        return [
            r["mask"], r["cp"], r["scheme"], num(r["imbalance"], ".3f"),
            num(r["fwd_ms"], ".2f"), tflops(r["fwd_tflops"]), num(r["fwd_efficiency"], ".2f"),
            num(r["fwd_bwd_ms"], ".2f"), tflops(r["fwd_bwd_tflops"]), num(r["fwd_bwd_efficiency"], ".2f"),
            num(r["recv_bytes_fwd"] / 2**20, ".1f"), num(r["recv_bytes_fwd_bwd"] / 2**20, ".1f"),
            "ref" if d is None else f"{max(d[w] / max(r['max_abs_reference'][w], 1e-30) for w in d):.1e}",
        ]

    header = ["mask", "cp", "scheme", "imbalance", "fwd ms", "fwd TFLOP/s", "fwd eff", "fwd+bwd ms",
              "fwd+bwd TFLOP/s", "fwd+bwd eff", "MB fwd", "MB fwd+bwd", "diff"]
    lines = [
        f"Card: {meta['card']} x{meta['world_size']}; kernel backend `{meta['kernel_backend']}`; "
        f"torch {meta['torch']}, triton {meta['triton']}; {meta['dtype']}, {meta['heads']} q heads / "
        f"{meta['kv_heads']} kv heads, head dim {meta['head_dim']}; {meta['tokens_per_gpu']:,} tokens per GPU; "
        f"chunk {meta['chunk_size']}; median of {meta['reps']} reps (slowest rank). Date: {meta['date']}. "
        f"Command: `{meta['command']}`.",
        "",
        "TFLOP/s per GPU on the true mask area; eff = per-GPU TFLOP/s / same scheme at cp=1; MB = network "
        "bytes received per rank (max over ranks); diff = max over out, dq, dk, dv of "
        "max|x - flexcp's x| / max|flexcp's x|.",
        "",
        "| " + " | ".join(header) + " |",
        "|---|---:|---|" + "---:|" * (len(header) - 3),
    ]
    lines += ["| " + " | ".join(str(c) for c in cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def _meta(args, argv: list[str], world: int, device: torch.device, label: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    launcher = f"torchrun --nproc_per_node {world} -m flexcp.bench.cp_bench" if world > 1 else "flexcp bench cp"
    return {
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "world_size": world,
        "kernel_backend": label,
        "torch": torch.__version__,
        "triton": triton_version,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": f"{launcher} {shlex.join(argv)}".strip(),
        "dist_backend": dist.get_backend() if dist.is_initialized() else None,
        "dtype": args.dtype, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
        "tokens_per_gpu": args.tokens_per_gpu, "chunk_size": args.chunk_size, "solver": args.solver,
        "num_stages": args.num_stages, "warmup": args.warmup, "reps": args.reps, "seed": args.seed,
    }


# ---------------------------------------------------------------------------------------- setup


def build_parser() -> argparse.ArgumentParser:
    p = new_parser("flexcp bench cp", "Distributed attention, one GPU per rank: flexcp against all-gather and ring\n"
                   "attention, forward and forward+backward, for each mask family and CP size.\n"
                   "Launch: torchrun --nproc_per_node N -m flexcp.bench.cp_bench. Numbers: docs/benchmarks.md.")
    p.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4], help="CP sizes (those <= world size run)")
    p.add_argument("--masks", nargs="+", choices=MASKS, default=list(MASKS), help="mask families")
    p.add_argument("--schemes", nargs="+", choices=SCHEMES, default=list(SCHEMES), help="what to time")
    p.add_argument("--ring-masks", nargs="+", choices=MASKS, default=["causal"], help="masks the ring runs on")
    p.add_argument("--tokens-per-gpu", type=int, default=16384, help="sequence length / CP size")
    p.add_argument("--heads", type=int, default=16, help="query heads")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (GQA); unset: --heads")
    p.add_argument("--head-dim", type=int, default=128, help="channels per head")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="q, k, v dtype")
    p.add_argument("--window", type=int, default=4096, help="sliding window (keys per row, self included)")
    p.add_argument("--prompt-frac", type=float, default=0.25, help="prefix tree: prompt share of the tokens")
    p.add_argument("--completions", type=int, default=8, help="prefix tree: completions sharing the prompt")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="dispatch chunk (tokens)")
    p.add_argument("--solver", choices=["auto", *sorted(SOLVERS)], default="auto",
                   help="flexcp's (and allgather's) sharding; 'auto' as in build_key")
    p.add_argument("--num-stages", type=int, default=DEFAULT_NUM_STAGES, help="flexcp remote stages")
    p.add_argument("--kernel", default="auto", help="single-device backend for every scheme")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    p.add_argument("--reps", type=int, default=5, help="timed runs")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs and packs")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip comparing outputs with flexcp's")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: cuda when available")
    p.add_argument("--backend", choices=["nccl", "gloo"], default=None, help="process group; unset: nccl on cuda, else gloo")
    p.add_argument("--out", type=Path, default=Path("results/cp_bench.json"), help="results JSON")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.kv_heads = args.heads if args.kv_heads is None else args.kv_heads
    for name in ("tokens_per_gpu", "heads", "kv_heads", "head_dim", "window", "completions", "chunk_size",
                 "num_stages", "reps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0; got {args.warmup}")
    if min(args.cp) < 1:
        raise ValueError(f"--cp values must be >= 1; got {args.cp}")
    if args.heads % args.kv_heads:
        raise ValueError(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    if not 0 < args.prompt_frac < 1:
        raise ValueError(f"--prompt-frac must be in (0, 1); got {args.prompt_frac}")
    return args


@contextmanager
def _distributed(args) -> Iterator[tuple[int, int, torch.device]]:
    """``(world, rank, device)``; joins torchrun's group (and leaves it) unless one is already initialized."""
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda but CUDA is not available; use --device cpu --backend gloo")
    owned = False
    if not dist.is_initialized() and "WORLD_SIZE" in os.environ:
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        backend = args.backend or ("nccl" if use_cuda else "gloo")
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        owned = True
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    try:
        yield world, rank, device
    finally:
        if owned:
            dist.destroy_process_group()


def _groups(cps: list[int], world: int) -> dict[int, dist.ProcessGroup | None]:
    """One group per cp: ranks 0..cp-1 (every rank must create every group, in the same order)."""
    groups = {}
    for cp in cps:
        groups[cp] = None if cp == 1 else dist.group.WORLD if cp == world else dist.new_group(list(range(cp)))
    return groups


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    dtype = DTYPES[args.dtype]
    with _distributed(args) as (world, rank, device):
        cps = sorted({c for c in args.cp if c <= world})
        if not cps:
            raise ValueError(f"--cp {args.cp}: none fits the world size {world}; launch more ranks or lower --cp")
        if rank == 0 and len(cps) < len(set(args.cp)):
            print(f"note: world size {world}; skipping cp {sorted(set(args.cp) - set(cps))}", file=sys.stderr)
        groups = _groups(cps, world)
        probe = torch.empty(1, args.heads, args.head_dim, dtype=dtype, device=device)
        backend = select_backend(args.kernel, probe, probe[:, : args.kv_heads], 0.0)
        label = backend.label(probe, probe[:, : args.kv_heads], 0.0)
        if rank == 0:
            print(f"kernel backend: {label} (--kernel {args.kernel}); device {device}", file=sys.stderr)
        rows = []
        for cp in cps:
            if rank < cp:
                for mask in args.masks:
                    rows += run_case(mask, cp, groups[cp], args, dtype, backend, device)
            if world > 1:
                _barrier(dist.group.WORLD, device)  # ranks outside this cp's group wait here
        if rank == 0:
            rows.sort(key=lambda r: (MASKS.index(r["mask"]), r["cp"], SCHEMES.index(r["scheme"])))
            add_efficiency(rows)
            meta = _meta(args, argv, world, device, label)
            print(format_table(meta, rows))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
            print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
