"""cuDNN backend fwd+bwd on varlen packs: power-of-two shape buckets vs finer buckets vs exact lengths; gate cost."""
import json, sys
import torch, triton
from flexcp.kernels.cudnn import CudnnBackend, plan
from flexcp.bench.kernel_bench import build_mask
from probe_common import gated_calls, inputs

pow2 = plan.bucket
def quarter(n, floor=1):
    b = pow2(n, floor)
    if b <= floor or b < 8:
        return b
    step = b // 8  # 4 steps per octave: b/2 * {1.25, 1.5, 1.75, 2}
    return max(int(floor), -(-int(n) // step) * step)
def exact(n, floor=1):
    return max(int(floor), -(-int(n) // 64) * 64) if floor > 1 else max(int(n), 1)
res = []
for mask, S in (("varlen", 8192), ("varlen", 32768), ("sliding_window", 32768), ("prefix_tree", 32768)):
    spec, _ = build_mask(mask, S)
    q, k, v, do = inputs(S, 16, 16)
    row = {"mask": mask, "S": S}
    for label, fn, gated in (("pow2", pow2, True), ("pow2_nogate", pow2, False), ("quarter", quarter, True), ("exact", exact, True)):
        plan.bucket = fn
        b = CudnnBackend()
        prep = b.prepare(spec.table, S, S, q.device)
        def fb():
            o, l = b.forward(q, k, v, prep, 0.088, 0.0)
            return b.backward(do, q, k, v, o, l, prep, 0.088, 0.0, torch.bfloat16)
        def f():
            return b.forward(q, k, v, prep, 0.088, 0.0)
        with gated_calls(gated):
            fb(); torch.cuda.synchronize()
            row[label] = [triton.testing.do_bench(f, warmup=25, rep=100), triton.testing.do_bench(fb, warmup=25, rep=150)]
        row[label + "_buckets"] = [plan.launch_bucket(la) for la in prep.launches]
    plan.bucket = pow2
    res.append(row); print(json.dumps(row), flush=True)
    json.dump(res, open(sys.argv[1], "w"), indent=1)
