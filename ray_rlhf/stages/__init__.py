"""Stages before (or instead of) PPO: supervised fine-tuning, reward-model training, DPO.

:mod:`ray_rlhf.stages.runner` runs one on one learner rank in-process, with checkpoints and resume.
"""
