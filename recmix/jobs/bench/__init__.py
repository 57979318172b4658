"""Benchmarks registered in `recmix.platform.bench` (each `run(quick) -> BenchReport`)."""
