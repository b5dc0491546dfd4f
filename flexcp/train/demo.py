"""flexcp demo: two local CPU processes train a tiny Llama with cp = 2 on long-range recall.

Each sequence hides key/value pairs in its second quarter and asks for the values at its
end, more than one CP shard (seq_len / 2 tokens) later and on the other rank: the answer
is only reachable through attention across ranks. The demo prints held-out recall accuracy before and
after training against chance (1 / num_values) and exits non-zero if it did not learn.
"""

from __future__ import annotations

import argparse
import json
import os
from contextlib import contextmanager
from importlib import resources
from typing import Iterator

import numpy as np
import torch
import torch.multiprocessing as mp

from ..clihelp import new_parser
from .config import ConfigError, FinetuneConfig, from_dict, load_config, to_dict, validate
from .parallel import free_port

DEMO_CONFIG = "demo.yaml"
EVAL_BATCHES = 64
LEARNED_FACTOR = 4.0
"""The demo counts as learned when held-out accuracy exceeds this many times chance."""


def demo_config(overrides: list[str] | tuple[str, ...] = ()) -> FinetuneConfig:
    """The packaged demo config with ``key=value`` overrides applied."""
    path = resources.files("flexcp.train") / "configs" / DEMO_CONFIG
    with resources.as_file(path) as p:
        return load_config(str(p), overrides)


def cross_rank_fraction(cfg: FinetuneConfig, batches: int = EVAL_BATCHES) -> float:
    """Share of recall queries whose value token the step's dispatch plan puts on another rank than the query."""
    from ..mask import AttnMaskSpec
    from ..runtime.api import DEFAULT_NUM_STAGES
    from ..runtime.placement import choose_plan
    from ..sharding import IGNORE_INDEX
    from .data import RecallSource
    from .model import preset_config

    s, r = cfg.data.seq_len, cfg.data.recall
    c = preset_config(cfg.model.preset, 256, cfg.model.overrides)
    plan, _ = choose_plan(AttnMaskSpec.causal(s), cfg.parallel.cp, cfg.parallel.chunk_size, "auto",
                          DEFAULT_NUM_STAGES, c.num_attention_heads, c.num_key_value_heads)  # as build_key plans it
    owner = plan.owner_of_chunk
    src = RecallSource(s, r.num_pairs, r.num_values, cfg.train.seed, None, r.filler)
    crossed = total = 0
    for i in range(batches):
        seq = src.get(i)
        ids = seq.input_ids.numpy()
        for q in np.nonzero(seq.labels.numpy() != IGNORE_INDEX)[0]:
            v = s // 4 + int(np.nonzero(ids[s // 4 : s // 2] == ids[q])[0][0]) + 1
            crossed += owner[v // plan.chunk_size] != owner[q // plan.chunk_size]
            total += 1
    return crossed / max(total, 1)


def _worker(rank: int, world: int, port: int, cfg_dict: dict, result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from .loop import Trainer, close_distributed

    try:
        trainer = Trainer(from_dict(cfg_dict))
        _, before = trainer.evaluate(EVAL_BATCHES)
        if rank == 0:
            print(f"held-out recall accuracy before training: {before:.1%}", flush=True)
        summary = trainer.fit()
        _, after = trainer.evaluate(EVAL_BATCHES)
        if rank == 0:
            with open(result_path, "w") as f:
                json.dump({"acc_before": before, "acc_after": after, **summary}, f)
    finally:
        close_distributed()


@contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Set environment variables for the spawned workers only."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def build_parser() -> argparse.ArgumentParser:
    p = new_parser("flexcp demo", __doc__)
    p.add_argument("--nproc", type=int, default=2, help="local CPU processes (the world size)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides of the demo config, e.g. train.steps=100 out_dir=/tmp/demo")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        cfg = validate(demo_config(args.overrides), args.nproc)
    except ConfigError as exc:
        p.exit(2, f"flexcp demo: config error: {exc}\n")
    if cfg.data.kind != "recall":
        p.exit(2, "flexcp demo: config error: the demo trains data.kind='recall'\n")
    chance = 1 / cfg.data.recall.num_values
    s, cp = cfg.data.seq_len, cfg.parallel.cp
    print(f"flexcp demo: {args.nproc} CPU processes, dp={cfg.parallel.dp} x cp={cp}, tiny Llama on synthetic recall.\n"
          f"  {s}-token sequences, {s // cp} tokens per CP shard; every value sits in tokens {s // 4}..{s // 2 - 1} "
          f"and the question for it is in the last {3 * cfg.data.recall.num_pairs} tokens,\n"
          f"  more than one shard away; the dispatch plan puts value and query on different ranks in "
          f"{cross_rank_fraction(cfg):.0%} of queries. Chance accuracy: {chance:.1%}.", flush=True)
    os.makedirs(cfg.out_dir, exist_ok=True)
    result_path = os.path.join(cfg.out_dir, "demo_result.json")
    if os.path.exists(result_path):
        os.remove(result_path)
    with _environ(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1"):  # the CPU try-out, even on a GPU machine
        mp.spawn(_worker, args=(args.nproc, free_port(), to_dict(cfg), result_path), nprocs=args.nproc, join=True)
    with open(result_path) as f:
        result = json.load(f)
    learned = result["acc_after"] > LEARNED_FACTOR * chance
    print(f"\nheld-out recall accuracy: {result['acc_before']:.1%} before -> {result['acc_after']:.1%} after "
          f"{result['final_step']} steps (chance {chance:.1%}): "
          + ("learned, through attention across CP shards." if learned else "NOT learned."), flush=True)
    return 0 if learned else 1


if __name__ == "__main__":
    raise SystemExit(main())
