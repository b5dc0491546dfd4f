"""The ``flexcp`` command: one entry point, subcommands imported lazily."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module with main(argv) -> int, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "example": ("flexcp.example", "build a prefix-tree mask and run attention on it (CPU-friendly)"),
    "finetune": ("flexcp.train.cli", "fine-tune an HF model with FSDP2 x context parallelism (YAML config; torchrun)"),
    "demo": ("flexcp.train.demo", "2 local CPU processes learn long-range recall with cp=2 (a minute or two)"),
}
BENCHES: dict[str, tuple[str, str]] = {
    "cp": ("flexcp.bench.cp_bench", "distributed attention per GPU: flexcp vs all-gather and ring (torchrun)"),
    "e2e": ("flexcp.bench.e2e_bench", "end-to-end recipe training on packed / rollout / sliding / causal workloads vs HF "
                                      "flex_attention, sdpa, torch native CP; longest sequence one GPU trains (GPU)"),
    "kernel": ("flexcp.bench.kernel_bench", "single-device kernels vs cuDNN SDPA / FlexAttention (GPU)"),
    "reference": ("flexcp.bench.reference_bench", "pure-PyTorch reference: tokens/s and memory (CPU)"),
    "solver": ("flexcp.bench.solver_report", "dispatch solvers: imbalance and planning time"),
}


def _run(module: str, argv: list[str]) -> int:
    return int(importlib.import_module(module).main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="flexcp",
        description="Context-parallel flexible attention for long-context fine-tuning.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    bench = sub.add_parser("bench", help="benchmarks (see `flexcp bench --help`)")
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCH")
    for name, (_, help_text) in BENCHES.items():
        bench_sub.add_parser(name, help=help_text, add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command is None:  # like argparse on a missing required argument: usage, exit status 2
        parser.print_help(sys.stderr)
        return 2
    if args.command == "bench":
        if args.bench is None:
            bench.print_help(sys.stderr)
            return 2
        return _run(BENCHES[args.bench][0], rest)
    return _run(COMMANDS[args.command][0], rest)


if __name__ == "__main__":
    raise SystemExit(main())
