"""``flexcp finetune``: parse the command line, validate the config, run the recipe."""

from __future__ import annotations

import argparse
import os
import sys

from ..clihelp import new_parser
from .config import ConfigError, load_config, to_dict, validate
from .errors import RunError

DESCRIPTION = """\
Fine-tune a Hugging Face causal LM with FSDP2 x context parallelism (flexcp attention).
One YAML config describes the run; key=value arguments override it.

examples:
  flexcp finetune --config flexcp/train/configs/recall_tiny.yaml parallel.cp=1 train.steps=50
  torchrun --nproc_per_node 4 -m flexcp.cli finetune --config my.yaml parallel.cp=4
  flexcp finetune --config my.yaml --check --nproc-per-node 8    # validate for 8 ranks, start nothing

A plain `flexcp finetune` is a world of one process; under torchrun every rank runs it.

exit status: 0 done; 2 a problem the message names with its fix (the config, out_dir, a
checkpoint that cannot be written or resumed, a non-finite loss); 1 anything else (a traceback).
"""


def default_threads() -> int | None:
    """Like torchrun: one intra-op thread per process unless ``OMP_NUM_THREADS`` says otherwise.

    torch's default (one thread per core) oversubscribes a CPU that runs other processes
    (several ranks, data loading, another job) and can be tens of times slower. Returns the
    thread count set, or None when ``OMP_NUM_THREADS`` is set (torch already honours it).
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    import torch

    torch.set_num_threads(1)
    return 1


def check_world_size(nproc_per_node: int | None, nnodes: int) -> int:
    """The world size ``--check`` validates for: ``--nproc-per-node x --nnodes``, else torchrun's, else the config's."""
    if nproc_per_node is not None:
        return nproc_per_node * nnodes
    return int(os.environ.get("WORLD_SIZE", "0"))  # 0: the smallest world the config fits (dp x cp)


def build_parser() -> argparse.ArgumentParser:
    p = new_parser("flexcp finetune", DESCRIPTION)
    p.add_argument("--config", help="YAML config (omit for the defaults: tiny preset on the recall task)")
    p.add_argument("--check", action="store_true",
                   help="validate the config, print it resolved, and exit without starting anything")
    p.add_argument("--nproc-per-node", "--nproc_per_node", type=int, default=None, metavar="N",
                   help="with --check: processes per node of the intended launch (default: torchrun's world, "
                        "else parallel.dp x parallel.cp of the config)")
    p.add_argument("--nnodes", type=int, default=1, metavar="N", help="with --check: nodes of the intended launch")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=1e-4")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 prints config and errors
    if not args.check and (args.nproc_per_node is not None or args.nnodes != 1):
        p.error("--nproc-per-node and --nnodes only apply to --check; launch several processes with torchrun")
    for flag, value in (("--nproc-per-node", args.nproc_per_node), ("--nnodes", args.nnodes)):
        if value is not None and value < 1:
            p.error(f"{flag} must be >= 1; got {value}")
    try:
        cfg = load_config(args.config, args.overrides)
        world = check_world_size(args.nproc_per_node, args.nnodes) if args.check else \
            int(os.environ.get("WORLD_SIZE", "1"))
        if world == 0:
            world = (cfg.parallel.dp or 1) * cfg.parallel.cp
        validate(cfg, world)
    except ConfigError as exc:
        p.exit(2, f"flexcp finetune: config error: {exc}\n" if main_rank else None)
    if args.check:
        if main_rank:
            import yaml

            print(f"# valid for a world of {world}: dp={cfg.parallel.dp} x cp={cfg.parallel.cp}")
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    default_threads()
    from .loop import Trainer, close_distributed

    try:
        Trainer(cfg).fit()
    except RunError as exc:
        if main_rank:
            print(f"flexcp finetune: error: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        close_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
