"""The install keeps a user's torch: the torch floor admits every torch the tests ran on, and the README says it."""

from __future__ import annotations

import os
import re
import tomllib

from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTED_TORCH = ("2.11.0+cu130", "2.13.0+cpu")
"""The GPU machine's torch (GPU tests, benchmarks) and CI's CPU build (the whole suite)."""


def _torch_requirement() -> Requirement:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    return next(Requirement(d) for d in deps if Requirement(d).name == "torch")


def test_the_torch_floor_keeps_every_tested_torch() -> None:
    spec = _torch_requirement().specifier
    for version in TESTED_TORCH:  # a CUDA build with a local label satisfies the range: pip keeps it
        assert spec.contains(version), f"pyproject's torch{spec} would replace the tested torch {version}"
    assert not spec.contains("2.10.0"), "the floor is the oldest torch tested (2.11)"


def test_readme_states_the_floor_and_the_cpu_index() -> None:
    floor = re.fullmatch(r">=(\d+\.\d+)", str(_torch_requirement().specifier)).group(1)
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert f"needs torch {floor} or newer" in readme
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme
