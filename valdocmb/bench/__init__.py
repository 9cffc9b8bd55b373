"""Benchmarks on real-sized inputs (timings and memory measured in one run); not tests, not in the image."""
