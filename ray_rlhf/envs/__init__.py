"""Environments that answer a model turn by turn (multi-turn rollouts): the interface
(:mod:`.base`), a bundled game (:mod:`.letters`), tool use (:mod:`.tools`) and an agent written
against the OpenAI client (:mod:`.openai_agents`, for ``env.agent``)."""
