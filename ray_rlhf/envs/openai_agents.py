"""An agent written against the OpenAI client, as people write them (``env.agent``).

:func:`letter_rollout` plays :class:`~ray_rlhf.envs.letters.LetterGame` with the standard ``openai``
client instead of the environment interface: it asks the model to write using a letter, reads the
reply, names the next letter, and returns the mean share of the named letters in the replies. Run it
with ``env.agent=ray_rlhf.envs.openai_agents:letter_rollout`` (the generator serves the client's
chat completions and records their tokens; see docs/agents.md).
"""

from __future__ import annotations

import random

from ray_rlhf.envs.letters import letter_share

__all__ = ["letter_rollout"]


async def letter_rollout(client, row: dict, letters: str = "eaoi", turns: int = 2, seed: int = 0) -> float:
    """``turns`` chat completions, each asked to use a letter drawn (seeded by the row) from
    ``letters``; the reward is the mean share of the named letter in each reply.

    ``client``: an ``openai.AsyncOpenAI``; ``row``: the prompt's row (``prompt``, ``prompt_index``
    and the dataset's columns)."""
    rng = random.Random(f"{seed}:{row.get('prompt_index', '')}")
    messages = [{"role": "user", "content": row["prompt"]}]
    shares = []
    for _ in range(turns):
        letter = rng.choice(letters)
        messages.append({"role": "user", "content": f"Use the letter {letter}."})
        reply = await client.chat.completions.create(model="policy", messages=messages)
        text = reply.choices[0].message.content or ""
        shares.append(letter_share(text, letter))
        messages.append({"role": "assistant", "content": text})
    return sum(shares) / len(shares)
