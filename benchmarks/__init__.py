"""Benchmarks of lightning_compress (``python benchmarks/netem.py --help``)."""
