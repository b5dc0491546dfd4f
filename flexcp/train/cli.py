"""``flexcp finetune --config cfg.yaml [key=value ...]``: run the recipe (under torchrun for several ranks).

Examples::

    flexcp finetune --config flexcp/train/configs/recall_tiny.yaml train.steps=50
    torchrun --nproc_per_node 4 -m flexcp.cli finetune --config my.yaml parallel.cp=4
"""

from __future__ import annotations

import argparse
import os

from .config import ConfigError, load_config, to_dict, validate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="flexcp finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (omit for the defaults: tiny preset on the recall task)")
    p.add_argument("--check", action="store_true", help="validate the config for this world size, print it, exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=1e-4")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as exc:
        p.exit(2, f"flexcp finetune: config error: {exc}\n")
    if args.check:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    from .loop import Trainer, close_distributed

    try:
        Trainer(cfg).fit()
    finally:
        close_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
