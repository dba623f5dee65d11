"""The registry of estimators and policy losses (``algo/registry.py``): the traits each is registered
with, its function against numbers by hand, the config reading it, and no estimator name compared
anywhere else in the package."""

from __future__ import annotations

import ast
import typing
from pathlib import Path

import pytest
import torch

from ray_rlhf.algo import registry
from ray_rlhf.algo.advantages import reinforce_pp_advantages
from ray_rlhf.algo.kl import per_token_rewards
from ray_rlhf.algo.losses import policy_loss
from ray_rlhf.algo.registry import AdvantageInputs, get_estimator

PACKAGE = Path(registry.__file__).resolve().parents[1]


def test_each_estimator_is_registered_with_what_it_needs():
    traits = {n: (e.uses_critic, e.needs_groups, e.kl_placement, e.loss_agg) for n, e in registry.ESTIMATORS.items()}
    assert traits == {
        "gae": (True, False, "reward", "token_mean"),
        "grpo": (False, True, "loss", "token_mean"),
        "dr_grpo": (False, True, "loss", "seq_mean_token_sum_norm"),
        "rloo": (False, True, "loss", "token_mean"),
        "reinforce_pp": (False, False, "reward", "token_mean"),
    }
    assert registry.group_estimators() == ("grpo", "dr_grpo", "rloo")
    assert registry.critic_estimators() == ("gae",)
    assert registry.get_policy_loss("ppo_clip").fn is policy_loss


def test_the_config_reads_its_choices_and_defaults_from_the_registry():
    from ray_rlhf.config import load_config
    from ray_rlhf.config.training import AlgoConfig

    assert typing.get_args(AlgoConfig.model_fields["estimator"].annotation) == registry.estimator_names()
    for name, est in registry.ESTIMATORS.items():
        samples = ["rollout.samples_per_prompt=2"] if est.needs_groups else []
        cfg = load_config("tiny", [f"algo.estimator={name}", *samples])
        assert (cfg.uses_critic, cfg.kl_in_loss, cfg.algo.agg) == (est.uses_critic, est.kl_placement == "loss",
                                                                  est.loss_agg), name
    cfg = load_config("tiny", ["algo.estimator=dr_grpo", "algo.loss_agg=token_mean", "kl.placement=reward"])
    assert (cfg.algo.agg, cfg.kl_in_loss) == ("token_mean", False)  # explicit settings win over the defaults


def test_unknown_names_and_double_registrations_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="unknown estimator 'gea'; registered: gae, grpo"):
        get_estimator("gea")
    with pytest.raises(ValueError, match="unknown policy loss"):
        registry.get_policy_loss("ppo")
    with pytest.raises(ValueError, match="registered twice"):
        registry.register_estimator("gae")
    with pytest.raises(ValueError, match="kl_placement must be one of"):
        registry.register_estimator("new", kl_placement="advantage")
    with pytest.raises(ValueError, match="loss_agg one of"):
        registry.register_estimator("new", loss_agg="sum")


def test_a_new_estimator_is_one_function_and_one_registration(monkeypatch):
    monkeypatch.setattr(registry, "ESTIMATORS", dict(registry.ESTIMATORS))

    @registry.register_estimator("score_only", needs_groups=False, kl_placement="loss", loss_agg="seq_mean_token_mean")
    def score_only(x: AdvantageInputs) -> registry.Advantages:
        return registry.Advantages(x.scores[:, None] * x.mask, None, None)

    assert get_estimator("score_only").fn is score_only and "score_only" in registry.estimator_names()
    assert registry.resolve_kl_in_loss("auto", "score_only") and not registry.resolve_kl_in_loss("reward", "score_only")
    assert registry.resolve_loss_agg("auto", "score_only") == "seq_mean_token_mean"


def inputs(scores, kl, penalty, **kw) -> AdvantageInputs:
    kl = torch.tensor(kl)
    return AdvantageInputs(scores=torch.tensor(scores), kl=kl, mask=torch.ones_like(kl), kl_penalty=penalty,
                           group_ids=torch.zeros(len(scores), dtype=torch.long), **kw)


def test_group_estimators_subtract_the_kl_from_the_score_only_where_it_is_a_reward():
    """One group of 2, 2 tokens each: scores (1, 3), per-token KL (0.5, 0.5) and (0, 0).
    KL in the reward (beta 1): shaped scores (1 - 1, 3 - 0) = (0, 3), Dr. GRPO r - mean = (-1.5, 1.5);
    KL in the loss (beta 0): (1, 3) -> (-1, 1). Every token of a row gets its sequence's advantage."""
    dr = get_estimator("dr_grpo").fn
    in_reward = dr(inputs([1.0, 3.0], [[0.5, 0.5], [0.0, 0.0]], 1.0))
    in_loss = dr(inputs([1.0, 3.0], [[0.5, 0.5], [0.0, 0.0]], 0.0))
    assert in_reward.advantages.tolist() == [[-1.5, -1.5], [1.5, 1.5]]
    assert in_loss.advantages.tolist() == [[-1.0, -1.0], [1.0, 1.0]]
    assert in_loss.returns is None and in_loss.zero_std.tolist() == [False, False]
    tie = get_estimator("grpo").fn(inputs([2.0, 2.0], [[0.0], [0.0]], 0.0))
    assert tie.zero_std.tolist() == [True, True] and tie.advantages.abs().max() == 0


def test_gae_and_reinforce_pp_shape_the_per_token_rewards_with_the_kl():
    """One token per row, V = 0, gamma 1: GAE's advantage is the reward itself, r - beta * KL =
    (2 - 0.5 * 1, 4 - 0) = (1.5, 4), and so is the return (A + V). REINFORCE++ normalises the same
    rewards over the batch."""
    x = inputs([2.0, 4.0], [[1.0], [0.0]], 0.5, values=torch.zeros(2, 1), whiten=False)
    g = get_estimator("gae").fn(x)
    assert g.advantages.tolist() == [[1.5], [4.0]] and g.returns.tolist() == [[1.5], [4.0]] and g.zero_std is None
    r = get_estimator("reinforce_pp").fn(x)
    expected = reinforce_pp_advantages(per_token_rewards(x.scores, x.kl, x.mask, 0.5), x.mask, 1.0)
    assert torch.equal(r.advantages, expected) and r.returns is None


# ---- no estimator name compared outside the registry ------------------------------------------------------


def name_comparisons(source: str, names: set[str]) -> list[str]:
    """Where ``source`` decides by an estimator's (or policy loss's) name: a comparison with one
    (``x == "gae"``, ``"grpo" != x``, ``x in ("grpo", "rloo")``), a membership test in a collection
    named like estimators (``x in GROUP_ESTIMATORS``), or a dict keyed by names (``{"grpo": f}``)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            consts = [o for o in operands if isinstance(o, ast.Constant)]
            consts += [e for o in operands if isinstance(o, (ast.Tuple, ast.List, ast.Set)) for e in o.elts
                       if isinstance(e, ast.Constant)]
            named = [o for o in node.comparators if "ESTIMATOR" in ast.unparse(o).upper()]
            if any(c.value in names for c in consts) or (named and any(isinstance(op, (ast.In, ast.NotIn))
                                                                        for op in node.ops)):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Dict) and any(isinstance(k, ast.Constant) and k.value in names for k in node.keys):
            found.append(f"line {node.lineno}: a dict keyed by names")
    return found


NAMES = set(registry.ESTIMATORS) | set(registry.POLICY_LOSSES)


def test_the_detector_finds_each_form_of_name_comparison():
    bad = ['x == "gae"', 'x != "gae"', '"dr_grpo" == a.b', 'x in ("grpo", "rloo")', 'x not in GROUP_ESTIMATORS',
           'x in cfg.estimators', 'F = {"rloo": f}', 'y = 1 if e == "ppo_clip" else 2']
    for code in bad:
        assert name_comparisons(code, NAMES), code
    fine = ['x == "token_mean"', 'estimator: str = "gae"', 'cfg.get("estimator", "gae")', 'x in ("k1", "k3")']
    for code in fine:
        assert not name_comparisons(code, NAMES), code


def test_no_code_outside_the_registry_compares_an_estimator_name():
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "algo" / "registry.py":
            continue
        hits = name_comparisons(path.read_text(), NAMES)
        if hits:
            found[str(path.relative_to(PACKAGE))] = hits
    assert not found, f"decide by the registry's traits (ray_rlhf.algo.registry), not by name: {found}"
