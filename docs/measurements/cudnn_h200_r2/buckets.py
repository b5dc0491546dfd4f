"""cuDNN backend fwd+bwd on varlen packs: power-of-two shape buckets vs finer buckets vs exact lengths; gate cost."""
import json, sys
import torch, triton
from flexcp.kernels.cudnn import CudnnBackend, plan
from flexcp.kernels.triton import TritonBackend
from flexcp.bench.kernel_bench import build_mask

pow2 = plan.bucket
def quarter(n, floor=1):
    b = pow2(n, floor)
    if b <= floor or b < 8:
        return b
    step = b // 8  # 4 steps per octave: b/2 * {1.25, 1.5, 1.75, 2}
    return max(int(floor), -(-int(n) // step) * step)
def exact(n, floor=1):
    return max(int(floor), -(-int(n) // 64) * 64) if floor > 1 else max(int(n), 1)
fi, bi = TritonBackend.forward_into, TritonBackend.backward_into
def skip_f(self, *a, gate=None, **kw):
    return None if gate is not None else fi(self, *a, **kw)
def skip_b(self, *a, gate=None, **kw):
    return None if gate is not None else bi(self, *a, **kw)
res = []
for mask, S in (("varlen", 8192), ("varlen", 32768), ("sliding_window", 32768), ("prefix_tree", 32768)):
    spec, _ = build_mask(mask, S)
    hq = hkv = 16
    q = torch.randn(S, hq, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(S, hkv, 128, device="cuda", dtype=torch.bfloat16) for _ in "kv")
    do = torch.randn_like(q)
    row = {"mask": mask, "S": S}
    for label, fn, gated in (("pow2", pow2, True), ("pow2_nogate", pow2, False), ("quarter", quarter, True), ("exact", exact, True)):
        plan.bucket = fn
        TritonBackend.forward_into, TritonBackend.backward_into = (fi, bi) if gated else (skip_f, skip_b)
        b = CudnnBackend()
        prep = b.prepare(spec.table, S, S, q.device)
        def fb():
            o, l = b.forward(q, k, v, prep, 0.088, 0.0)
            return b.backward(do, q, k, v, o, l, prep, 0.088, 0.0, torch.bfloat16)
        def f():
            return b.forward(q, k, v, prep, 0.088, 0.0)
        fb(); torch.cuda.synchronize()
        row[label] = [triton.testing.do_bench(f, warmup=25, rep=100), triton.testing.do_bench(fb, warmup=25, rep=150)]
        row[label + "_buckets"] = [plan.launch_bucket(la) for la in prep.launches]
    plan.bucket = pow2
    TritonBackend.forward_into, TritonBackend.backward_into = fi, bi
    res.append(row); print(json.dumps(row), flush=True)
    json.dump(res, open(sys.argv[1], "w"), indent=1)
