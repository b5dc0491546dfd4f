"""(Runs at commit 48f7eeb, which had all_finite.) Cost of the per-call all_finite host sync: flexcp.attention fwd+bwd with the check and with it patched out."""
import json, sys
import torch, triton
from flexcp.kernels import backend as kb
from flexcp.kernels.cudnn import backend as cb
from flexcp.kernels import torch_sdpa as ts
from flexcp.bench.kernel_bench import build_mask
from probe_common import attention_step, inputs

res = []
for mask, S in (("causal", 8192), ("varlen", 8192), ("varlen", 32768), ("prefix_tree", 32768)):
    spec, _ = build_mask(mask, S)
    for hq, hkv in ((16, 16), (32, 8)):
        q, k, v, do = inputs(S, hq, hkv, grad=True)
        for backend in ("cudnn", "auto"):
            step = attention_step(q, k, v, do, spec, backend)
            row = {"mask": mask, "S": S, "heads": f"{hq}:{hkv}", "backend": backend}
            for label, fn in (("checked", kb.all_finite), ("unchecked", lambda v: True)):
                cb.all_finite = fn; ts.all_finite = fn
                # a train-like loop: 8 calls queued back to back, one sync at the end
                step(); torch.cuda.synchronize()
                row[label + "_ms"] = triton.testing.do_bench(step, warmup=25, rep=200)
                def burst():
                    for _ in range(8):
                        step()
                row[label + "_burst8_ms"] = triton.testing.do_bench(burst, warmup=25, rep=300)
            cb.all_finite = kb.all_finite; ts.all_finite = kb.all_finite
            res.append(row); print(json.dumps(row), flush=True)
json.dump(res, open(sys.argv[1], "w"), indent=1)
