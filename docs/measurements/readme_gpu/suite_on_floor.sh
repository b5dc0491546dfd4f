#!/usr/bin/env bash
# The whole test suite (CPU and GPU tests) on the GPU machine's own torch, 2.11: the torch floor in
# pyproject.toml, which CI (torch 2.13 CPU) does not run. TRL, datasets and transformers 5.24 from the
# carried wheels in .whl/ (their own folder, as run.sh). Run from the repository root; about 5-9 minutes.
set -uo pipefail
OUT=${OUT:-results/readme_gpu}
mkdir -p "$OUT"
SITE=/tmp/flexcp_readme_site
[ -d "$SITE/trl" ] || python3 -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl > "$OUT/suite_wheels.txt" 2>&1
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, \
'trl', trl.__version__)" > "$OUT/suite_versions.txt" 2>&1
timeout 560 python3 -m pytest -q -p no:cacheprovider --timeout 400 > "$OUT/suite.log" 2>&1
echo "pytest rc $?" >> "$OUT/suite.log"
cat "$OUT/suite_versions.txt"
tail -12 "$OUT/suite.log"
