"""Benchmarks for privsep (scripts, not tests). See bench/README.md."""
