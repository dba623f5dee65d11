"""Rule rewards on hand-made strings, the weighted sum, every error path, and the HF reward model."""

import pickle

import pytest
import torch

from ray_rlhf.errors import UserError
from ray_rlhf.rewards import rules
from ray_rlhf.rewards.scorer import MODEL_KEY, RewardError, RewardScorer, check_reward_model, check_sources
from tests.batches import make_batch

FIX = "tests.unit.reward_fixtures"


def make_rollout(response: str, prompt_index: int = 0, sample_index: int = 0, prompt: str = "Q:") -> dict:
    return dict(prompt_index=prompt_index, sample_index=sample_index, prompt=prompt, response=response)


def score(scorer, rollouts: list[dict]):
    """The scored batch of ``scorer.score`` on a batch made of ``rollouts``."""
    return scorer.score(make_batch(rollouts))[0]


def one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------- rules


@pytest.mark.parametrize(
    "fn, response, expected",
    [
        # 'e' count / length: "eel" -> 2/3; "Eve e" -> E,e,e = 3 of 5 characters (space counts).
        (rules.letter_frequency, "eel", 2 / 3),
        (rules.letter_frequency, "Eve e", 3 / 5),
        (rules.letter_frequency, "xyz", 0.0),
        (rules.letter_frequency, "", 0.0),
        # min(count, 16) / 16: 4 e's -> 0.25; 20 e's -> capped at 1.
        (rules.letter_count, "tree tee", 4 / 16),
        (rules.letter_count, "e" * 20, 1.0),
        # 1 - |len - 32| / 32: 32 chars -> 1; 16 -> 0.5; 40 -> 0.75; 64 and 100 -> 0.
        (rules.length_reward, "a" * 32, 1.0),
        (rules.length_reward, "a" * 16, 0.5),
        (rules.length_reward, "a" * 40, 0.75),
        (rules.length_reward, "a" * 64, 0.0),
        (rules.length_reward, "a" * 100, 0.0),
        # 1 - len / 64: 0 chars -> 1; 16 -> 0.75; 80 -> 0.
        (rules.brevity, "", 1.0),
        (rules.brevity, "a" * 16, 0.75),
        (rules.brevity, "a" * 80, 0.0),
        (rules.ends_with_period, "Done.", 1.0),
        (rules.ends_with_period, "Done. \n", 1.0),
        (rules.ends_with_period, "Done", 0.0),
        (rules.ends_with_period, "", 0.0),
        (rules.zero, "anything", 0.0),
    ],
)
def test_rules_exact_values(fn, response, expected):
    assert fn("prompt ignored", response) == pytest.approx(expected, abs=1e-12)


def test_rules_keyword_parameters():
    assert rules.letter_frequency("", "aab", letter="a") == pytest.approx(2 / 3)
    assert rules.length_reward("", "abcd", target=4) == 1.0
    assert rules.letter_count("", "aaaa", letter="a", cap=2) == 1.0


def test_every_rule_is_a_valid_reward_spec():
    specs = [(f"ray_rlhf.rewards.rules:{name}", 1.0) for name in rules.__all__]
    scored = score(RewardScorer(specs), [make_rollout("Hello there.")])
    assert set(scored.reward_parts) == {s for s, _ in specs}


# --------------------------------------------------------------------------- weighted sum


def test_weighted_sum_and_parts():
    scorer = RewardScorer([("ray_rlhf.rewards.rules:letter_frequency", 2.0), (f"{FIX}:response_chars", -0.5),
                           (f"{FIX}:tensor_half", 1.0)])
    inputs = make_batch([make_rollout("eel", 0, 0), make_rollout("xyzw", 0, 1)])
    out, summary = scorer.score(inputs)
    # "eel": 2 * (2/3) - 0.5 * 3 + 0.5 = 4/3 - 1.5 + 0.5 = 1/3
    # "xyzw": 2 * 0 - 0.5 * 4 + 0.5 = -1.5
    assert out.reward[0] == pytest.approx(1 / 3)
    assert out.reward[1] == pytest.approx(-1.5)
    assert {k: v[0] for k, v in out.reward_parts.items()} == {
        "ray_rlhf.rewards.rules:letter_frequency": pytest.approx(2 / 3), f"{FIX}:response_chars": 3.0,
        f"{FIX}:tensor_half": 0.5}
    assert out.keys() == [(0, 0), (0, 1)]
    assert not inputs.scored and inputs.reward_parts == {}  # inputs untouched
    # the summary the driver logs: mean (1/3 - 1.5) / 2, population std |1/3 + 1.5| / 2
    assert summary.count == 2 and summary.reward_mean == pytest.approx((1 / 3 - 1.5) / 2)
    assert summary.reward_std == pytest.approx((1 / 3 + 1.5) / 2)
    assert summary.reward_parts[f"{FIX}:response_chars"] == pytest.approx(3.5)


def test_score_concatenates_the_batches_of_several_shards():
    scorer = RewardScorer([(f"{FIX}:response_chars", 1.0)])
    a, b = make_batch([make_rollout("ab", 0, 0)]), make_batch([make_rollout("abc", 1, 0), make_rollout("a", 1, 1)])
    out, summary = scorer.score(a, b)
    assert out.keys() == [(0, 0), (1, 0), (1, 1)] and out.reward.tolist() == [2.0, 3.0, 1.0]
    assert summary.count == 3 and summary.reward_max == 3.0


# ---------------------------------------------------------------------------- spec errors


@pytest.mark.parametrize(
    "spec, needles",
    [
        ("no_colon_here", ["'no_colon_here' is malformed", "module:function"]),
        ("a:b:c", ["'a:b:c' is malformed"]),
        (":fn", ["':fn' is malformed"]),
        ("my_missing_mod_xyz:score", ["'my_missing_mod_xyz:score'", "module 'my_missing_mod_xyz' not found",
                                      "PYTHONPATH / --working-dir"]),
        (f"{FIX}:does_not_exist", [f"'{FIX}:does_not_exist'", "has no attribute 'does_not_exist'"]),
        (f"{FIX}:NOT_CALLABLE", [f"'{FIX}:NOT_CALLABLE' is a float, not a function"]),
        (f"{FIX}:one_argument", [f"'{FIX}:one_argument' has signature (response: 'str')", "fits neither accepted form"]),
    ],
)
def test_bad_specs_fail_in_constructor(spec, needles):
    with pytest.raises(UserError) as err:
        RewardScorer([(spec, 1.0)])
    for needle in needles:
        assert needle in one_line(err.value)


def test_module_that_fails_to_import(tmp_path, monkeypatch):
    (tmp_path / "rr_broken_mod.py").write_text("raise RuntimeError('bad global')\n")
    (tmp_path / "rr_missing_dep.py").write_text("import rr_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match=r"'rr_broken_mod:f'.*raised RuntimeError: bad global; fix the module"):
        RewardScorer([("rr_broken_mod:f", 1.0)])
    with pytest.raises(UserError, match=r"'rr_missing_dep:f'.*No module named 'rr_no_such_dependency'.*install"):
        RewardScorer([("rr_missing_dep:f", 1.0)])


def test_function_errors_come_before_model_loading(tmp_path):
    # A bad spec is reported even though the model path is also bad: functions are checked first.
    with pytest.raises(UserError, match="module 'nope_mod' not found"):
        RewardScorer([("nope_mod:f", 1.0)], model_path=str(tmp_path / "missing"))


def test_other_config_errors():
    with pytest.raises(UserError, match="listed twice"):
        RewardScorer([(f"{FIX}:one", 1.0), (f"{FIX}:one", 2.0)])
    with pytest.raises(UserError, match="weight nan"):
        RewardScorer([(f"{FIX}:one", float("nan"))])
    with pytest.raises(UserError, match="no reward source"):
        RewardScorer([])
    with pytest.raises(UserError, match="batch_size"):
        RewardScorer([(f"{FIX}:one", 1.0)], batch_size=0)


def test_an_environment_alone_may_reward():
    """``env.name`` with ``reward.functions=[]``: the environment's per-turn rewards are the only
    ones; the final reward is 0."""
    scored, summary = RewardScorer([], env_rewards=True).score(make_batch([{"response": "a"}, {"response": "b"}]))
    assert scored.reward.tolist() == [0.0, 0.0] and scored.reward_parts == {} and summary.reward_mean == 0.0


# -------------------------------------------------------------------------- sample errors


@pytest.mark.parametrize(
    "fn, needle",
    [
        ("raises_on_boom", "raised ZeroDivisionError: division by zero"),
        ("nan_on_boom", "returned nan (float)"),
        ("inf_on_boom", "returned inf (float)"),
        ("string_on_boom", "returned '0.5' (str)"),
        ("none_on_boom", "returned None (NoneType)"),
    ],
)
def test_failing_sample_fails_whole_call(fn, needle):
    spec = f"{FIX}:{fn}"
    scorer = RewardScorer([(f"{FIX}:one", 1.0), (spec, 1.0)])
    batch = make_batch([make_rollout("fine", 0, 0), make_rollout("fine", 3, 0),
                        make_rollout("it went boom\nand then " + "x" * 60, 3, 1)])
    with pytest.raises(RewardError) as err:
        scorer.score(batch)
    msg = one_line(err.value)
    assert isinstance(err.value, UserError)
    assert f"reward function '{spec}'" in msg and needle in msg
    assert "on prompt 3 sample 1" in msg
    assert "(response 'it went boom\\nand then xxxxxxxxxxxxxxxxxx'...)" in msg  # 40-char excerpt
    assert (err.value.source, err.value.prompt_index, err.value.sample_index) == (spec, 3, 1)
    assert not batch.scored
    # Picklable with its fields, as Ray ships it back to the driver.
    again = pickle.loads(pickle.dumps(err.value))
    assert str(again) == msg and again.prompt_index == 3 and again.source == spec


def test_validate_and_ping():
    scorer = RewardScorer([("ray_rlhf.rewards.rules:ends_with_period", 1.0)])
    assert scorer.ping() is True
    assert scorer.validate() == {"ray_rlhf.rewards.rules:ends_with_period": 1.0}
    bad = RewardScorer([(f"{FIX}:raises_on_boom", 1.0)])
    with pytest.raises(RewardError, match="on the validation sample"):
        bad.validate(response="boom")


def test_info_reports_memory_and_counts():
    scorer = RewardScorer([(f"{FIX}:one", 1.0)])
    score(scorer, [make_rollout("a"), make_rollout("b", 1)])
    info = scorer.info()
    assert info["scored"] == 2 and info["model_params"] == 0
    assert info["peak_rss_mb"] >= info["rss_mb"] * 0.5 > 0


# --------------------------------------------------------------------------- reward model


@pytest.fixture(scope="module")
def reward_path(request, tmp_path_factory):
    """The shared tiny reward model (conftest ``tiny_reward_path``), else one built here."""
    try:
        return request.getfixturevalue("tiny_reward_path")
    except pytest.FixtureLookupError:
        from ray_rlhf.models.factory import ensure_model

        return ensure_model("reward", "tiny", tmp_path_factory.mktemp("models"), seed=0)


TEXTS = ["Once", " upon a time there was a small red fox who lived by the river.", "", " Hi.",
         " The end of the story is near, and the sun sets slowly over the hills", " e e e", " ok"]


def model_rollouts():
    return [make_rollout(t, i // 2, i % 2, prompt="Tell me a story:") for i, t in enumerate(TEXTS)]


def test_reward_model_scores_one_float_per_rollout(reward_path):
    scorer = RewardScorer([("ray_rlhf.rewards.rules:letter_frequency", 0.5)], model_path=str(reward_path),
                          model_weight=2.0, batch_size=3)
    out = score(scorer, model_rollouts())
    assert len(out) == len(TEXTS)
    for i in range(len(out)):
        m = out.reward_parts[MODEL_KEY][i]
        assert out.reward[i] == pytest.approx(2.0 * m + 0.5 * rules.letter_frequency(out.prompt[i], out.response[i]))
    assert len(set(out.reward_parts[MODEL_KEY].tolist())) > 1  # the text matters
    assert not scorer.model.model.training and not any(p.requires_grad for p in scorer.model.model.parameters())
    assert scorer.info()["model_params"] > 0


def test_reward_model_deterministic_and_batch_invariant(reward_path):
    def scores(batch_size):
        scorer = RewardScorer([], model_path=str(reward_path), batch_size=batch_size)
        return score(scorer, model_rollouts()).reward.tolist()

    batched, again, unbatched = scores(4), scores(4), scores(1)
    assert batched == again
    assert batched == pytest.approx(unbatched, abs=1e-5)


def test_reward_model_matches_direct_forward(reward_path):
    """Each score is the model's logit on the unpadded prompt + response, computed by hand."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(reward_path)
    model = AutoModelForSequenceClassification.from_pretrained(reward_path, dtype=torch.float32).eval()
    scorer = RewardScorer([], model_path=str(reward_path), batch_size=8)
    got = score(scorer, model_rollouts()).reward_parts[MODEL_KEY].tolist()
    with torch.no_grad():
        want = [model(**tok("Tell me a story:" + t, return_tensors="pt")).logits[0, 0].item() for t in TEXTS]
    assert got == pytest.approx(want, abs=1e-5)


def test_reward_model_path_errors(reward_path, tmp_path):
    with pytest.raises(UserError, match=r"reward model path '.*nowhere' does not exist"):
        RewardScorer([], model_path=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="holds no config.json"):
        RewardScorer([], model_path=str(tmp_path))
    config = (reward_path / "config.json").read_text()
    causal = tmp_path / "causal"
    causal.mkdir()
    (causal / "config.json").write_text(config.replace("LlamaForSequenceClassification", "LlamaForCausalLM"))
    with pytest.raises(UserError, match="is LlamaForCausalLM, not a \\*ForSequenceClassification model"):
        check_reward_model(causal)
    two = tmp_path / "two_labels"
    two.mkdir()
    import json

    cfg = json.loads(config)
    cfg["id2label"] = {"0": "a", "1": "b"}
    cfg["label2id"] = {"a": 0, "b": 1}
    cfg.pop("num_labels", None)
    (two / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="num_labels=2; a reward model must output one scalar"):
        RewardScorer([], model_path=str(two))
    assert check_sources([], str(reward_path)) == []  # the preflight check loads no weights


def test_the_reward_actor_takes_the_cores_scoring_leaves_it():
    """``reward.torch_threads`` empty: the node's cores in a synchronous run (scoring runs alone),
    the reserved CPUs (at least 1) in an asynchronous one; a value given is kept."""
    from ray_rlhf.config import RunConfig
    from ray_rlhf.rewards.sources import reward_sources

    assert reward_sources(RunConfig())["torch_threads"] == "node"
    assert reward_sources(RunConfig(rollout={"max_staleness": 1}))["torch_threads"] == 1
    assert reward_sources(RunConfig(rollout={"max_staleness": 1}, reward={"num_cpus": 2}))["torch_threads"] == 2
    assert reward_sources(RunConfig(reward={"torch_threads": 3}))["torch_threads"] == 3


def test_node_threads_are_set_only_for_a_reward_model(tiny_reward_path, monkeypatch):
    import os

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    RewardScorer([("ray_rlhf.rewards.rules:letter_frequency", 1.0)], torch_threads="node")
    assert calls == []
    RewardScorer([], model_path=str(tiny_reward_path), torch_threads="node")
    assert calls == [os.cpu_count()]
