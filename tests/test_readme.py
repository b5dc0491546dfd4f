"""The README's code runs as written: every Python block and shell command marked to run on CPU is run.

Each fenced ``python`` / ``bash`` block of README.md follows a marker comment saying how it runs:

- ``<!-- readme-test: python -->``: saved to a file, run with ``python file.py``;
- ``<!-- readme-test: torchrun 2 -->``: run with ``torchrun --nproc-per-node 2 file.py`` (gloo);
  ``python; torchrun 2`` runs both;
- ``<!-- readme-test: shell -->``: every command (backslash continuations joined) run by bash
  from a scratch directory that sees the repository's files, one test per command;
- ``<!-- readme-test: setup; then-tested-by PATH -->``: venv set-up, not re-run here; the
  command after the set-up must be one the named test runs;
- ``<!-- readme-test: skip (reason) -->``: needs GPUs or your own files.

A block without a marker fails the test, so nothing new in the README goes untested by accident.
Commands that another test already runs in full (``flexcp demo``) are checked to be that test's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
MARKER = re.compile(r"<!-- readme-test: (.+?) -->\s*$")
COVERED = {"flexcp demo": ("tests/test_train_demo.py", '["demo"')}
"""Commands another test runs in full: (that test, what it must contain)."""
TIMEOUT_S = 300


def _blocks() -> list[tuple[str, str, str, int]]:
    """``(marker, language, code, line)`` of every python / bash block."""
    text = open(README).read()
    out = []
    for m in FENCE.finditer(text):
        if m.group(1) not in ("python", "bash"):
            continue
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.match(before)
        out.append((marker.group(1) if marker else "", m.group(1), m.group(2), text[: m.start()].count("\n") + 1))
    return out


def _commands(code: str) -> list[str]:
    """The block's commands: continuation lines joined, comment-only and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def _env(bin_dir: str) -> dict[str, str]:
    """The environment of a set-up venv: flexcp importable, ``flexcp`` and ``torchrun`` on PATH, CPU only."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("OMP_NUM_THREADS", None)  # as a user's shell: the commands must be fast without it
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK"):
        env.pop(var, None)  # a process group another test started in this process is not the user's launch
    path = [bin_dir, os.path.dirname(sys.executable), env.get("PATH", "")]
    os.makedirs(bin_dir, exist_ok=True)
    for name, module in (("flexcp", "flexcp.cli"), ("torchrun", "torch.distributed.run")):
        if shutil.which(name, path=os.pathsep.join(path[1:])) is None:  # not pip-installed: a shim
            shim = os.path.join(bin_dir, name)
            with open(shim, "w") as f:
                f.write(f'#!/bin/sh\nexec "{sys.executable}" -m {module} "$@"\n')
            os.chmod(shim, 0o755)
    env["PATH"] = os.pathsep.join(path)
    return env


def _workdir(tmp_path) -> str:
    """A scratch directory where the README's repository-relative paths resolve (outputs stay in it)."""
    work = tmp_path / "work"
    work.mkdir()
    for name in ("flexcp", "examples"):
        (work / name).symlink_to(os.path.join(ROOT, name))
    return str(work)


def _run(args: list[str] | str, tmp_path, shell: bool = False) -> str:
    env = _env(str(tmp_path / "bin"))
    proc = subprocess.run(args, cwd=_workdir(tmp_path), env=env, shell=shell, executable="/bin/bash" if shell else None,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{args!r} exited {proc.returncode}:\n{out[-4000:]}"
    return out


def _cases(kinds: tuple[str, ...]) -> list:
    cases = []
    for marker, lang, code, line in _blocks():
        modes = [m.strip() for m in marker.split(";")]
        if "shell" in modes and "shell" in kinds:
            cases += [pytest.param(cmd, id=f"L{line}-{' '.join(cmd.split()[:6])[:60]}") for cmd in _commands(code)]
        for mode in ("python", "torchrun 2"):
            if mode in modes and mode in kinds:
                cases.append(pytest.param(mode, code, id=f"L{line}-{mode.replace(' ', '')}"))
    return cases


def test_every_block_is_marked():
    blocks = _blocks()
    assert len(blocks) >= 5
    for marker, lang, code, line in blocks:
        assert marker, f"README.md line {line}: a {lang} block without a '<!-- readme-test: ... -->' marker"
        for mode in marker.split(";"):
            assert re.match(r"(python|torchrun 2|shell|setup|then-tested-by|skip)\b", mode.strip()), (line, marker)


def test_setup_blocks_end_in_a_tested_command():
    setups = [(marker, code) for marker, _, code, _ in _blocks() if marker.startswith("setup")]
    assert len(setups) == 2
    for marker, code in setups:
        tail = code.strip().rsplit("&&", 1)[-1].strip()
        assert code.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install torch==")
        if "(the test suite itself)" in marker:
            assert tail == "python -m pytest -q"
        else:
            path, needle = COVERED[tail]
            assert marker.endswith(f"then-tested-by {path}") and needle in open(os.path.join(ROOT, path)).read()


@pytest.mark.parametrize("command", _cases(("shell",)))
def test_readme_shell_command(command, tmp_path):
    if command.split("#")[0].strip() in COVERED:
        path, needle = COVERED[command.split("#")[0].strip()]
        assert needle in open(os.path.join(ROOT, path)).read()  # run in full by that test
        return
    out = _run(command, tmp_path, shell=True)
    if " finetune " in command and "--check" not in command:
        assert "summary:" in out and "final_step" in out and " nan" not in out, out[-3000:]


@pytest.mark.parametrize("mode, code", _cases(("python", "torchrun 2")))
def test_readme_python_block(mode, code, tmp_path):
    script = tmp_path / "snippet.py"
    script.write_text(code)
    launcher = [sys.executable] if mode == "python" else [sys.executable, "-m", "torch.distributed.run",
                                                          "--nproc-per-node", "2"]
    out = _run([*launcher, str(script)], tmp_path)
    shards = [tuple(map(float, m)) for m in re.findall(r"shard loss ([\d.]+), full loss ([\d.]+)", out)]
    if shards:  # the HF snippet: the shards' losses add up to the full loss it prints
        assert len(shards) == (1 if mode == "python" else 2)
        full = shards[0][1]
        assert all(f == full for _, f in shards)
        assert sum(s for s, _ in shards) == pytest.approx(full, rel=1e-4, abs=1e-3)
