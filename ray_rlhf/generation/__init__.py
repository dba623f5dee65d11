"""Rollout generation: the vLLM Generator (an actor) and the elastic GeneratorPool (driver side)."""
