"""ray-rlhf: RLHF with PPO on Ray.

vLLM-backed generator actors produce rollouts, a reward actor scores them, a learner actor
(policy with a value head on its own trunk, frozen reference) runs the PPO update, and the new
weights are broadcast back to every generator each cycle.
"""

__version__ = "0.1.0"
