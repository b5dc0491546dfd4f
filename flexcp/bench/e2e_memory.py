"""The longest sequence one GPU trains: peak memory of the recipe at growing lengths, until it stops fitting.

The recipe as users run it for long sequences (``llama-1b``, magi attention, activation
checkpointing, the chunked loss, AdamW with its moments allocated), one step per length, with
and without ``model.offload_activations``. Attention keeps O(S) memory whatever the mask, so
the probe trains packs of corpus documents cut to ``--probe-doc-len`` tokens, which keeps a
step's attention time linear in its length (a single causal document of the same length
takes a much longer step; on the H200 run its memory per token was lower than a pack's,
see docs/benchmarks.md).

Search: two lengths (``--probe-start``) give peak memory as a line in the length; the
probe tries the length where that line meets the free GPU memory (rounded down to
``--probe-granule``), then steps one granule up while it fits and down (bisecting while
more than four granules away) while it does not, until a fitting length and the next one
that does not are found (or ``--probe-points`` steps, or the time budget, run out). With offloading, the host memory
the forward saves per token caps the lengths tried at ``--host-frac`` of the host's
available memory. A step that runs out of memory is caught; the trainer is rebuilt.
Each probe row records memory at forward start (model + optimizer state), at forward
end (+ the activations saved for backward) and at the peak (+ the backward working set).
"""

from __future__ import annotations

import os
import time
from typing import Callable

import torch

from . import e2e_workloads as wl
from .e2e_trainers import all_max, build_trainer, free_trainer, run_guarded, use_sequence

GIB = 2**30


def host_memory_gib(field: str = "MemTotal") -> float | None:
    """``MemTotal`` (or another /proc/meminfo field) in GiB; None where /proc/meminfo is missing."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """This process's resident memory now (Linux ``/proc/self/statm``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


class ForwardMemory:
    """GPU allocated bytes and host RSS at the start and the end of the model's forward."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.device, self.marks = device, {}
        self.handles = [model.register_forward_pre_hook(lambda *a: self._mark("start")),
                        model.register_forward_hook(lambda *a: self._mark("end"))]

    def _mark(self, when: str) -> None:
        gpu = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
        self.marks[when] = (gpu, rss_bytes())

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def probe_step(trainer, device: torch.device) -> dict:
    """One training step with memory marks: peak, reserved, forward start / end (GiB), host bytes saved."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    marks = ForwardMemory(trainer.model, device)
    try:
        m = trainer.train_step()
    finally:
        marks.close()
    (g0, h0), (g1, h1) = marks.marks["start"], marks.marks["end"]
    out = {"step_s": m.seconds, "tokens_per_s": m.tokens / m.seconds, "fwd_start_gib": g0 / GIB,
           "fwd_end_gib": g1 / GIB, "host_saved_gib": (h1 - h0) / GIB, "loss": m.loss}
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        out["reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    keys = sorted(out)
    return dict(zip(keys, all_max([out[k] for k in keys], device)))


def _usable_gib(device: torch.device) -> float | None:
    """GPU memory torch may reach: total minus what others hold (CUDA context, libraries), minus 1 GiB."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    others = total - free - torch.cuda.memory_reserved(device)
    return (total - others) / GIB - 1.0


class _Mode:
    """The probe of one setting (offloading on or off): a trainer that is rebuilt after an OOM."""

    def __init__(self, args, offload: bool, device: torch.device, log: Callable[[dict], None]) -> None:
        self.args, self.offload, self.device, self.log = args, offload, device, log
        self.preset = "tiny" if args.tiny else "llama-1b"
        self.trainer = None

    def _fresh(self):
        """A trainer whose optimizer moments exist (one short step), so each probe step is a steady step."""
        trainer = build_trainer("magi", 1, self.preset, {}, self.args, self.offload)
        use_sequence(trainer, wl.packed_documents(2 * self.args.chunk_size, trainer.lm.config.vocab_size))
        trainer.train_step()
        return trainer

    def run(self, seq_len: int) -> dict:
        def step() -> dict:
            if self.trainer is None:
                self.trainer = self._fresh()
            seq = wl.packed_documents(seq_len, self.trainer.lm.config.vocab_size, seed=self.args.seed,
                                      max_doc_len=self.args.probe_doc_len)
            use_sequence(self.trainer, seq)
            return {**probe_step(self.trainer, self.device), **wl.describe(seq)}

        res = run_guarded(step, self.device)
        fits = "step_s" in res
        if not fits:
            self.trainer = None
            free_trainer()
        row = {"probe": True, "offload": self.offload, "seq_len": seq_len, "fits": fits, **res}
        self.log(row)
        return row

    def close(self) -> None:
        self.trainer = None
        free_trainer()


def _predict(rows: list[dict], target_gib: float, granule: int) -> int:
    """The length where peak memory, linear through two fitting rows, reaches ``target_gib`` (rounded down)."""
    (a, b) = rows
    slope = (b["peak_gib"] - a["peak_gib"]) / (b["seq_len"] - a["seq_len"])
    if slope <= 0:
        return b["seq_len"]
    return max(b["seq_len"], int(b["seq_len"] + (target_gib - b["peak_gib"]) / slope) // granule * granule)


def search(mode: _Mode, args, deadline: float, target_gib: float | None = None,
           host_per_token_gib: float = 0.0) -> list[dict]:
    """Fit on ``--probe-start``, then bracket the longest fitting length (see the module doc).

    ``target_gib``: the memory a step may reach (default: what is free on the GPU now).
    ``host_per_token_gib``: a lower bound on the host memory offloading needs per token
    (what the forward saved on the GPU without offloading), in case the host's resident-set
    count misses some. Returns the two fit rows (fewer when one did not fit).
    """
    fit = []
    for n in sorted(args.probe_start):
        if time.monotonic() > deadline:
            mode.log({"probe": True, "offload": mode.offload, "seq_len": n, "skipped": "time budget"})
            return fit
        fit.append(mode.run(n))
        if not fit[-1]["fits"]:
            return fit[:-1]
    target = _usable_gib(mode.device) if target_gib is None else target_gib
    if target is None:  # CPU: nothing to run out of
        return fit
    g = args.probe_granule
    length = _predict(fit, target, g)
    host_cap = None
    if mode.offload:
        per_token = max(fit[-1]["host_saved_gib"] / fit[-1]["seq_len"], host_per_token_gib, 1e-12)
        host_cap = int(args.host_frac * (host_memory_gib("MemAvailable") or 0.0) / per_token) // g * g
        length = min(length, host_cap)
    best, fail = fit[-1]["seq_len"], None
    sec_per_token = fit[-1]["step_s"] / fit[-1]["seq_len"]
    for _ in range(args.probe_points):
        if length <= best or (fail is not None and length >= fail):
            break
        if host_cap is not None and length > host_cap:
            mode.log({"probe": True, "offload": True, "seq_len": length,
                      "skipped": f"host memory (offloading needs more than {args.host_frac:.0%} of the free host RAM)"})
            break
        predicted = 1.3 * sec_per_token * length + (15.0 if mode.trainer is None else 0.0)
        if time.monotonic() + predicted > deadline:
            mode.log({"probe": True, "offload": mode.offload, "seq_len": length,
                      "skipped": f"time budget (predicted {predicted:.0f} s)"})
            break
        row = mode.run(length)
        if row["fits"]:
            best = length
        else:
            fail = length
        if fail is not None and fail - best <= g:
            break
        if fail is not None and fail - best > 4 * g:  # far off: bisect
            length = (best + fail) // 2 // g * g
        else:
            length = best + g if row["fits"] else fail - g
    return fit


def run_probe(args, deadline: float, device: torch.device, log: Callable[[dict], None]) -> None:
    """The probe without, then with, activation offloading (``--no-offload``: without only)."""
    host_per_token = 0.0
    for offload in ([False, True] if args.offload else [False]):
        mode = _Mode(args, offload, device, log)
        try:
            fit = search(mode, args, deadline, host_per_token_gib=host_per_token)
        finally:
            mode.close()
        if fit and not offload:
            host_per_token = (fit[-1]["fwd_end_gib"] - fit[-1]["fwd_start_gib"]) / fit[-1]["seq_len"]
