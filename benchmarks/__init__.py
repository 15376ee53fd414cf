"""Benchmarks that `make bench` runs: each ``bench_*.py`` module here contributes a section."""
