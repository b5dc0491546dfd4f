#!/usr/bin/env bash
# The README's GPU path on one GPU machine that has its own CUDA torch, run from the repository root:
#   1. `pip install --dry-run -e .` must install no torch, triton or CUDA package (the machine's torch is kept);
#   2. examples/sft_cp.py --bf16 on CUDA (TRL + datasets from the carried wheels in .whl/, put in their own folder);
#   3. the README's "Use with Hugging Face" snippet as written, and again with CUDA as the default device;
#   4. one forward + backward per backend (triton, cudnn, torch_sdpa, auto) on CUDA bf16 vs float64;
# each step's stdout + stderr in $OUT/<step>.log, its exit code in $OUT/<step>.rc; then a table of exit codes,
# warning lines, repeated lines and nanobind leak lines ($OUT/summary.md). About 3-5 minutes on one H200.
set -uo pipefail
OUT=${OUT:-results/readme_gpu}
mkdir -p "$OUT"
HERE=docs/measurements/readme_gpu
SITE=/tmp/flexcp_readme_site    # the carried wheels go here, not into the machine's environment
step() {  # step NAME COMMAND...: run it, keep its output and exit code
    local name=$1; shift
    echo "== $name: $*"
    "$@" > "$OUT/$name.log" 2>&1
    echo $? > "$OUT/$name.rc"
}

python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'transformers (machine)', transformers.__version__)" > "$OUT/versions.txt" 2>&1
step 1_install_dry_run python3 -m pip install --dry-run --no-index --no-build-isolation -e .
python3 -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl > "$OUT/wheels.txt" 2>&1
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import trl, datasets, transformers, pyarrow; print('trl', trl.__version__, 'datasets', datasets.__version__, \
'transformers', transformers.__version__, 'pyarrow', pyarrow.__version__)" >> "$OUT/versions.txt" 2>&1
python3 -c "import cudnn; print('cudnn frontend', cudnn.__version__, 'backend', cudnn.backend_version())" >> "$OUT/versions.txt" 2>&1

step 2_sft_cp_bf16 python3 examples/sft_cp.py --bf16 --output-dir /tmp/flexcp_sft_bf16
python3 $HERE/readme_gpu.py snippet /tmp/hf_magi.py
step 3_hf_snippet python3 /tmp/hf_magi.py
step 3_hf_snippet_cuda python3 -c "import torch; torch.set_default_device('cuda'); exec(open('/tmp/hf_magi.py').read())"
step 4_kernels python3 $HERE/readme_gpu.py kernels "$OUT/kernels.json"

cat "$OUT/versions.txt"
grep -h "Would install" "$OUT/1_install_dry_run.log" || tail -3 "$OUT/1_install_dry_run.log"
grep -h "^cp = " "$OUT/2_sft_cp_bf16.log"
python3 $HERE/readme_gpu.py summary "$OUT"
