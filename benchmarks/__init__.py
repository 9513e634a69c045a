"""Benchmarks and load scripts: run by `make bench` or by hand, never collected by pytest."""
