"""What the per-call rank-agreement check costs: host time of `flexcp.comm.agree` alone, and a
`calc_attn` forward + backward with the check on (default) and off (`FLEXCP_CHECK=0`).

CPU (gloo):  torchrun --nproc-per-node 2 docs/measurements/agreement_cost.py
GPU (NCCL):  torchrun --nproc-per-node 2 docs/measurements/agreement_cost.py --device cuda --seqlen 32768
Writes JSON to --out (default: $OUT/agreement_cost.json when OUT is set) and prints a table on rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from flexcp.comm import agree
from flexcp.comm.agreement import FINGERPRINT_BYTES
from flexcp.mask import AttnMaskSpec
from flexcp.runtime import build_key, calc_attn, dispatch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_us(fn, reps: int, device: torch.device) -> float:
    times = []
    for _ in range(reps):
        dist.barrier()
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--seqlen", type=int, default=4096)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=os.path.join(os.environ["OUT"], "agreement_cost.json") if "OUT" in os.environ else None)
    a = p.parse_args()
    if a.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if a.device == "cuda" else "gloo")
    device = torch.device(a.device, torch.cuda.current_device()) if a.device == "cuda" else torch.device("cpu")
    group, cp = dist.group.WORLD, dist.get_world_size()
    fields = {"key": 1, "dtype": torch.bfloat16, "q_shape": (a.seqlen // cp, a.heads, a.head_dim), "softcap": 0.0}
    for _ in range(50):
        agree("calc_attn", fields, group, "")
    agree_us = _median_us(lambda: [agree("calc_attn", fields, group, "") for _ in range(100)], a.reps, device) / 100

    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    key = build_key(AttnMaskSpec.causal(a.seqlen), group, num_heads_q=a.heads, num_heads_kv=a.heads, head_dim=a.head_dim)
    g = torch.Generator().manual_seed(0)
    q, k, v = (dispatch(torch.randn(a.seqlen, a.heads, a.head_dim, generator=g), key).to(device, dtype).requires_grad_()
               for _ in range(3))

    def step() -> None:
        out, _ = calc_attn(q, k, v, key)
        out.sum().backward()

    calls = {}
    for setting in ("on", "off", "on", "off"):  # interleaved: drift on a shared machine hits both alike
        if setting == "off":
            os.environ["FLEXCP_CHECK"] = "0"
        else:
            os.environ.pop("FLEXCP_CHECK", None)
        step()
        calls.setdefault(setting, []).append(_median_us(step, a.reps, device))
    os.environ.pop("FLEXCP_CHECK", None)
    result = {"device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu", "cp": cp,
              "backend": dist.get_backend(group), "seqlen": a.seqlen, "heads": a.heads, "head_dim": a.head_dim,
              "dtype": str(dtype), "bytes_sent_per_rank_per_call": FINGERPRINT_BYTES,
              "bytes_received_per_rank_per_call": FINGERPRINT_BYTES * (cp - 1),
              "agree_us": round(agree_us, 1), "calc_attn_fwd_bwd_us_check_on": round(min(calls["on"]), 1),
              "calc_attn_fwd_bwd_us_check_off": round(min(calls["off"]), 1)}
    if dist.get_rank() == 0:
        for name, value in result.items():
            print(f"{name:36s} {value}")
        if a.out:
            with open(a.out, "w") as f:
                json.dump(result, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
