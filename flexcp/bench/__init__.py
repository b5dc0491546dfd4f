"""Benchmarks and their helpers (scripts with main(argv) -> int, run by `flexcp bench ...`)."""
