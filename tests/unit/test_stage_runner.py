"""Stages on the tiny model, in-process: stopped and resumed equals uninterrupted (weights equal),
SFT lowers its loss, the RM's output loads as a sequence classifier, bad input refused early."""

import json
import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from ray_rlhf.data.make_preferences import write
from ray_rlhf.errors import UserError
from ray_rlhf.rewards.model import check_reward_model
from ray_rlhf.stages.runner import StageOptions, run_stage


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write(tmp_path_factory.mktemp("data"), num=32)


def test_sft_stopped_and_resumed_equals_uninterrupted(tiny_policy_path, data, tmp_path):
    kw = dict(stage="sft", model_path=str(tiny_policy_path), data_path=str(data[0]), steps=4, batch_size=8,
              micro_batch_size=4, checkpoint_every=100)
    whole = run_stage(StageOptions(out=str(tmp_path / "a"), **kw))
    first = run_stage(StageOptions(out=str(tmp_path / "b"), **kw), stop_after=2)
    rest = run_stage(StageOptions(out=str(tmp_path / "b"), **kw))
    assert [h["sft/loss"] for h in first + rest] == [h["sft/loss"] for h in whole]
    assert whole[-1]["sft/loss"] < whole[0]["sft/loss"]
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bfloat16_compute_trains_close_to_float32(tiny_policy_path, data, tmp_path):
    """``learner.dtype=bfloat16``: the same steps under bf16 autocast; the step-1 loss within bf16's
    round-off of float32's (not bit-equal: the autocast is on), the loss falls, the weights stay float32."""
    kw = dict(stage="sft", model_path=str(tiny_policy_path), data_path=str(data[0]), steps=3, batch_size=8,
              micro_batch_size=8, checkpoint_every=100)
    f32 = run_stage(StageOptions(out=str(tmp_path / "f32"), **kw))
    bf16 = run_stage(StageOptions(out=str(tmp_path / "bf16"), dtype="bfloat16", **kw))
    a, b = f32[0]["sft/loss"], bf16[0]["sft/loss"]
    print(f"\nstep-1 SFT loss float32 {a:.6f} bfloat16 {b:.6f}; last {f32[-1]['sft/loss']:.4f} {bf16[-1]['sft/loss']:.4f}")
    assert a != b and b == pytest.approx(a, rel=2e-2)
    assert bf16[-1]["sft/loss"] < bf16[0]["sft/loss"]
    state = torch.load(tmp_path / "bf16" / "checkpoint.pt", weights_only=True)["model"]
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}


def test_lora_sft_and_dpo_train_adapters_only(tiny_policy_path, data, tmp_path):
    """``lora.rank=8``: SFT's loss falls with the trunk frozen (the checkpoint's base weights equal the
    model's); the final model is the merged one (differs from the base, no peft names) plus
    ``adapter/``. DPO's reference is the same model with the adapters off: at step 1 the policy
    equals it (B = 0), so the loss is log 2 and the implicit rewards 0."""
    from safetensors.torch import load_file

    kw = dict(model_path=str(tiny_policy_path), steps=3, batch_size=8, micro_batch_size=8, checkpoint_every=100,
              lr=1e-2, lora_rank=8, lora_alpha=16.0)
    sft = run_stage(StageOptions(stage="sft", data_path=str(data[0]), out=str(tmp_path / "sft"), **kw))
    assert sft[-1]["sft/loss"] < sft[0]["sft/loss"]
    base = load_file(str(tiny_policy_path / "model.safetensors"))
    ckpt = torch.load(tmp_path / "sft" / "checkpoint.pt", weights_only=True)["model"]
    frozen = {k: v for k, v in ckpt.items() if ".base_layer." in k}
    assert frozen and all(torch.equal(v, base[k.removeprefix("lm.").replace(".base_layer.", ".")])
                          for k, v in frozen.items())
    merged = load_file(str(tmp_path / "sft" / "model" / "model.safetensors"))
    assert merged.keys() == base.keys() and any(not torch.equal(merged[k], base[k]) for k in base)
    assert (tmp_path / "sft" / "adapter" / "adapter_config.json").exists()
    dpo = run_stage(StageOptions(stage="dpo", data_path=str(data[1]), out=str(tmp_path / "dpo"), **kw))
    assert dpo[0]["dpo/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert dpo[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert dpo[-1]["rewards/margins"] != 0.0


def test_rm_output_is_a_sequence_classifier(tiny_policy_path, data, tmp_path):
    hist = run_stage(StageOptions(stage="rm", model_path=str(tiny_policy_path), data_path=str(data[1]),
                                  out=str(tmp_path), steps=2, batch_size=8))
    assert "rm/accuracy" in hist[-1]
    cfg = json.loads((tmp_path / "model" / "config.json").read_text())
    assert cfg["architectures"][0].endswith("ForSequenceClassification")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model").eval()
    assert model.config.num_labels == 1
    check_reward_model(tmp_path / "model")  # what reward.model_path's preflight runs
    with pytest.raises(UserError, match="ForSequenceClassification"):
        check_reward_model(tiny_policy_path)  # a causal LM is refused as a reward model
    # Hugging Face's own pooling (last non-pad token) scores an unpadded sequence as training did
    from ray_rlhf.learning.objectives.rm import PairScorer

    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        ours = PairScorer(model)(ids[:, :2], torch.ones(1, 2, dtype=torch.long), ids[:, 2:], torch.ones(1, 3)).rewards
        theirs = model(input_ids=ids).logits[:, 0]
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_dpo_refuses_beta_not_positive_before_loading(tiny_policy_path, data, tmp_path):
    with pytest.raises(UserError, match="dpo.beta"):
        run_stage(StageOptions(stage="dpo", model_path=str(tiny_policy_path), data_path=str(data[1]),
                               out=str(tmp_path), beta=0.0))


@pytest.fixture(scope="module")
def data128(tmp_path_factory):
    return write(tmp_path_factory.mktemp("data128"), num=128)


def test_eval_fraction_holds_out_a_seeded_disjoint_split(tiny_policy_path, data, tmp_path):
    from ray_rlhf.stages.runner import build

    opts = StageOptions(stage="sft", model_path=str(tiny_policy_path), data_path=str(data[0]), out=str(tmp_path),
                        eval_fraction=0.25)
    _, _, train, held, _ = build(opts)
    _, _, train2, held2, _ = build(opts)
    assert (len(train), len(held)) == (24, 8)  # ceil(0.25 * 32) held out
    assert torch.equal(held.response_ids, held2.response_ids) and torch.equal(train.prompt_ids, train2.prompt_ids)
    rows = lambda b: {tuple(p) + (-1,) + tuple(r) for p, r in zip(b.prompt_ids.tolist(), b.response_ids.tolist())}  # noqa: E731
    full = build(StageOptions(**{**opts.__dict__, "eval_fraction": 0.0}))[2]
    assert len(rows(full)) == 32 and rows(train) | rows(held) == rows(full) and not rows(train) & rows(held)
    with pytest.raises(UserError, match="data.eval_fraction"):
        build(StageOptions(**{**opts.__dict__, "eval_fraction": 1.0}))


@pytest.mark.parametrize("stage, steps, key, rises", [("sft", 10, "eval/loss", False),
                                                      ("rm", 40, "eval/rm/accuracy", True)])
def test_each_stage_learns_on_held_out_rows(stage, steps, key, rises, tiny_policy_path, data128, tmp_path):
    """The bundled-format letters data (128 rows, a quarter held out): SFT lowers the eval loss, the
    reward model's eval accuracy ends above 0.8 (DPO: tests/integration/test_dpo_sampling.py)."""
    hist = run_stage(StageOptions(stage=stage, model_path=str(tiny_policy_path), out=str(tmp_path),
                                  data_path=str(data128[0] if stage == "sft" else data128[1]), steps=steps,
                                  batch_size=8, lr=1e-3, eval_fraction=0.25, eval_every=steps // 2))
    evals = [h for h in hist if key in h]
    assert [h["step"] for h in evals] == [1, steps // 2, steps]
    first, last = evals[0][key], evals[-1][key]
    assert (last > first) if rises else (last < first), (first, last)
    if stage == "rm":
        assert last > 0.8
