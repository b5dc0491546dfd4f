"""The longest sequence one GPU trains, with the long-sequence levers on and off, in one launch of <= 9 minutes.

The recipe (``flexcp.train``: FSDP2, bf16, activation checkpointing, magi attention with the
default ``backend="auto"``, AdamW with its moments allocated) on packs of corpus documents
up to ``--doc-len`` tokens (64k by default: long documents, yet a step's attention time stays
linear in the pack length, so a 1.25M-token step takes tens of seconds, not hours). Parts, in
priority order, each skipped when its predicted time passes the global budget:

1. ``llama-1b``, every on-GPU lever as the recipe sets them (tiled MLP where memory is short,
   tiled loss, norms recomputed): tokens/s at the ``--speed`` lengths (256k among them);
2. the levers one by one at ``--lever-len`` (plain, MLP always tiled, + offload) and the losses
   of every lever on vs plain over ``--loss-steps`` steps from the same weights;
3. the ``--pack-len`` many-document pack vs one causal sequence of that length (peak memory);
4. ``llama-3b`` (Llama-3.2-3B shapes, random init) + offload at ``--long-3b`` (512k);
5. ``llama-1b`` at ``--long`` (1.25M) without offload, then 6. with offload at ``--offload-long``
   (2M), capped by the free host memory: after everything shorter, since past 1,048,576
   tokens a kernel with 32-bit offsets may fail and take the CUDA context with it;
7. what a TRL user has today: HF ``flex_attention`` + gradient checkpointing (chunked loss as
   TRL's fused LM head, no tiled MLP, no offload) at ``--flex`` lengths;
8. a coarse search upward (one step per mode) while time remains.

Every row records the peak memory split: state (allocated at forward start: weights and
AdamW moments), kept activations (forward end minus start), backward working set (peak
minus forward end), allocator slack (reserved minus peak); tokens/s; the host bytes offloaded.
Rows go to ``<out>/longest.json`` as they come; ``longest.md`` and ``longest.png`` are
rewritten after every row.

    python -m flexcp.bench.longest --out "$OUT"                  # one H200, ~9 minutes
    python -m flexcp.bench.longest --cpu --tiny --out /tmp/lp    # CPU dry run, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..hf.offload import ActivationOffload
from ..hf.tiled_mlp import tile_mlp
from . import e2e_workloads as wl
from .e2e_memory import GIB, host_memory_gib, probe_step
from .e2e_trainers import InitialState, free_trainer, run_guarded, use_sequence

K = 1024


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flexcp.bench.longest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results/longest"))
    p.add_argument("--budget-s", type=float, default=500.0, help="no step starts that is predicted to end after this")
    p.add_argument("--max-step-s", type=float, default=200.0, help="no single step predicted longer than this")
    p.add_argument("--doc-len", type=int, default=64 * K, help="documents of the packs are cut to this many tokens")
    p.add_argument("--speed", type=int, nargs="+", default=[64 * K, 256 * K], help="tokens/s lengths (all levers)")
    p.add_argument("--speed-steps", type=int, default=2, help="steps per --speed length (the last one is timed)")
    p.add_argument("--long", type=int, default=1_250_000, help="llama-1b target without offload")
    p.add_argument("--lever-len", type=int, default=256 * K, help="length of the lever-by-lever rows")
    p.add_argument("--loss-len", type=int, default=32 * K)
    p.add_argument("--loss-steps", type=int, default=5)
    p.add_argument("--pack-len", type=int, default=64 * K)
    p.add_argument("--offload-long", type=int, default=2_000_000, help="llama-1b target with offload")
    p.add_argument("--long-3b", type=int, default=512 * K, help="llama-3b target (with offload)")
    p.add_argument("--flex", type=int, nargs="*", default=[256 * K, 512 * K], help="HF flex_attention lengths")
    p.add_argument("--granule", type=int, default=64 * K, help="length resolution of the upward search")
    p.add_argument("--host-frac", type=float, default=0.85,
                   help="offloaded activations may use this much of the free host RAM")
    p.add_argument("--mlp-chunk", type=int, default=8192, help="tokens per tiled-MLP chunk (model.tiled_mlp)")
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="run on CPU with gloo (with --tiny)")
    p.add_argument("--tiny", action="store_true", help="the tiny preset and short lengths (dry runs, tests)")
    args = p.parse_args(argv)
    if args.tiny:
        args.speed, args.long, args.lever_len, args.loss_len = [128], 384, 128, 128
        args.pack_len, args.offload_long, args.long_3b, args.flex = 128, 256, 128, []
        args.doc_len, args.granule, args.loss_steps, args.mlp_chunk = 64, 128, min(args.loss_steps, 2), 32
    return args


class Session:
    """One live recipe trainer (rebuilt per model / attention, or after a failed step) and the rows so far."""

    def __init__(self, args, device: torch.device, log: Callable[[dict], None]) -> None:
        self.args, self.device, self.log = args, device, log
        self.key: tuple | None = None
        self.trainer = None
        self.deadline = time.monotonic() + args.budget_s
        self.sec_per_token: dict[tuple, float] = {}

    # ------------------------------------------------------------------ trainers
    def _config(self, preset: str, attn: str, tiled_mlp: int) -> dict:
        a = self.args
        return {"out_dir": str(a.out / "run"),
                "model": {"preset": "tiny" if a.tiny else preset, "activation_checkpointing": True,
                          "attn_implementation": attn, "tiled_mlp": tiled_mlp},
                "data": {"kind": "recall", "seq_len": 2 * a.chunk_size},
                "parallel": {"chunk_size": a.chunk_size},
                "train": {"steps": 1 << 30, "lr": 1e-5, "warmup_steps": 0, "dtype": "fp32" if a.cpu else "bf16"},
                "checkpoint": {"resume": False, "export_hf": False}, "logging": {"progress": "none"}}

    def use(self, preset: str, attn: str = "magi", tiled_mlp: int | None = None, offload: bool = False,
            when: str = "needed"):
        """The trainer for (preset, attention), levers set as asked (the MLP tiling and offload switch in place)."""
        from ..train.config import from_dict
        from ..train.loop import Trainer

        tiled_mlp = self.args.mlp_chunk if tiled_mlp is None else tiled_mlp
        key = (preset, attn)
        if key != self.key or self.trainer is None:
            self.drop()
            t0 = time.monotonic()
            self.trainer = Trainer(from_dict(self._config(preset, attn, tiled_mlp)))
            self.key = key
            use_sequence(self.trainer, wl.packed_documents(2 * self.args.chunk_size, self.trainer.lm.config.vocab_size))
            self.trainer.train_step()  # AdamW moments exist from here on
            self.log({"part": "build", "model": preset, "attention": attn, "seconds": time.monotonic() - t0})
        tile_mlp(self.trainer.lm, tiled_mlp, when)
        if offload and self.trainer.offload is None:
            self.trainer.offload = ActivationOffload(self.device, min_bytes=0 if self.args.tiny else 1 << 20)
        elif not offload and self.trainer.offload is not None:
            self.trainer.offload.arena.release()
            self.trainer.offload = None
        return self.trainer

    def drop(self) -> None:
        if self.trainer is not None and self.trainer.offload is not None:
            self.trainer.offload.arena.release()
        self.trainer = self.key = None
        free_trainer()
        if self.device.type == "cuda" and hasattr(torch._C, "_host_emptyCache"):
            torch._C._host_emptyCache()  # pinned blocks torch cached (the loss part's weight snapshot)

    # ------------------------------------------------------------------ steps
    def predict_s(self, mode: tuple, seq_len: int) -> float:
        """Seconds for one step at ``seq_len``: the mode's (else any mode's slowest) last seconds per token, +30%."""
        rate = self.sec_per_token.get(mode)
        if rate is None:  # a mode not run yet: the slowest rate seen, x3.5 for the 3B model (about 3x the FLOPs)
            rate = max(self.sec_per_token.values(), default=0.0) * (3.5 if "3b" in mode[0] else 1.0)
        build = 0.0 if self.key == mode[:2] else (60.0 if "3b" in mode[0] else 25.0)
        return 1.3 * rate * seq_len + build

    def step(self, part: str, preset: str, seq_len: int, *, attn: str = "magi", tiled_mlp: int | None = None,
             offload: bool = False, causal: bool = False, steps: int = 1, extra: dict | None = None,
             when: str = "needed") -> dict:
        """``steps`` training steps on one pack (or causal sequence) of ``seq_len`` tokens; the last step's row."""
        tiled_mlp = self.args.mlp_chunk if tiled_mlp is None else tiled_mlp
        levers = (f"tiled_mlp ({when})" if tiled_mlp else "") + ("+offload" if offload else "")
        mode = (preset, attn, levers)
        head = {"part": part, "model": preset, "attention": attn, "levers": levers or "plain", "seq_len": seq_len,
                "workload": "causal" if causal else f"pack (docs <= {self.args.doc_len})", **(extra or {})}
        predicted = self.predict_s(mode, seq_len) * steps
        left = self.deadline - time.monotonic()
        if predicted > left or predicted > self.args.max_step_s * steps:
            row = {**head, "skipped": f"time (predicted {predicted:.0f} s, {max(left, 0):.0f} s left)"}
            self.log(row)
            return row

        def run() -> dict:
            trainer = self.use(preset, attn, tiled_mlp, offload, when)
            vocab = trainer.lm.config.vocab_size
            seq = (wl.causal_sequence(seq_len, vocab, seed=self.args.seed) if causal else
                   wl.packed_documents(seq_len, vocab, seed=self.args.seed, max_doc_len=self.args.doc_len))
            use_sequence(trainer, seq)
            res = {}
            for _ in range(steps):
                res = probe_step(trainer, self.device)
            if trainer.offload is not None:
                res["host_arena_gib"] = trainer.offload.host_bytes / GIB
                res["host_pinned"] = all(b.pinned for b in trainer.offload.arena.blocks)
                res["offloaded_gib"] = trainer.offload.saved_bytes / GIB
            return {**res, **wl.describe(seq)}

        res = run_guarded(run, self.device)
        if "step_s" in res:
            self.sec_per_token[mode] = res["step_s"] / seq_len
            res.update(split(res))
        else:
            self.drop()
        row = {**head, "fits": "step_s" in res, **res}
        self.log(row)
        return row


def split(res: dict) -> dict:
    """The peak memory split of a row (GiB): state, kept activations, backward working set, allocator slack."""
    if "peak_gib" not in res:
        return {}
    return {"state_gib": res["fwd_start_gib"], "kept_gib": res["fwd_end_gib"] - res["fwd_start_gib"],
            "backward_gib": res["peak_gib"] - res["fwd_end_gib"], "slack_gib": res["reserved_gib"] - res["peak_gib"]}


def usable_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return (total - (total - free - torch.cuda.memory_reserved(device))) / GIB - 1.0


def next_length(rows: list[dict], target_gib: float | None, granule: int) -> int | None:
    """The length where peak memory, linear through the two longest fitting rows, meets ``target_gib``."""
    fit = sorted((r for r in rows if r.get("fits") and "peak_gib" in r), key=lambda r: r["seq_len"])[-2:]
    if target_gib is None or len(fit) < 2 or fit[1]["seq_len"] == fit[0]["seq_len"]:
        return None
    a, b = fit
    slope = (b["peak_gib"] - a["peak_gib"]) / (b["seq_len"] - a["seq_len"])
    if slope <= 0:
        return None
    n = int(b["seq_len"] + (target_gib - b["peak_gib"]) / slope) // granule * granule
    return n if n > b["seq_len"] else None


def host_cap(args, per_token_bytes: float) -> int:
    """The longest length whose offloaded activations fit ``--host-frac`` of the free host memory."""
    free = host_memory_gib("MemAvailable") or 0.0
    return int(args.host_frac * free * GIB / max(per_token_bytes, 1.0)) // args.granule * args.granule


def offload_per_token(preset: str) -> float:
    """Host bytes per token offloading saves: each layer's bf16 input, the final norm's and the loss's inputs."""
    from ..train.model import PRESETS

    c = PRESETS[preset]
    return 2.0 * c["hidden_size"] * (c["num_hidden_layers"] + 2)


def run_parts(s: Session, args) -> None:
    rows: list[dict] = []
    rec = lambda r: rows.append(r) or r  # noqa: E731
    big = "llama-1b"
    # 1. every on-GPU lever (tiled MLP where memory is short, tiled loss, norms recomputed): tokens/s
    for n in args.speed:
        rec(s.step("1 speed", big, n, steps=args.speed_steps))
    # 2. lever by lever (the MLP tiled even where it would fit untiled: its cost), and the losses
    for mlp, off in ((0, False), (args.mlp_chunk, False), (args.mlp_chunk, True)):
        # two steps with offload: the first one also page-locks the host arena
        rec(s.step("2 levers", big, args.lever_len, tiled_mlp=mlp, offload=off, steps=1 + off, when="always"))
    loss_rows(s, args, big)
    # 3. many-document pack vs one causal sequence
    rec(s.step("3 pack vs causal", big, args.pack_len))
    rec(s.step("3 pack vs causal", big, args.pack_len, causal=True))
    # 4. the 3B-shaped model with offload, capped by the host memory
    s.drop()
    offload_target(s, args, rec, "4 llama-3b", "llama-3b", args.long_3b)
    # 5-6. the 1.1B targets: past 1,048,576 tokens q holds more than 2**31 elements (32 heads x 64), where a kernel
    # with 32-bit offsets fails, possibly taking the CUDA context with it: after everything shorter
    s.drop()
    long_row = rec(s.step("5 longest", big, args.long))
    if not long_row.get("fits") and "skipped" not in long_row:  # bracket once below
        rec(s.step("5 longest", big, (args.long * 4 // 5) // args.granule * args.granule))
    offload_target(s, args, rec, "6 offload longest", big, args.offload_long)
    # 7. what a TRL user has today
    s.drop()
    if not args.cpu:  # FlexAttention has no CPU backward
        for n in args.flex:
            r = rec(s.step("7 HF flex_attention", big, n, attn="flex_attention", tiled_mlp=0))
            if not r.get("fits"):
                break
    s.drop()
    # 8. upward while time remains: llama-1b without offload, then with
    for off in (False, True):
        mode_rows = [r for r in rows if r.get("model") == big and r.get("attention", "magi") == "magi"
                     and r.get("levers") == ("tiled_mlp (needed)+offload" if off else "tiled_mlp (needed)")]
        n = next_length(mode_rows, usable_gib(s.device), args.granule)
        if n is not None and off:
            n = min(n, host_cap(args, offload_per_token("tiny" if args.tiny else big)))
        if n is not None and n > max(r["seq_len"] for r in mode_rows if r.get("fits")):
            rec(s.step("8 search", big, n, offload=off))


def offload_target(s: Session, args, rec: Callable[[dict], dict], part: str, preset: str, target: int) -> None:
    """One offloaded step at ``target`` tokens, or at the longest length whose host copies fit the free host RAM."""
    per_tok = offload_per_token("tiny" if args.tiny else preset)
    n = min(target, host_cap(args, per_tok))
    extra = {"target": target, "host_need_gib": per_tok * target / GIB,
             "host_free_gib": host_memory_gib("MemAvailable"), "host_capped": n < target}
    rec(s.step(part, preset, n, offload=True, extra=extra))


def loss_rows(s: Session, args, preset: str) -> None:
    """Losses over ``--loss-steps`` steps from the same weights: every lever on vs plain."""
    left = s.deadline - time.monotonic()
    predicted = 2 * args.loss_steps * s.predict_s((preset, "magi", "tiled_mlp (always)+offload"), args.loss_len)
    if predicted > left:
        s.log({"part": "2 losses", "skipped": f"time (predicted {predicted:.0f} s)"})
        return

    def run() -> dict:
        out = {}
        trainer = s.use(preset)
        seq = wl.packed_documents(args.loss_len, trainer.lm.config.vocab_size, seed=args.seed,
                                  max_doc_len=args.doc_len)
        use_sequence(trainer, seq)
        initial = InitialState(trainer)
        for name, mlp, off in (("plain", 0, False), ("all levers", args.mlp_chunk, True)):
            initial.restore()
            s.use(preset, tiled_mlp=mlp, offload=off, when="always")
            out[name] = [trainer.train_step().loss for _ in range(args.loss_steps)]
        rel = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(out["plain"], out["all levers"])]
        return {"losses_plain": out["plain"], "losses_levers": out["all levers"], "max_rel_diff": max(rel),
                "within_bf16": max(rel) <= 2.0**-8}

    res = run_guarded(run, s.device)
    if "max_rel_diff" not in res:
        s.drop()
    s.log({"part": "2 losses", "model": preset, "seq_len": args.loss_len, "steps": args.loss_steps, **res})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from . import longest_report
    from .e2e_bench import _init

    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import torch._dynamo

    torch._dynamo.config.automatic_dynamic_shapes = False
    device = _init(argparse.Namespace(cpu=args.cpu))
    args.out.mkdir(parents=True, exist_ok=True)
    meta = longest_report.meta(args, device)
    rows: list[dict[str, Any]] = []

    def log(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        (args.out / "longest.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        longest_report.write(meta, rows, args.out, plot=False)

    s = Session(args, device, log)
    try:
        run_parts(s, args)
    finally:
        s.drop()
        print("\n" + longest_report.write(meta, rows, args.out), flush=True)
        from ..train.loop import close_distributed

        close_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
