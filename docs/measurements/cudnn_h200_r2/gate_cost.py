"""flexcp.attention fwd+bwd (bf16 grads, gated non-finite recompute) with the gate and with the gated calls skipped."""
import json, sys
import torch, triton
import flexcp
from flexcp.kernels.triton import TritonBackend
from flexcp.bench.kernel_bench import build_mask

fi, bi = TritonBackend.forward_into, TritonBackend.backward_into
def skip_f(self, *a, gate=None, **kw):
    return None if gate is not None else fi(self, *a, **kw)
def skip_b(self, *a, gate=None, **kw):
    return None if gate is not None else bi(self, *a, **kw)
res = []
for mask, S in (("causal", 8192), ("varlen", 8192), ("varlen", 32768), ("sliding_window", 32768), ("prefix_tree", 32768)):
    spec, _ = build_mask(mask, S)
    for hq, hkv in ((16, 16), (32, 8)):
        torch.manual_seed(0)
        q = torch.randn(S, hq, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(S, hkv, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(S, hkv, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        do = torch.randn(S, hq, 128, device="cuda", dtype=torch.bfloat16)
        for backend in ("cudnn", "auto"):
            def step():
                out, _ = flexcp.attention(q, k, v, spec, backend=backend)
                out.backward(do)
            row = {"mask": mask, "S": S, "heads": f"{hq}:{hkv}", "backend": backend, "tflops_area": spec.area()}
            for label in ("gated", "skipped"):
                TritonBackend.forward_into, TritonBackend.backward_into = (fi, bi) if label == "gated" else (skip_f, skip_b)
                step(); torch.cuda.synchronize()
                row[label + "_ms"] = triton.testing.do_bench(step, warmup=25, rep=200)
            TritonBackend.forward_into, TritonBackend.backward_into = fi, bi
            res.append(row); print(json.dumps(row), flush=True)
json.dump(res, open(sys.argv[1], "w"), indent=1)
