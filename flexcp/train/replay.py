"""Resuming rewinds the run's logs: records of steps after the checkpoint are dropped, since they are replayed."""

from __future__ import annotations

import json
import os


def drop_records_after(path: str, step: int) -> int:
    """Rewrite the JSONL file ``path`` keeping only records with ``"step" <= step``; returns how many were dropped.

    Records without a step and unparsable lines (a line cut by a crash) are dropped too, so after
    any number of resumes the file holds one record per logged step. Written to a temporary file and
    renamed, so a crash here leaves the old file.
    """
    if not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
                keep = isinstance(record, dict) and int(record["step"]) <= step
            except (ValueError, KeyError, TypeError):
                keep = False
            if keep:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return dropped
