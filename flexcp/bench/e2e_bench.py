"""End-to-end training on the workloads users train, against what they would run instead, in one launch.

Every point trains the recipe (``flexcp.train.loop.Trainer``: FSDP2, bf16 compute, activation
checkpointing, the chunked loss, AdamW) on one sequence per step per data-parallel rank, built
by ``flexcp.bench.e2e_workloads`` with the recipe's packers; every step of a point trains the
same sequence. Workloads, at each ``--sizes`` length S:

- ``packed``: documents drawn from the corpus histogram (pack seed 0), ``llama-1b``;
- ``rollouts``: one prompt (S/4) and 8 completions as a prefix tree, ``llama-1b``; the
  ``magi-unshared`` contender trains the same rollouts laid out without sharing (prompt +
  completion per document: about 2.75 S tokens, the same label tokens);
- ``sliding``: one causal sequence on ``mistral-1b`` (same shapes, every layer a 4096-key window);
- ``causal``: one causal sequence, ``llama-1b``.

Contenders: ``magi`` (flexcp); at cp = 1 Hugging Face's ``flex_attention`` and ``sdpa``, which
read document boundaries from the packed ``position_ids`` (``sdpa`` then gets a dense mask); at
cp > 1 torch's native context parallelism (``native``, ``flexcp.bench.native_cp``), which has
no mask language and trains a pack as ONE causal sequence (documents see each other: the
table reports the attention cells each contender computes). Every point starts from the
same initial weights and a fresh optimizer, so the first step's loss is comparable across
contenders. After the table, ``flexcp.bench.e2e_memory`` finds the longest sequence one GPU
trains (memory-limited), with and without activation offloading.

    python -m flexcp.bench.e2e_bench --out results/e2e                          # one GPU, everything
    torchrun --nproc_per_node 4 -m flexcp.bench.e2e_bench --cp 2 4 --no-probe   # cp > 1 rows (magi, native)
    python -m flexcp.bench.e2e_bench --cpu --tiny --sizes 256 --steps 1         # CPU smoke run (no probe)

Points run in priority order and stop starting at the time budget (``--budget-s``, of which
``--probe-reserve-s`` is kept for the probe); what did not run is listed as not run.
Writes ``<out>/e2e.json`` (after every point), ``e2e.md`` (tables) and ``e2e.png`` (plot).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..clihelp import new_parser
from ..train.data import PackedSequence
from ..train.loop import Trainer, close_distributed
from ..train.metrics import model_flops
from . import e2e_workloads as wl
from .e2e_trainers import (InitialState, all_max, build_trainer, free_trainer, preset_of, run_guarded,
                           use_sequence)

CONTENDERS = ("magi", "magi-unshared", "flex_attention", "flex_attention-unshared", "sdpa", "native")


@dataclass(frozen=True)
class Setup:
    """One (workload, contender, cp) series of points."""

    workload: str
    contender: str
    cp: int

    @property
    def impl(self) -> str:
        """The attention the model runs: ``magi``, ``flex_attention``, ``sdpa`` or ``native``."""
        return self.contender.removesuffix("-unshared")

    @property
    def unshared(self) -> bool:
        return self.contender.endswith("-unshared")


# (workload, contender) in priority order, grouped so consecutive setups share one trainer
CP1 = [("packed", "magi"), ("rollouts", "magi"), ("rollouts", "magi-unshared"), ("causal", "magi"),
       ("packed", "flex_attention"), ("packed", "sdpa"), ("causal", "sdpa"),
       ("sliding", "magi"), ("sliding", "flex_attention")]
CP1_EXTRAS = [("sliding", "sdpa"), ("causal", "flex_attention"), ("rollouts", "flex_attention-unshared")]
CPN = [("packed", "magi"), ("causal", "magi"), ("rollouts", "magi"), ("rollouts", "magi-unshared"),
       ("packed", "native"), ("causal", "native"), ("sliding", "magi")]


def build_setups(cps: list[int], world: int, workloads: list[str], contenders: list[str], extras: bool) -> list[Setup]:
    """The setups of this launch: each cp in ``cps`` that divides ``world``, filtered, in priority order."""
    out = []
    for cp in cps:
        if world % cp:
            continue
        pairs = (CP1 + (CP1_EXTRAS if extras else [])) if cp == 1 else CPN
        out += [Setup(w, c, cp) for w, c in pairs if w in workloads and c in contenders]
    return out


# ------------------------------------------------------------------------------------------ trainers


# ------------------------------------------------------------------------------------------ batches


def batch_for(setup: Setup, size: int, vocab: int, args) -> PackedSequence:
    """The sequence a setup trains at nominal length ``size`` (identical for every contender of a workload)."""
    if setup.workload == "packed":
        return wl.packed_documents(size, vocab, seed=args.seed)
    if setup.workload == "rollouts":
        r = wl.rollouts(size, vocab, seed=args.seed, completions=args.completions, prompt_frac=args.prompt_frac,
                        multiple_of=setup.cp * args.chunk_size if setup.cp > 1 else 1)
        return r.unshared if setup.unshared else r.shared
    return wl.causal_sequence(size, vocab, seed=args.seed)


def sliding_window_of(trainer: Trainer) -> int | None:
    w = getattr(trainer.lm.config, "sliding_window", None)
    return int(w) if w else None


# ------------------------------------------------------------------------------------------ measuring


def measure(trainer: Trainer, args) -> dict:
    """Warm-up step(s), then up to ``args.steps`` timed steps (fewer once they pass ``--max-point-s``)."""
    dev = trainer.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    first = [trainer.train_step() for _ in range(args.warmup)]
    times: list[float] = []
    last = first[-1] if first else None
    while len(times) < args.steps:
        last = trainer.train_step()
        times.append(last.seconds)
        (elapsed,) = all_max([sum(times)], dev)
        if elapsed >= args.max_point_s:
            break
    (seconds,) = all_max([sum(times)], dev)
    world = dist.get_world_size()
    out = {"steps": len(times), "first_step_s": first[0].seconds if first else None,
           "loss": (first[0] if first else last).loss, "step_s": seconds / len(times),
           "tokens_per_s_per_gpu": last.tokens * len(times) / seconds / world,
           "label_tokens_per_s_per_gpu": last.label_tokens * len(times) / seconds / world}
    if dev.type == "cuda":
        out["peak_gib"], out["reserved_gib"] = all_max([torch.cuda.max_memory_allocated(dev) / 2**30,
                                                        torch.cuda.max_memory_reserved(dev) / 2**30], dev)
    return out


def point_row(setup: Setup, size: int, trainer: Trainer, seq: PackedSequence, res: dict) -> dict:
    """A table row: the setup, the batch, the attention cells the contender computes, and the measurement."""
    window = sliding_window_of(trainer)
    useful = wl.windowed_area(seq, window)
    row = {"workload": setup.workload, "contender": setup.contender, "cp": setup.cp,
           "dp": dist.get_world_size() // setup.cp, "size": size, **wl.describe(seq),
           "window": window, "useful_area": useful, "attn_cells": wl.attention_cells(setup.impl, seq, window), **res}
    if "step_s" in res:
        a = trainer.arch
        flops = model_flops(trainer.matmul_params, seq.input_ids.numel(), useful, **a)
        row["useful_tflops_per_gpu"] = flops / setup.cp / res["step_s"] / 1e12
    return row


class TrainerCache:
    """At most one live trainer, rebuilt when the (preset, attention, cp) changes or after a failure."""

    def __init__(self, args) -> None:
        self.args, self.key, self.trainer, self.initial = args, None, None, None

    def get(self, setup: Setup) -> Trainer:
        preset, overrides = preset_of(setup.workload, self.args.tiny)
        key = (preset, json.dumps(overrides, sort_keys=True), setup.impl, setup.cp)
        if key != self.key:
            self.drop()
            self.trainer = build_trainer(setup.impl, setup.cp, preset, overrides, self.args)
            self.initial, self.key = InitialState(self.trainer), key
        return self.trainer

    def drop(self) -> None:
        if self.trainer is not None:
            self.trainer = self.initial = self.key = None
            free_trainer()


def predict_point_s(last: dict, size: int, args) -> float:
    """Seconds a point at ``size`` should take from the previous size's row: the first step once (compilation
    and warm-up do not grow with the length), the other steps quadratic in the length (pessimistic)."""
    steady = last["step_s"] * (size / last["size"]) ** 2
    first = last.get("first_step_s") or steady
    timed = min(args.steps, max(1, int(args.max_point_s // steady) + 1))
    return first + steady * (timed + max(0, args.warmup - 1))


def run_table(setups: list[Setup], args, deadline: float, device: torch.device, log: Callable[[dict], None]) -> None:
    """Measure every setup at every size in order; a point past ``deadline`` (or after a failure) is not run."""
    cache = TrainerCache(args)
    for setup in setups:
        last: dict | None = None  # the previous size's row
        failed = False
        for size in sorted(args.sizes):
            head = {"workload": setup.workload, "contender": setup.contender, "cp": setup.cp, "size": size}
            predicted = 0.0 if last is None else predict_point_s(last, size, args)
            if failed or time.monotonic() + predicted > deadline:
                log({**head, "skipped": "failed at a shorter length" if failed else "time budget"})
                continue
            state: dict[str, Any] = {}

            def point() -> dict:
                trainer = state["trainer"] = cache.get(setup)
                seq = state["seq"] = batch_for(setup, size, trainer.lm.config.vocab_size, args)
                use_sequence(trainer, seq)
                cache.initial.restore()
                return measure(trainer, args)

            res = run_guarded(point, device)
            row = point_row(setup, size, state["trainer"], state["seq"], res) if "seq" in state else {**head, **res}
            log(row)
            state.clear()
            if "step_s" not in res:
                cache.drop()  # a failed step can leave FSDP / autograd state behind
                failed = True
            last = row
    cache.drop()


# ------------------------------------------------------------------------------------------ the launch


DESCRIPTION = """\
Training speed of the fine-tuning recipe with flexcp attention against HF flex_attention and
sdpa (cp = 1) and torch's native context parallelism (cp > 1), on packed documents, shared-prefix
rollouts, a sliding-window model and one causal sequence; then the longest sequence one GPU
trains, with and without activation offloading. Writes OUT/e2e.json, e2e.md and e2e.png.
Numbers and how they were taken: docs/benchmarks.md.

examples:
  python -m flexcp.bench.e2e_bench --out results/e2e                          # one GPU, everything
  torchrun --nproc_per_node 4 -m flexcp.bench.e2e_bench --cp 2 4 --no-probe   # cp > 1 rows
  flexcp bench e2e --cpu --tiny --sizes 256 --steps 1                         # CPU smoke run (~30 s)
"""
PROBE_START = [131072, 262144]
"""The probe's first two lengths on full-size models (``--probe-start``)."""


def build_parser() -> argparse.ArgumentParser:
    p = new_parser("flexcp bench e2e", DESCRIPTION)
    p.add_argument("--sizes", type=int, nargs="+", default=[32768, 65536], help="sequence lengths (tokens)")
    p.add_argument("--workloads", nargs="+", default=list(wl.WORKLOADS), choices=wl.WORKLOADS, help="what to train")
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS,
                   help="attention implementations to compare (-unshared: rollouts without prefix sharing)")
    p.add_argument("--extras", action="store_true",
                   help="also sdpa on sliding, flex_attention on causal and on unshared rollouts (cp = 1)")
    p.add_argument("--cp", type=int, nargs="+", default=[1], help="CP sizes (each must divide the world size)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per point (after --warmup)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per point first")
    p.add_argument("--max-point-s", type=float, default=10.0, help="stop timing a point after this many seconds")
    p.add_argument("--budget-s", type=float, default=1200.0, help="no new point starts after this many seconds")
    p.add_argument("--chunk-size", type=int, default=512, help="dispatch chunk (tokens)")
    p.add_argument("--seed", type=int, default=0, help="seed of the packs, rollouts and tokens")
    p.add_argument("--completions", type=int, default=8, help="completions per rollout prompt")
    p.add_argument("--prompt-frac", type=float, default=0.25, help="rollout prompt length / sequence length")
    p.add_argument("--no-probe", dest="probe", action="store_false", help="skip the longest-sequence probe")
    p.add_argument("--probe-only", action="store_true", help="only the longest-sequence probe (no table)")
    p.add_argument("--probe-reserve-s", type=float, default=400.0, help="seconds of --budget-s kept for the probe")
    p.add_argument("--probe-start", type=int, nargs=2, default=None,
                   help="the probe's first two lengths, whose peak memory predicts the longest "
                        f"(unset: {PROBE_START[0]} {PROBE_START[1]}; with --tiny or --cpu, unset skips the probe)")
    p.add_argument("--probe-granule", type=int, default=32768, help="length resolution of the probe")
    p.add_argument("--probe-doc-len", type=int, default=8192, help="the probe's documents are cut to this length")
    p.add_argument("--probe-points", type=int, default=3, help="probe steps per mode after the first two lengths")
    p.add_argument("--no-offload", dest="offload", action="store_false", help="probe without offloading only")
    p.add_argument("--host-frac", type=float, default=0.75, help="offloaded activations may use this much host RAM")
    p.add_argument("--out", type=Path, default=Path("results/e2e"), help="output directory")
    p.add_argument("--replot", type=Path, default=None, help="redraw tables and plot from an e2e.json; no training")
    p.add_argument("--cpu", action="store_true", help="run on CPU with gloo (with --tiny and short --sizes)")
    p.add_argument("--tiny", action="store_true", help="tiny models instead of the 1.1B ones (smoke runs, tests)")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.probe_only and not args.probe:
        p.error("--probe-only and --no-probe exclude each other")
    if args.probe_start is None:  # a smoke run does not search the memory limit of a full-size model
        if args.tiny or args.cpu:
            if args.probe_only:
                p.error("--probe-only with --tiny or --cpu needs --probe-start A B (short lengths)")
            args.probe = False
        args.probe_start = list(PROBE_START)
    return args


def _init(args) -> torch.device:
    timeout = datetime.timedelta(seconds=300)  # a rank stuck after another rank failed gives up
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        device = torch.device("cpu")
        if not dist.is_initialized():
            from ..train.parallel import init_distributed

            init_distributed()
        return device
    if not torch.cuda.is_available():
        raise SystemExit("flexcp bench e2e needs a CUDA GPU (torchrun --nproc_per_node N for several), or --cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            from ..train.parallel import free_port

            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(free_port()))
        dist.init_process_group("nccl", device_id=device, timeout=timeout)
    return device


def _meta(args, device: torch.device, argv) -> dict:
    import transformers

    from .e2e_memory import host_memory_gib

    gpu = device.type == "cuda"
    return {"world": dist.get_world_size(), "device": torch.cuda.get_device_name(device) if gpu else "CPU",
            "gpu_memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30 if gpu else None,
            "host_memory_gib": host_memory_gib(), "dtype": "fp32" if args.cpu else "bf16",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
            "sizes": args.sizes, "probe_doc_len": args.probe_doc_len, "steps": args.steps, "warmup": args.warmup,
            "max_point_s": args.max_point_s, "tiny": args.tiny, "completions": args.completions,
            "argv": argv}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from . import e2e_report

    if args.replot is not None:
        data = json.loads(args.replot.read_text())
        e2e_report.write_outputs(data["meta"], data["rows"], args.replot.parent)
        return 0
    start = time.monotonic()
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # long sequences fragment less
    # HF compiles flex_attention; a new length compiles its own static kernel, as in a run at one fixed length
    import torch._dynamo

    torch._dynamo.config.automatic_dynamic_shapes = False
    owns_group = not dist.is_initialized()
    device = _init(args)
    rank = dist.get_rank()
    meta = _meta(args, device, argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    setups = [] if args.probe_only else build_setups(args.cp, dist.get_world_size(), args.workloads,
                                                      args.contenders, args.extras)
    if args.cpu:  # torch's ring attention runs CUDA SDPA only; FlexAttention has no CPU backward
        dropped = sorted({s.contender for s in setups if s.impl in ("native", "flex_attention")})
        setups = [s for s in setups if s.impl not in ("native", "flex_attention")]
        if dropped and rank == 0:
            print(f"--cpu: not running {', '.join(dropped)} (CUDA only)", flush=True)
    points = len(setups) * len(args.sizes)

    def log(row: dict) -> None:
        rows.append(row)
        if rank == 0:
            done = sum(not r.get("probe") for r in rows)
            print(("[probe] " if row.get("probe") else f"[{done}/{points}] ") + e2e_report.progress_line(row, meta),
                  flush=True)
            (args.out / "e2e.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))

    if rank == 0:
        print(f"flexcp bench e2e: {points} points ({len(setups)} setups x {len(args.sizes)} lengths) on "
              f"{meta['world']} x {meta['device']}, {'tiny' if args.tiny else 'full-size'} models"
              + ("; then the longest-sequence probe" if args.probe else "; no longest-sequence probe")
              + f"; results in {args.out}/e2e.json and e2e.md", flush=True)
    try:
        reserve = args.probe_reserve_s if args.probe and setups else 0.0
        run_table(setups, args, start + args.budget_s - reserve, device, log)
        if args.probe:
            from .e2e_memory import run_probe

            run_probe(args, start + args.budget_s, device, log)
    finally:
        if rank == 0:
            (args.out / "e2e.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
            print("\n" + e2e_report.write_outputs(meta, rows, args.out), flush=True)
        if owns_group:
            close_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
