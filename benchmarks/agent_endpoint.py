"""The OpenAI-client agent endpoint vs environment trajectories on one in-process engine.

One Generator (tiny model, no Ray), one shard of 8 prompts x 4 samples x 2 turns of 12 tokens,
alternately with ``env.name=ray_rlhf.envs.letters:LetterGame`` (turn-synchronous trajectories) and
``env.agent=ray_rlhf.envs.openai_agents:letter_rollout`` (the same game written against the
``openai`` client, served by the generator's chat-completions endpoint). Prints per run the wall
time, model tokens per second, ``env/seconds`` (agents: the shard's time with the engine idle) and,
for the agent, how many engine calls the endpoint's batching made (INFO log line).

    python benchmarks/agent_endpoint.py [ROUNDS]
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path

from ray_rlhf.envs.letters import LetterGame
from ray_rlhf.envs.openai_agents import letter_rollout
from ray_rlhf.generation.generator import Generator
from ray_rlhf.models.factory import ensure_model
from ray_rlhf.records import PromptItem, PromptShard, SamplingSpec

ENV = dict(name="ray_rlhf.envs.letters:LetterGame", kwargs={"turns": 2}, max_turns=2, step_timeout_s=10.0,
           max_total_tokens=192)
PROMPTS = ["The cat sat on", "Once upon a time", "Water is", "Tell me a story about a dog"] * 2


def main(rounds: int = 3) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = ensure_model("policy", "tiny", Path(tempfile.gettempdir()) / "ray-rlhf-bench-models", seed=0)
    gen = Generator(path, "bench", max_model_len=256, seed=0, kv_cache_gib=1, env=ENV)
    tok = gen._llm.get_tokenizer()
    shard = PromptShard(0, tuple(PromptItem(i, t, tuple(tok(t).input_ids), {}) for i, t in enumerate(PROMPTS)))
    spec = SamplingSpec(n=4, max_new_tokens=12, seed=7)
    for _ in range(rounds):
        for label in ("env", "agent"):
            gen._agent, gen._env_cls = (letter_rollout, None) if label == "agent" else (None, LetterGame)
            t0 = time.perf_counter()
            report, batch = gen.generate(shard, spec)
            dt = time.perf_counter() - t0
            print(f"{label}: {len(batch)} trajectories, {report.env['turns']} turns, {report.tokens} model tokens, "
                  f"{dt:.2f} s, {report.tokens / dt:.0f} model tok/s, env/seconds {report.env['seconds']:.2f}")
    gen.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
