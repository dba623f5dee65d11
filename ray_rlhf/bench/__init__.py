"""Benchmarks of a run: phases, the bound, generation baselines, weight sync, memory (``ray-rlhf bench``)."""
