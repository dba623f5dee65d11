"""What the multi-turn generator tests share: the prompts and the LetterGame environment spec
(3 turns, 150 tokens in all) their generators are built with."""

PROMPTS = ("The cat sat on", "Once upon a time", "Water is", "Tell me a story about a dog")
ENV = dict(name="ray_rlhf.envs.letters:LetterGame", kwargs={"turns": 3}, max_turns=3, step_timeout_s=10.0,
           max_total_tokens=150)
