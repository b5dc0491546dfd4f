"""flexcp example: a prefix-tree mask (one prompt, several completions) through flexcp.attention."""

from __future__ import annotations

import argparse
import time

import torch

from .clihelp import new_parser
from .kernels import attention
from .mask import AttnMaskSpec


def build_parser() -> argparse.ArgumentParser:
    p = new_parser("flexcp example", "Build a prefix-tree mask (one prompt shared by several completions) and run\n"
                   "flexcp.attention on it, forward and backward; prints the mask's size and the time.")
    p.add_argument("--prompt", type=int, default=2048, help="prompt tokens (the shared prefix)")
    p.add_argument("--completions", type=int, default=4, help="number of completions")
    p.add_argument("--completion-len", type=int, default=1024, help="tokens per completion")
    p.add_argument("--heads", type=int, default=8, help="query heads")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (fewer than --heads: GQA)")
    p.add_argument("--head-dim", type=int, default=64, help="channels per head")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device: cuda when available, else cpu")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)

    nodes = [a.prompt] + [a.completion_len] * a.completions
    spec, samples = AttnMaskSpec.prefix_tree(nodes, [[0, c + 1] for c in range(a.completions)])
    dense_area = sum(sum(e - s for s, e in ranges) ** 2 for ranges in samples) // 2
    print(f"prefix tree: {len(nodes)} nodes, {spec.total_seqlen} tokens, {len(spec)} slices")
    print(f"attended cells: {spec.area():,} (unshared causal samples would need ~{dense_area:,})")

    torch.manual_seed(0)
    dev = torch.device(a.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    q = torch.randn(spec.total_seqlen, a.heads, a.head_dim, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(spec.total_seqlen, a.kv_heads, a.head_dim, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    t0 = time.perf_counter()
    out, lse = attention(q, k, v, spec)
    (out.float() * torch.randn_like(out, dtype=torch.float32)).sum().backward()
    dt = time.perf_counter() - t0
    print(f"forward+backward on {dev} ({dtype}): {dt:.2f}s; out {tuple(out.shape)}, lse finite rows "
          f"{int(torch.isfinite(lse).all(dim=1).sum())}/{spec.total_seqlen}, grad norms "
          f"q {q.grad.norm():.3e} k {k.grad.norm():.3e} v {v.grad.norm():.3e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
