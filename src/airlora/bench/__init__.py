"""Benchmarks: the project against its peer, measured in the same run."""
