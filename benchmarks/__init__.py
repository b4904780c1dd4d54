"""Benchmarks: one script per measured path, each printing one JSON line. Run from the repository root as
`python -m benchmarks.<name>`."""
