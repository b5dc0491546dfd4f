"""CPU: what the committed cost table routes for every kernel-bench row, against the measured rates.

``python routes.py kernel_16_16.json kernel_32_8.json`` (flexcp importable); ``final_routes`` serves table.py.
"""
import json, sys
import torch
from flexcp.kernels import get_backend
from flexcp.kernels.router import AutoBackend
from flexcp.bench.kernel_bench import build_mask, stage_masks


class CpuAuto(AutoBackend):
    """The router deciding as on CUDA: every GPU backend counts as runnable (planning is host-only)."""

    def _runnable(self, q, k, softcap):
        return {n: get_backend(n) for n in ("torch_sdpa", "cudnn", "triton")}


def load_rows(files):
    return [r for f in files for r in json.load(open(f))["rows"]]


def final_routes(rows) -> list:
    """The route name ('cudnn', 'triton', 'cudnn+triton', ...) the committed table picks per row."""
    specs = {(m, S): build_mask(m, S)[0] for S in (8192, 32768)
             for m in ("full", "causal", "varlen", "sliding_window", "prefix_tree")}
    specs.update({(n, 32768): s for n, s in stage_masks()})
    auto, names = CpuAuto(), []
    for r in rows:
        spec = specs[(r["mask"], r["seqlen"])]
        q = torch.empty(spec.total_seqlen, r["hq"], 128, dtype=torch.bfloat16, device="meta")
        k = torch.empty(spec.total_seqlen_k, r["hkv"], 128, dtype=torch.bfloat16, device="meta")
        prep = auto.prepare(spec.table, spec.total_seqlen, spec.total_seqlen_k, torch.device("cpu"))
        names.append("+".join(p.backend.name for p in auto._decide(prep, q, k, 0.0).parts))
    return names


if __name__ == "__main__":
    rows = load_rows(sys.argv[1:])
    loss = []
    for r, name in zip(rows, final_routes(rows)):
        tf = {b: v[1] for b, v in r["tflops"].items()}
        best = max((b for b in ("triton", "cudnn", "torch_sdpa") if b in tf), key=lambda b: tf[b])
        got = tf.get(name, tf.get("auto"))
        loss.append(got / tf[best])
        print(f'{r["mask"]:20s} {r["seqlen"]:6d} {r["hq"]}:{r["hkv"]} route={name:12s} {got:6.0f}  best={best:10s} {tf[best]:6.0f}  ratio={got/tf[best]:.3f}')
    print("mean ratio", sum(loss) / len(loss), "min", min(loss))
