"""``flexcp bench kernel``: single-device attention TFLOP/s of flexcp's backends vs cuDNN SDPA and FlexAttention.

Every row runs the same mask, shapes and inputs through each contender in one process:
flexcp's backends through the backend contract (``triton``, ``cudnn``: the ragged cuDNN
backend, ``torch_sdpa``: torch's cuDNN op for one full/causal rectangle, ``auto``: the
cost router, whose route is printed per row), cuDNN SDPA called directly through
``F.scaled_dot_product_attention`` (``cudnn_sdpa``, full/causal only) and compiled
FlexAttention with the same mask as a ``mask_mod`` plus its BlockMask. ``--stages``
adds the distributed stages' shapes (rank 0's host and remote tables from real plans of
varlen and causal masks at cp = 4 and 8, 32k tokens per rank). TFLOP/s count the mask's
true area: fwd = 4 * area * hq * d, fwd+bwd = 3.5x that, over the median time of
``triton.testing.do_bench``. ``--cache-steps N`` instead measures the cuDNN graph
cache over N corpus packs; ``--sweep`` times tile configurations of each Triton kernel.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..clihelp import new_parser
from ..kernels import get_backend
from ..kernels.cudnn import CudnnBackend
from ..kernels.torch_sdpa import single_rect
from ..kernels.triton import KernelConfig, LaunchConfigs, TritonBackend, default_configs
from ..mask import AttnMaskSpec, prefix_tree, sliding_window, varlen
from .docdist import sample_pack

MASKS = ("full", "causal", "varlen", "sliding_window", "prefix_tree")  # the mask families' own names
OURS = ("triton", "cudnn", "torch_sdpa", "auto")  # flexcp backends, through the contract
CONTENDERS = (*OURS, "cudnn_sdpa", "flex")
REL_SLOTS = 512  # fixed size of FlexAttention's node-relation table, so one compiled kernel serves all masks


@dataclass
class FlexMask:
    """A slice mask as FlexAttention inputs: per-token node id, node relation (0 none, 1 full, 2 causal), window."""

    node: np.ndarray
    rel: np.ndarray
    window: int


def build_mask(name: str, seqlen: int, seed: int = 0) -> tuple[AttnMaskSpec, FlexMask | None]:
    """The benchmark mask ``name`` over ``seqlen`` tokens, as a spec and as FlexAttention inputs."""
    rel = np.zeros((REL_SLOTS, REL_SLOTS), dtype=np.int8)
    node = np.zeros(seqlen, dtype=np.int32)
    window = seqlen + 1
    if name == "full":
        return AttnMaskSpec([(0, seqlen)], [(0, seqlen)], ["full"], seqlen), None
    if name == "causal":
        spec = AttnMaskSpec.causal(seqlen)
        rel[0, 0] = 2
    elif name == "varlen":  # documents from the corpus histogram, each capped at the pack length
        lens = sample_pack(seqlen, rng=seed, max_doc_frac=1.0)
        if len(lens) > REL_SLOTS:
            raise ValueError(f"seqlen={seqlen} packs {len(lens)} documents; at most {REL_SLOTS} fit the flex table")
        spec = varlen(lens.tolist())
        node = np.repeat(np.arange(len(lens)), lens).astype(np.int32)
        rel[np.arange(len(lens)), np.arange(len(lens))] = 2
    elif name == "sliding_window":
        window = 4096
        spec = sliding_window([seqlen], window)
        rel[0, 0] = 2
    elif name == "prefix_tree":  # one prompt of S/4 and 8 completions of 3S/32 (8k + 8 x 3k at 32k)
        lens = [seqlen // 4] + [3 * seqlen // 32] * 8
        lens[0] += seqlen - sum(lens)
        spec = prefix_tree(lens, [[0, c] for c in range(1, 9)])[0]
        node = np.repeat(np.arange(9), lens).astype(np.int32)
        rel[np.arange(9), np.arange(9)] = 2
        rel[np.arange(1, 9), 0] = 1
    else:
        raise ValueError(f"mask={name!r} is unknown; choose from {MASKS}")
    return spec, FlexMask(node, rel, window)


def _bench_ms(fn, rep_ms: int) -> float:
    import triton

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


@dataclass
class Row:
    mask: str
    seqlen: int
    hq: int
    hkv: int
    sparsity: float  # area / seqlen^2
    ms: dict = field(default_factory=dict)  # contender -> [fwd_ms, fwdbwd_ms]
    tflops: dict = field(default_factory=dict)  # contender -> [fwd, fwdbwd]
    err_vs_flex: float = float("nan")
    route: list = field(default_factory=list)  # auto's parts: backend, slices, cells, modeled ms


class _Flex:
    """Compiled FlexAttention with one generic mask_mod (node relation + window) for every mask."""

    def __init__(self) -> None:
        import torch._dynamo

        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        torch._dynamo.config.cache_size_limit = 64
        self._create = create_block_mask
        self._fn = torch.compile(flex_attention, dynamic=False)

    def block_mask(self, fm: FlexMask | None, seqlen: int, device):
        if fm is None:
            return None
        node = torch.as_tensor(fm.node, device=device)
        rel = torch.as_tensor(fm.rel, device=device)
        window = torch.tensor(fm.window, device=device)

        def mask_mod(b, h, qi, ki):
            r = rel[node[qi], node[ki]]
            return (r == 1) | ((r == 2) & (qi >= ki) & (qi - ki < window))

        return self._create(mask_mod, None, None, seqlen, seqlen, device=device)

    def __call__(self, q4, k4, v4, bm):
        return self._fn(q4, k4, v4, block_mask=bm, enable_gqa=q4.shape[1] != k4.shape[1])


def _inputs(tq: int, tk: int, hq: int, hkv: int, d: int) -> list[torch.Tensor]:
    """Random bf16 THD ``q, k, v, dout`` on the GPU (never zeros: they time faster than real data)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(tq, hq, d), (tk, hkv, d), (tk, hkv, d), (tq, hq, d)]
    return [torch.randn(s, device="cuda", generator=gen, dtype=torch.bfloat16) for s in shapes]


def _bhsd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1).unsqueeze(0).contiguous()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def stage_masks(cp_sizes=(4, 8), per_rank: int = 32768, chunk: int = 2048) -> list[tuple[str, AttnMaskSpec]]:
    """Rank 0's host and remote-stage tables from real plans (greedy dispatch, one remote stage)."""
    from ..sharding import build_plan
    from ..dist_attn.plan import build_rank_plans

    out = []
    for cp in cp_sizes:
        total = cp * per_rank
        for kind, spec in (("causal", AttnMaskSpec.causal(total)), ("varlen", varlen(sample_pack(total, rng=0).tolist()))):
            rp = build_rank_plans(spec.table, build_plan(spec, cp, chunk), num_stages=1)[0]
            n = rp.local_len
            out.append((f"cp{cp}_{kind}_host", AttnMaskSpec.from_table(rp.host_table, n, n)))
            for i, st in enumerate(rp.stages):
                if len(st.table):
                    out.append((f"cp{cp}_{kind}_remote{i}", AttnMaskSpec.from_table(st.table, n, st.recv_len)))
    return out


def run_case(
    mask: str, spec: AttnMaskSpec, fm: FlexMask | None, hq: int, hkv: int, d: int, contenders: list[str], rep_ms: int,
    flex: _Flex | None,
) -> Row:  # fmt: skip
    area = spec.area()
    tq, tk = spec.total_seqlen, spec.total_seqlen_k
    row = Row(mask, tq, hq, hkv, area / (tq * tk))
    q, k, v, do = _inputs(tq, tk, hq, hkv, d)
    dev = q.device
    scale = d**-0.5
    fwd_flops = 4.0 * area * hq * d
    # gradients as their callers take them: final (flexcp.attention, remote CP stages: the inputs'
    # dtype) or float32 accumulators (a host stage beside remote ones)
    grad_dtype = None if mask.endswith("_host") else q.dtype

    def record(name: str, fwd, fwdbwd) -> None:
        ms = [_bench_ms(fwd, rep_ms), _bench_ms(fwdbwd, rep_ms)]
        row.ms[name] = ms
        row.tflops[name] = [fwd_flops / ms[0] * 1e-9, 3.5 * fwd_flops / ms[1] * 1e-9]

    outs = {}
    for name in OURS:
        if name not in contenders or (name == "torch_sdpa" and single_rect(spec.table) is None):
            continue
        backend = get_backend(name)
        if backend.unsupported(q, k, 0.0):
            continue
        prep = backend.prepare(spec.table, tq, tk, dev)

        def fwd(backend=backend, prep=prep):
            return backend.forward(q, k, v, prep, scale, 0.0)

        def fwdbwd(backend=backend, prep=prep):
            out, lse = backend.forward(q, k, v, prep, scale, 0.0)
            return backend.backward(do, q, k, v, out, lse, prep, scale, 0.0, grad_dtype)

        outs[name] = fwd()[0]
        record(name, fwd, fwdbwd)
        if name == "auto":
            row.route = backend.route(prep, q, k, 0.0).describe()

    q4, k4, v4, do4 = (_bhsd(x) for x in (q, k, v, do))
    leaves = [x.detach().clone().requires_grad_() for x in (q4, k4, v4)]
    full_or_causal = mask in ("full", "causal")
    if "cudnn_sdpa" in contenders and full_or_causal:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kx, vx = (x.repeat_interleave(hq // hkv, 1) for x in (k4, v4))  # cuDNN SDPA: equal heads
        kl, vl = (x.detach().requires_grad_() for x in (kx, vx))
        causal = mask == "causal"

        def cudnn_fwd():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q4, kx, vx, is_causal=causal, scale=scale)

        def cudnn_fwdbwd():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                out = torch.nn.functional.scaled_dot_product_attention(leaves[0], kl, vl, is_causal=causal, scale=scale)
            out.backward(do4)

        record("cudnn_sdpa", cudnn_fwd, cudnn_fwdbwd)
        for x in (leaves[0], kl, vl):
            x.grad = None
    if flex is not None and "flex" in contenders and (fm is not None or mask == "full"):
        bm = flex.block_mask(fm, tq, dev)

        def flex_fwd():
            return flex(q4, k4, v4, bm)

        def flex_fwdbwd():
            flex(*leaves, bm).backward(do4)
            for x in leaves:
                x.grad = None

        ref = flex_fwd()
        if "auto" in outs:
            row.err_vs_flex = _rel_err(outs["auto"], ref[0].transpose(0, 1))
        record("flex", flex_fwd, flex_fwdbwd)
    return row


def cache_steps(steps: int, seqlen: int, hq: int, hkv: int, d: int) -> dict:
    """Graph builds and cache hits of the cuDNN backend over ``steps`` corpus packs (fwd+bwd each)."""
    import time

    backend = CudnnBackend()
    q, k, v, do = _inputs(seqlen, seqlen, hq, hkv, d)
    history, host_ms = [], []
    for step in range(steps):
        spec = varlen(sample_pack(seqlen, rng=1000 + step).tolist())
        t0 = time.perf_counter()
        prep = backend.prepare(spec.table, seqlen, seqlen, q.device)
        host_ms.append((time.perf_counter() - t0) * 1e3)
        out, lse = backend.forward(q, k, v, prep, d**-0.5, 0.0)
        backend.backward(do, q, k, v, out, lse, prep, d**-0.5, 0.0)
        history.append(backend.graphs.stats.misses)
    st = backend.graphs.stats
    warm = steps // 10
    steady = history[-1] - history[warm - 1] if warm else history[-1]
    lookups_per_step = (st.hits + st.misses) / steps
    return {
        "steps": steps, "seqlen": seqlen, "hits": st.hits, "misses": st.misses, "hit_rate": st.hit_rate,
        "hit_rate_after_first_10pct": 1 - steady / max(1.0, lookups_per_step * (steps - warm)),
        "build_s_total": st.build_s, "first_build_s": st.first_build_s,
        "mean_later_build_s": (st.build_s - st.first_build_s) / max(1, st.misses - 1),
        "prepare_ms_median": float(np.median(host_ms)),
    }  # fmt: skip


FWD_CANDIDATES = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4)]
BWD_CANDIDATES = [  # (dK/dV tiles, dQ tiles)
    ((128, 64, 8, 3), (128, 64, 8, 3)),
    ((128, 32, 8, 3), (128, 64, 8, 3)),
    ((128, 64, 8, 3), (128, 128, 8, 2)),
]


def sweep(masks: list[str], seqlen: int, hq: int, hkv: int, d: int, rep_ms: int) -> list[dict]:
    """Time candidate tile configs: the forward kernel alone, and the whole backward."""
    base = default_configs(torch.bfloat16, d)
    trials = [("fwd", LaunchConfigs(KernelConfig(*f), base.dkdv, base.dq)) for f in FWD_CANDIDATES]
    trials += [("bwd", LaunchConfigs(base.fwd, KernelConfig(*a), KernelConfig(*b))) for a, b in BWD_CANDIDATES]
    return [res for mask in masks for res in _sweep_mask(mask, seqlen, hq, hkv, d, rep_ms, trials)]


def _sweep_mask(mask: str, seqlen: int, hq: int, hkv: int, d: int, rep_ms: int, trials) -> list[dict]:
    spec, _ = build_mask(mask, seqlen)
    flops = 4.0 * spec.area() * hq * d
    q, k, v, do = _inputs(seqlen, seqlen, hq, hkv, d)
    prep = TritonBackend().prepare(spec.table, seqlen, seqlen, q.device)
    o, lse = TritonBackend().forward(q, k, v, prep, d**-0.5, 0.0)
    out = []
    for what, cfgs in trials:
        be = TritonBackend(configs=lambda dtype, hd, cfgs=cfgs: cfgs)
        if what == "fwd":
            fn, work, shape = (lambda: be.forward(q, k, v, prep, d**-0.5, 0.0)), flops, asdict(cfgs.fwd)  # noqa: E731
        else:
            fn, work = (lambda: be.backward(do, q, k, v, o, lse, prep, d**-0.5, 0.0)), 2.5 * flops  # noqa: E731
            shape = {"dkdv": asdict(cfgs.dkdv), "dq": asdict(cfgs.dq)}
        res = {"mask": mask, "what": what, "cfg": shape}
        try:
            ms = _bench_ms(fn, rep_ms)
            res.update(ms=ms, tflops=work / ms * 1e-9)
        except Exception as e:  # noqa: BLE001 - a config may not fit shared memory
            res.update(error=str(e).splitlines()[0][:160])
        out.append(res)
        print(json.dumps(res), flush=True)
    return out


def environment() -> dict:
    import triton

    props = torch.cuda.get_device_properties(0)
    return {
        "device": props.name,
        "sms": props.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


def format_table(rows: list[Row]) -> str:
    """Markdown table: TFLOP/s fwd / fwd+bwd per contender, the ratios the targets name, and auto's route."""
    names = [n for n in CONTENDERS if any(n in r.tflops for r in rows)]
    head = "| mask | S | hq:hkv | area | " + " | ".join(f"{n} fwd / f+b" for n in names)
    head += " | auto f+b vs flex / triton / cudnn_sdpa | auto route | err vs flex |\n"
    head += "|---|---:|---:|---:|" + "---:|" * (len(names) + 1) + "---|---:|\n"

    def ratio(a: str, b: str, r: Row) -> str:
        return f"{r.tflops[a][1] / r.tflops[b][1]:.2f}x" if a in r.tflops and b in r.tflops else "—"

    lines = []
    for r in rows:
        cells = [f"{r.tflops[n][0]:.0f} / {r.tflops[n][1]:.0f}" if n in r.tflops else "—" for n in names]
        ratios = " / ".join(ratio("auto", b, r) for b in ("flex", "triton", "cudnn_sdpa"))
        route = ", ".join(f"{p['backend']} ({p['slices']})" for p in r.route) or "—"
        lines.append(
            f"| {r.mask} | {r.seqlen // 1024}k | {r.hq}:{r.hkv} | {r.sparsity:.3f} | " + " | ".join(cells)
            + f" | {ratios} | {route} | {r.err_vs_flex:.1e} |"
        )
    return head + "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = new_parser("flexcp bench kernel", "Single-GPU attention speed (TFLOP/s, forward and forward+backward) of flexcp's\n"
                   "backends against cuDNN SDPA and FlexAttention, on the same masks and inputs; prints\n"
                   "which backend 'auto' picks. Numbers: docs/benchmarks.md.")
    p.add_argument("--masks", nargs="+", default=list(MASKS), choices=MASKS, help="mask families")
    p.add_argument("--seqlens", nargs="+", type=int, default=[8192, 32768], help="sequence lengths (tokens)")
    p.add_argument("--heads", nargs="+", default=["16:16", "32:8"], help="query:key-value head pairs")
    p.add_argument("--head-dim", type=int, default=128, help="channels per head")
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS, help="what to time")
    p.add_argument("--stages", action="store_true", help="add distributed-stage shapes (cp = 4 and 8 plans)")
    p.add_argument("--cache-steps", type=int, default=0, help="measure the cuDNN graph cache over N corpus packs instead")
    p.add_argument("--rep-ms", type=int, default=300, help="do_bench repetition budget per measurement")
    p.add_argument("--sweep", action="store_true", help="time tile configs of each Triton kernel instead")
    p.add_argument("--json", default=None, help="write rows and environment here")
    p.add_argument("--markdown", default=None, help="write the markdown table here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        print("flexcp bench kernel needs a CUDA GPU", file=sys.stderr)
        return 2
    env = environment()
    env["command"] = "flexcp bench kernel " + " ".join(sys.argv[1:] if argv is None else argv)
    print(json.dumps(env), flush=True)
    heads = [tuple(int(x) for x in h.split(":")) for h in args.heads]
    if args.cache_steps:
        res = cache_steps(args.cache_steps, args.seqlens[-1], *heads[0], args.head_dim)
        print(json.dumps(res), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"env": env, "cache": res}, f, indent=1)
        return 0
    if args.sweep:
        res = sweep(args.masks, args.seqlens[-1], *heads[0], args.head_dim, args.rep_ms)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"env": env, "sweep": res}, f, indent=1)
        return 0
    flex = _Flex() if "flex" in args.contenders else None
    cases = [(m, *build_mask(m, seqlen)) for seqlen in args.seqlens for m in args.masks]
    if args.stages:
        cases += [(name, spec, None) for name, spec in stage_masks()]
    rows = []
    for hq, hkv in heads:
        for mask, spec, fm in cases:
            row = run_case(mask, spec, fm, hq, hkv, args.head_dim, args.contenders, args.rep_ms, flex)
            rows.append(row)
            print(json.dumps(asdict(row)), flush=True)
            torch.cuda.empty_cache()
    table = format_table(rows)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": [asdict(r) for r in rows]}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
