"""cuDNN backend fwd+bwd: causal rectangles (sq < sk) as one BOTTOM_RIGHT entry vs FULL + square (same cells)."""
import json, sys
import numpy as np, torch, triton
from flexcp.kernels.cudnn import CudnnBackend
from flexcp.mask import AttnMaskSpec
from flexcp.mask.geometry import SliceTable
from flexcp.mask.types import CAUSAL, FULL
from flexcp.bench.kernel_bench import stage_masks

def split(t: SliceTable) -> SliceTable:
    qs, qe, ks, ke, ty = (list(x) for x in (t.qs, t.qe, t.ks, t.ke, t.types))
    out = [[], [], [], [], []]
    for a, b, c, d, k in zip(qs, qe, ks, ke, ty):
        if k == CAUSAL and b - a < d - c:
            n = b - a
            for row in ((a, b, c, d - n, FULL), (a, b, d - n, d, CAUSAL)):
                for o, x in zip(out, row): o.append(x)
        else:
            for o, x in zip(out, (a, b, c, d, k)): o.append(x)
    return SliceTable(*(np.asarray(x, dtype=np.int64) for x in out))

cases = [("rect_8k_x_32k", AttnMaskSpec([(0, 8192)], [(0, 32768)], ["causal"], 8192, 32768))]
cases += [(n, s) for n, s in stage_masks() if "causal" in n]
res = []
for name, spec in cases:
    for hq, hkv in ((16, 16), (32, 8)):
        tq, tk = spec.total_seqlen, spec.total_seqlen_k
        q = torch.randn(tq, hq, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(tk, hkv, 128, device="cuda", dtype=torch.bfloat16) for _ in "kv")
        do = torch.randn_like(q)
        row = {"mask": name, "heads": f"{hq}:{hkv}", "area": spec.area()}
        outs = {}
        for label, table in (("bottom_right", spec.table), ("split", split(spec.table))):
            b = CudnnBackend()
            prep = b.prepare(table, tq, tk, q.device)
            row[label + "_launches"] = len(prep.launches)
            def fb():
                o, l = b.forward(q, k, v, prep, 0.088, 0.0)
                return b.backward(do, q, k, v, o, l, prep, 0.088, 0.0, torch.bfloat16)
            outs[label] = [x.float() for x in fb()]
            ms = triton.testing.do_bench(fb, warmup=25, rep=150)
            row[label + "_ms"] = ms
            row[label + "_tflops"] = 3.5 * 4 * spec.area() * hq * 128 / ms * 1e-9
        row["max_rel_diff"] = max(float((a - c).norm() / c.norm()) for a, c in zip(outs["bottom_right"], outs["split"]))
        res.append(row); print(json.dumps(row), flush=True)
json.dump(res, open(sys.argv[1], "w"), indent=1)
