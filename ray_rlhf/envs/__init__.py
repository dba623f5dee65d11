"""Environments that answer a model turn by turn (multi-turn rollouts): the interface
(:mod:`.base`), a bundled game (:mod:`.letters`) and tool use (:mod:`.tools`)."""
