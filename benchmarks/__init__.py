"""Benchmarks, run from the repository root as modules: `python -m benchmarks.train_throughput --quick`,
`python -m benchmarks.inference`. Results, machines and method: benchmarks/RESULTS.md."""
