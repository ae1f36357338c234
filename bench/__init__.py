"""Benchmarks: the whole chains side by side (``python -m bench``), and each side alone."""
