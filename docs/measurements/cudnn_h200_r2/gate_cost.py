"""flexcp.attention fwd+bwd (bf16 grads, gated non-finite recompute) with the gate and with the gated calls skipped."""
import json, sys
import torch, triton
from flexcp.bench.kernel_bench import build_mask
from probe_common import attention_step, gated_calls, inputs

res = []
for mask, S in (("causal", 8192), ("varlen", 8192), ("varlen", 32768), ("sliding_window", 32768), ("prefix_tree", 32768)):
    spec, _ = build_mask(mask, S)
    for hq, hkv in ((16, 16), (32, 8)):
        q, k, v, do = inputs(S, hq, hkv, grad=True)
        for backend in ("cudnn", "auto"):
            step = attention_step(q, k, v, do, spec, backend)
            row = {"mask": mask, "S": S, "heads": f"{hq}:{hkv}", "backend": backend, "tflops_area": spec.area()}
            for label in ("gated", "skipped"):
                with gated_calls(label == "gated"):
                    step(); torch.cuda.synchronize()
                    row[label + "_ms"] = triton.testing.do_bench(step, warmup=25, rep=200)
            res.append(row); print(json.dumps(row), flush=True)
json.dump(res, open(sys.argv[1], "w"), indent=1)
