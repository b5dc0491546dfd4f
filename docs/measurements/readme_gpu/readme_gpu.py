"""Helpers of run.sh (the README's GPU path on one GPU): the README's HF snippet, one kernel call per backend,
and a summary of every log (exit codes, warnings, repeated lines, nanobind leak lines).

    python readme_gpu.py snippet PATH          # write the README's "Use with Hugging Face" block to PATH
    python readme_gpu.py kernels OUT_JSON      # fwd + bwd per backend on CUDA bf16 vs float64, to OUT_JSON
    python readme_gpu.py summary OUT_DIR       # read OUT_DIR/*.log + *.rc, write summary.md, print a table
"""

from __future__ import annotations

import collections
import glob
import json
import os
import re
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, os.pardir))


def snippet(path: str) -> None:
    """The README's HF block (the one run with ``python; torchrun 2``), as written."""
    text = open(os.path.join(ROOT, "README.md")).read()
    m = re.search(r"<!-- readme-test: python; torchrun 2 -->\n```python\n(.*?)^```", text, re.S | re.M)
    if m is None:
        raise SystemExit("README.md has no '<!-- readme-test: python; torchrun 2 -->' block")
    with open(path, "w") as f:
        f.write(m.group(1))


def kernels(out_json: str) -> None:
    """One forward + backward per backend on CUDA bf16 (a causal sequence, a prefix tree): ||x - ref|| / ||ref|| vs float64."""
    import torch

    import flexcp
    from flexcp import AttnMaskSpec

    torch.manual_seed(0)
    masks = {"causal 4k": AttnMaskSpec.causal(4096),
             "prefix tree 3k": AttnMaskSpec.prefix_tree([1024, 512, 512, 512, 512], [[0, 1], [0, 2], [0, 3], [0, 4]])[0]}
    rows = []
    for mask_name, spec in masks.items():
        n = spec.total_seqlen
        q64, k64, v64 = (torch.randn(n, h, 128, device="cuda", dtype=torch.float64) for h in (16, 4, 4))
        dout64 = torch.randn(n, 16, 128, device="cuda", dtype=torch.float64)
        leaves = [x.clone().requires_grad_() for x in (q64, k64, v64)]
        ref_out, _ = flexcp.attention(*leaves, spec, backend="reference")
        ref_out.backward(dout64)
        ref = [ref_out.detach()] + [x.grad for x in leaves]
        for backend in ("triton", "cudnn", "torch_sdpa", "auto"):
            row = {"mask": mask_name, "backend": backend}
            try:
                xs = [x.to(torch.bfloat16).requires_grad_() for x in (q64, k64, v64)]
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                out, _ = flexcp.attention(*xs, spec, backend=backend)
                out.backward(dout64.to(torch.bfloat16))
                torch.cuda.synchronize()
                row["first_call_s"] = round(time.perf_counter() - t0, 3)
                got = [out.detach()] + [x.grad for x in xs]
                row["rel_err"] = {name: float((g.double() - r).norm() / r.norm().clamp(min=1e-30))
                                      for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref)}
                row["ok"] = all(e < 2e-2 for e in row["rel_err"].values())
            except Exception as exc:  # a backend's refusal of this mask is a result, not a crash of the check
                row["error"] = f"{type(exc).__name__}: {exc}"
                row["ok"] = False
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(out_json, "w") as f:
        json.dump(rows, f, indent=1)


PROGRESS = re.compile(r"\d+%\||it/s\]|examples/s\]|s/it\]")


def summary(out_dir: str) -> None:
    """Per log: exit code, warning lines, lines repeated more than once, nanobind leak lines."""
    table = ["| step | rc | lines | warning lines | repeated lines (x count) | leak lines |", "|---|---|---|---|---|---|"]
    details = []
    for log in sorted(glob.glob(os.path.join(out_dir, "*.log"))):
        name = os.path.basename(log)[:-4]
        rc_path = os.path.join(out_dir, name + ".rc")
        rc = open(rc_path).read().strip() if os.path.exists(rc_path) else "?"
        lines = [line.rstrip() for line in open(log, errors="replace").read().replace("\r", "\n").splitlines()]
        lines = [line for line in lines if line.strip() and not PROGRESS.search(line)]
        warnings = [line for line in lines if re.search(r"warn", line, re.I)]
        leaks = [line for line in lines if re.search(r"nanobind|leaked", line, re.I)]
        repeated = {line: c for line, c in collections.Counter(lines).items() if c > 1}
        table.append(f"| {name} | {rc} | {len(lines)} | {len(warnings)} | {sum(repeated.values())} | {len(leaks)} |")
        details.append(f"\n## {name} (rc {rc})\n")
        for title, items in (("warnings", sorted(set(warnings))), ("repeated", [f"x{c}: {l}" for l, c in repeated.items()]),
                             ("leaks", leaks[:5] + ([f"... {len(leaks) - 5} more"] if len(leaks) > 5 else []))):
            if items:
                details.append(f"{title}:\n" + "\n".join(f"    {x[:300]}" for x in items[:30]))
    text = "\n".join(table) + "\n" + "\n".join(details) + "\n"
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(text)
    print("\n".join(table))


if __name__ == "__main__":
    command, arg = sys.argv[1], sys.argv[2]
    {"snippet": snippet, "kernels": kernels, "summary": summary}[command](arg)
