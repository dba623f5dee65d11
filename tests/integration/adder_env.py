"""A one-tool :class:`~ray_rlhf.envs.tools.ToolEnv` for the real-engine test of tool calls
(``tests.integration.adder_env:Adder``): ``add(a, b)``; the final answer is rewarded 1 when it
holds the last sum the tool returned."""

from __future__ import annotations

from ray_rlhf.envs.tools import ToolEnv


class Adder(ToolEnv):
    tools = [{"type": "function", "function": {
        "name": "add", "description": "a+b",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                       "required": ["a", "b"]}}}]

    def add(self, a: int, b: int) -> int:
        self.sum = a + b
        return self.sum

    def reward(self, answer: str) -> float:
        return float(str(getattr(self, "sum", None)) in answer)
