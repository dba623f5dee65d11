"""Rollout generation: the vLLM Generator (an actor), its engine's weight load and read-back
(``vllm_engine``), and the elastic GeneratorPool (driver side)."""
