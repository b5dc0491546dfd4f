"""Checkpoint integrity: a manifest of checksums written last, verified before resuming.

``manifest.json`` in a checkpoint directory lists every file with its size and SHA-256; it is
written after all shards (and renamed into place atomically), so a checkpoint without one, or
with any file missing, shorter, longer or different, is not intact. Hashing and verifying are
collective: every rank takes a share of the files, so a large checkpoint costs one pass
over its bytes split over the ranks.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil

import torch.distributed as dist

from .errors import RunError

MANIFEST = "manifest.json"
FORMAT = 1
_CHUNK = 1 << 22


class CheckpointError(RunError):
    """A checkpoint cannot be written or none can be resumed; the message names the path and the fix."""


def _files(root: str) -> list[str]:
    """Every regular file under ``root`` except the manifest, as sorted relative paths."""
    out = []
    for folder, _, names in os.walk(root):
        for name in names:
            rel = os.path.relpath(os.path.join(folder, name), root)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(mine: object) -> list:
    rank, world = _world()
    if world == 1:
        return [mine]
    out: list[object] = [None] * world
    dist.all_gather_object(out, mine)
    return out


def write_manifest(ckpt_dir: str, step: int) -> None:
    """Hash every file of ``ckpt_dir`` (split over the ranks) and write the manifest on rank 0 (collective)."""
    rank, world = _world()
    files = _files(ckpt_dir)
    mine = {rel: {"size": os.path.getsize(os.path.join(ckpt_dir, rel)), "sha256": _sha256(os.path.join(ckpt_dir, rel))}
            for rel in files[rank::world]}
    entries: dict[str, dict] = {}
    for part in _gather(mine):
        entries.update(part)
    if rank == 0:
        tmp = os.path.join(ckpt_dir, MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"format": FORMAT, "step": step, "files": entries}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(ckpt_dir, MANIFEST))


def _read_manifest(ckpt_dir: str) -> tuple[dict | None, str | None]:
    path = os.path.join(ckpt_dir, MANIFEST)
    if not os.path.isfile(path):
        return None, f"no {MANIFEST} (the save did not finish, or an older flexcp wrote it)"
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError("unknown format")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"{MANIFEST} is unreadable ({exc})"
    if ".metadata" not in files:
        return None, f"{MANIFEST} lists no .metadata"
    return manifest, None


def verify(ckpt_dir: str) -> str | None:
    """Why ``ckpt_dir`` is not intact, or None when every file matches its manifest entry (collective)."""
    rank, world = _world()
    manifest, reason = _read_manifest(ckpt_dir)
    problems: list[str] = []
    if manifest is not None:
        for rel in sorted(manifest["files"])[rank::world]:
            problem = _check_file(ckpt_dir, rel, manifest["files"][rel])
            if problem:
                problems.append(problem)
    problems = sorted(p for part in _gather(problems) for p in part)
    if reason is None and problems:
        reason = "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")
    return reason


def _check_file(ckpt_dir: str, rel: str, want: dict) -> str | None:
    """Why one listed file does not match its manifest entry (None when it does)."""
    path = os.path.join(ckpt_dir, rel)
    try:
        if not os.path.isfile(path):
            return f"{rel} is missing"
        if os.path.getsize(path) != want["size"]:
            return f"{rel} has {os.path.getsize(path)} bytes, the manifest says {want['size']}"
        if _sha256(path) != want["sha256"]:
            return f"{rel} does not match its checksum (corrupted)"
    except OSError as exc:
        return f"{rel} cannot be read ({exc}); check the permissions of {ckpt_dir!r}"
    return None


def save_error(exc: BaseException, path: str) -> CheckpointError:
    """A clear error for a failed save: disk full and permissions name the path and the fix.

    ``exc`` may be torch.distributed.checkpoint's CheckpointException, whose ``failures`` map each
    failed rank to ``(exception, traceback summary)``.
    """
    causes = failure_causes(exc)
    text = "; ".join(dict.fromkeys(f"{type(c).__name__}: {c}" for c in causes))
    codes = {getattr(c, "errno", None) for c in causes}
    folder = path
    while folder and not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    folder = folder or "."
    if errno.EROFS in codes or "Read-only file system" in text:
        return CheckpointError(f"cannot write checkpoint {path}: {folder!r} is on a read-only file system ({text}); "
                               "set out_dir to a directory on a writable disk (or remount it read-write)")
    if codes & {errno.EACCES, errno.EPERM} or "Permission denied" in text:
        return CheckpointError(f"cannot write checkpoint {path}: no permission ({text}); make {folder!r} writable "
                               "or set out_dir to a directory you can write")
    if codes & {errno.ENOSPC, errno.EDQUOT} or "No space left" in text or "file write failed" in text:
        try:
            free = f"{shutil.disk_usage(folder).free / 2**30:.2f} GiB free"
        except OSError:
            free = "free space unknown"
        return CheckpointError(f"cannot write checkpoint {path}: the disk is full ({free} under {folder!r}; "
                               f"{text}); free space, lower checkpoint.keep, or set out_dir to a larger disk")
    return CheckpointError(f"cannot write checkpoint {path}: {text}")


def failure_causes(exc: BaseException) -> list[BaseException]:
    """Every exception behind ``exc``: each failed rank's (of a CheckpointException) with its causes, then ``exc``'s
    chain, leaving out the CheckpointException itself when it has them (its text repeats theirs with tracebacks)."""
    causes = [c for f in _failures(exc) for c in _chain(f)] + _chain(exc)
    return [c for c in causes if not hasattr(c, "failures")] or causes


def _failures(exc: BaseException) -> list[BaseException]:
    """The per-rank exceptions a CheckpointException carries (values: an exception, or ``(exception, traceback)``)."""
    out = []
    for value in getattr(exc, "failures", {}).values():
        value = value[0] if isinstance(value, tuple) and value else value
        if isinstance(value, BaseException):
            out.append(value)
    return out


def _chain(exc: BaseException | None) -> list[BaseException]:
    """``exc`` and its causes / contexts (where the errno of a wrapped OSError lives)."""
    out: list[BaseException] = []
    while exc is not None and exc not in out and len(out) < 8:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out
