"""TRL's GRPO side of the peer benchmark: ``trl.GRPOTrainer`` (trl 1.0.0, transformers generation)
on the prompts and models the driver (``run.py``) prepared, timed per rollout step and phase.

Runs in TRL's own virtualenv, never imports ray_rlhf. One rollout step = one generation of
``--prompts-per-step x --group`` completions followed by ``--minibatches`` optimizer steps (TRL's
``steps_per_generation``). ``generate`` is the trainer's ``_generate`` (transformers ``generate``);
``learner`` is the rest of the step (reward, reference and old log-probs, the updates). Generation
runs to ``--response-length`` (no EOS stop), as ray-rlhf's ``rollout.ignore_eos``; TRL still masks
the tokens after a sampled EOS out of its loss.
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
    p.add_argument("--prompts", required=True, help="JSON list of prompt texts")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--prompts-per-step", type=int, default=16)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--minibatches", type=int, default=2)
    p.add_argument("--response-length", type=int, default=64)
    p.add_argument("--kl", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args()

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(a.seed)
    tok = AutoTokenizer.from_pretrained(a.policy, padding_side="left")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    dataset = Dataset.from_dict({"prompt": json.load(open(a.prompts))})
    policy = AutoModelForCausalLM.from_pretrained(a.policy, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(a.reward, num_labels=1, dtype=torch.float32)
    rollouts = a.prompts_per_step * a.group
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-grpo-"), per_device_train_batch_size=rollouts // a.minibatches,
        gradient_accumulation_steps=1, steps_per_generation=a.minibatches, num_generations=a.group,
        max_completion_length=a.response_length, num_iterations=1, beta=a.kl, learning_rate=a.lr, temperature=1.0,
        top_p=1.0, generation_kwargs={"eos_token_id": None}, max_steps=a.steps * a.minibatches, use_cpu=True,
        bf16=False, fp16=False, seed=a.seed, report_to=[], save_strategy="no", logging_strategy="no",
        disable_tqdm=True,
    )
    starts: list[float] = []
    generate_s: list[float] = []
    end: list[float] = []

    class Clock(TrainerCallback):
        def on_train_end(self, args, state, control, **kw):
            end.append(time.perf_counter())

    trainer = GRPOTrainer(model=policy, reward_funcs=[reward], args=config, train_dataset=dataset,
                          processing_class=tok, reward_processing_classes=[tok], callbacks=[Clock()])
    step_fn, gen_fn = trainer._generate_and_score_completions, trainer._generate

    def timed_step(*args, **kwargs):
        starts.append(time.perf_counter())
        return step_fn(*args, **kwargs)

    def timed_generate(*args, **kwargs):
        t0 = time.perf_counter()
        out = gen_fn(*args, **kwargs)
        generate_s.append(time.perf_counter() - t0)
        return out

    trainer._generate_and_score_completions, trainer._generate = timed_step, timed_generate
    trainer.train()
    marks = starts + end
    rows = [{"step": i + 1, "step_s": b - e, "generate_s": g, "learner_s": b - e - g,
             "generated_tokens": rollouts * a.response_length}
            for i, (e, b, g) in enumerate(zip(marks, marks[1:], generate_s))]
    json.dump({"framework": "trl-grpo", "threads": torch.get_num_threads(), "steps": rows}, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
