"""``preflight.check_causal_lm_dir`` asks transformers whether a checkpoint is a causal LM.

Every family of the offline architecture matrix (:mod:`tests.architectures`) passes --
GPT-2's class is ``GPT2LMHeadModel``, not ``*ForCausalLM`` -- and so does a run's whole preflight
(:func:`~ray_rlhf.run.inputs.load_inputs`) on the GPT-2 directory; a sequence classifier, a masked LM,
an architecture transformers does not know, or none at all is refused with one line.
(The command line itself is covered by the ``gpt2_policy_passes_preflight`` case of
``tests/e2e/test_bad_input.py``.)
"""

from __future__ import annotations

import json

import pytest

from ray_rlhf.errors import UserError
from ray_rlhf.preflight import check_causal_lm_dir
from tests.architectures import ARCHITECTURES, build_arch, get_spec


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory):
    """Every architecture of the matrix built once (seed 0; ~0.2 s each)."""
    root = tmp_path_factory.mktemp("archs")
    return {n: build_arch(n, root / n, seed=0) for n in ARCHITECTURES}


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_matrix_architecture_is_a_causal_lm(arch_dirs, name):
    d = arch_dirs[name]
    assert json.loads((d / "config.json").read_text())["architectures"] == [get_spec(name).model_class]
    assert check_causal_lm_dir(d, "model.policy_path") == d


def test_gpt2_is_not_named_for_causal_lm():
    """The case the old suffix rule got wrong: the matrix must keep holding one."""
    assert not get_spec("gpt2").model_class.endswith("ForCausalLM")


def test_whole_preflight_accepts_a_gpt2_policy(arch_dirs, tmp_path):
    from ray_rlhf.config import load_config
    from ray_rlhf.run.inputs import load_inputs

    d = arch_dirs["gpt2"]
    cfg = load_config("tiny", [f"model.policy_path={d}", f"output_dir={tmp_path / 'run'}"])
    inputs = load_inputs(cfg)  # no Ray, no vLLM: policy dir, tokenizer, prompts, rewards, checkpoint dir
    assert inputs.policy_path == d
    assert len(inputs.prompts) >= cfg.rollout.prompts_per_step
    assert inputs.resume is None


def _fake_model_dir(path, architectures):
    """A directory that looks like a Hugging Face checkpoint of ``architectures`` (no real weights:
    the architecture check comes first)."""
    path.mkdir()
    cfg = {"model_type": "llama"}
    if architectures is not None:
        cfg["architectures"] = architectures
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "model.safetensors").write_bytes(b"")
    return path


@pytest.mark.parametrize("archs, named", [
    (["LlamaForSequenceClassification"], "LlamaForSequenceClassification"),  # a reward model
    (["BertForMaskedLM"], "BertForMaskedLM"),
    (["FrobnicatorForCausalLM"], "FrobnicatorForCausalLM"),  # the right suffix, unknown to transformers
    ([], "no architecture"),
    (None, "no architecture"),
])
def test_not_a_causal_lm_is_refused(tmp_path, archs, named):
    d = _fake_model_dir(tmp_path / "m", archs)
    with pytest.raises(UserError) as e:
        check_causal_lm_dir(d, "model.policy_path")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"model.policy_path={d} holds {named}, not a causal LM"), msg


def test_reward_model_dir_is_refused(tiny_reward_path):
    with pytest.raises(UserError, match=r"holds LlamaForSequenceClassification, not a causal LM"):
        check_causal_lm_dir(tiny_reward_path, "model.policy_path")
