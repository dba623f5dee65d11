"""TRL's side of the peer benchmark: ``trl.experimental.ppo.PPOTrainer`` (trl 1.0.0) on the models
and prompts the driver (``run.py``) prepared, timed per step and per phase.

Runs in TRL's own virtualenv (``benchmarks/peers/.venv``), never imports ray_rlhf. Phases: ``generate``
is TRL's ``batch_generation`` (transformers ``generate`` of the whole step's queries, timed by wrapping
the module function the trainer calls); ``learner`` is the rest of the step (the logits, reference,
critic and reward forwards, GAE, the PPO minibatches). Writes one JSON object to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--policy", required=True)
    p.add_argument("--reward", required=True)
    p.add_argument("--critic", required=True, help="sequence-classification directory for TRL's value model")
    p.add_argument("--prompts", required=True, help="JSON list of prompt token-id lists")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=64, help="rollouts per step")
    p.add_argument("--minibatches", type=int, default=2)
    p.add_argument("--response-length", type=int, default=64)
    p.add_argument("--kl", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args()

    import trl.experimental.ppo.ppo_trainer as ppo_module
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.manual_seed(a.seed)
    tok = AutoTokenizer.from_pretrained(a.policy, padding_side="left")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    prompts = json.load(open(a.prompts))
    dataset = Dataset.from_dict({"input_ids": prompts})
    fp32 = dict(dtype=torch.float32)
    policy = AutoModelForCausalLM.from_pretrained(a.policy, **fp32)
    ref = AutoModelForCausalLM.from_pretrained(a.policy, **fp32)
    reward = AutoModelForSequenceClassification.from_pretrained(a.reward, num_labels=1, **fp32)
    critic = AutoModelForSequenceClassification.from_pretrained(a.critic, num_labels=1, **fp32)

    generate_s: list[float] = []
    original = ppo_module.batch_generation

    def timed_generation(*args, **kwargs):
        t0 = time.perf_counter()
        out = original(*args, **kwargs)
        generate_s.append(time.perf_counter() - t0)
        return out

    ppo_module.batch_generation = timed_generation
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            marks.append(time.perf_counter())

    per_device = a.batch // a.minibatches
    config = PPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-ppo-"), per_device_train_batch_size=per_device,
        gradient_accumulation_steps=a.minibatches, num_mini_batches=a.minibatches, num_ppo_epochs=1,
        total_episodes=a.steps * a.batch, local_rollout_forward_batch_size=a.batch, response_length=a.response_length,
        stop_token=None, temperature=1.0, kl_coef=a.kl, learning_rate=a.lr, num_sample_generations=0,
        report_to=[], save_strategy="no", use_cpu=True, bf16=False, fp16=False, seed=a.seed, disable_tqdm=True,
        logging_strategy="no",
    )
    trainer = PPOTrainer(args=config, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         train_dataset=dataset, value_model=critic, callbacks=[Clock()])
    trainer.train()
    steps = [b - e for e, b in zip(marks, marks[1:])]
    rows = [{"step": i + 1, "step_s": s, "generate_s": g, "learner_s": s - g,
             "generated_tokens": a.batch * a.response_length}
            for i, (s, g) in enumerate(zip(steps, generate_s))]
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in
              (("policy", policy), ("critic", critic), ("reward", reward))}
    json.dump({"framework": "trl", "threads": torch.get_num_threads(), "params": params, "steps": rows},
              open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
