"""Throughput benchmarks of ray-rlhf: ``python -m benchmarks.run [--quick] [--out DIR]`` (see README.md)."""
