"""twinfer.benchmarks."""
