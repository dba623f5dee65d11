"""The offline tiny reward model (sequence classification, 1 label) loads in vLLM too.

vLLM's ``classify`` reports sigmoid(logit) for a one-label head; it must equal transformers'
logit through a sigmoid. Run in a subprocess: an in-process engine claims process-wide state
(default torch.distributed group, global seed) that other engines in this test process also want.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.integration

TEXTS = ["The sun is hot.", "Once upon a time a fox ran into the woods."]

SCRIPT = """
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
import vllm
llm = vllm.LLM(model=sys.argv[1], runner="pooling", distributed_executor_backend="uni", dtype="float32",
               max_model_len=256, enforce_eager=True)
outs = llm.classify(json.loads(sys.argv[2]), use_tqdm=False)
print("RESULT " + json.dumps([o.outputs.probs for o in outs]))
"""


def test_tiny_reward_model_scores_match_in_vllm_and_transformers(tiny_reward_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_reward_path), json.dumps(TEXTS)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    vllm_probs = [p[0] for p in json.loads(line.removeprefix("RESULT "))]
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_reward_path)
    with torch.no_grad():
        logits = [model(**tok(t, return_tensors="pt")).logits.item() for t in TEXTS]
    expected = [1 / (1 + math.exp(-x)) for x in logits]
    assert vllm_probs == pytest.approx(expected, abs=1e-4)
