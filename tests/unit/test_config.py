"""Config tree: presets load, overrides apply, every mistake is one line naming the key."""

import subprocess
import sys

import pytest

from ray_rlhf.config import load_config, preset_names, to_yaml
from ray_rlhf.errors import UserError


def test_presets_load_and_round_trip(tmp_path):
    assert {"tiny", "small"} <= set(preset_names())
    for name in preset_names():
        cfg = load_config(name)
        path = tmp_path / f"{name}.yaml"
        path.write_text(to_yaml(cfg))
        assert load_config(str(path)) == cfg


def test_overrides_parse_yaml_values():
    cfg = load_config("tiny", ["ppo.clip=0.3", "ppo.lr=1e-4", "sync.verify=false", "generators.num=1",
                               "ppo.dual_clip=3", "model.policy_path=/some/dir"])
    assert cfg.ppo.clip == 0.3 and cfg.ppo.lr == 1e-4 and cfg.sync.verify is False
    assert cfg.generators.num == 1 and cfg.ppo.dual_clip == 3.0 and cfg.model.policy_path == "/some/dir"


@pytest.mark.parametrize(
    "override, needle",
    [
        ("ppo.bogus=1", "unknown config key 'ppo.bogus'"),
        ("bogus=1", "unknown config key 'bogus'"),
        ("ppo.lr=abc", "config key 'ppo.lr'"),
        ("ppo.epochs=1.5", "config key 'ppo.epochs'"),
        ("kl.approx=k9", "config key 'kl.approx'"),
        ("ppo.clip=-1", "config key 'ppo.clip'"),
        ("ppo.minibatch_size=128", "ppo.minibatch_size=128 is larger than the batch"),
        ("ppo.minibatch_size=24", "must divide the batch"),
        ("ppo.micro_batch_size=12", "ppo.micro_batch_size=12 must divide"),
        ("generators.min=3", "generators.min (3) <= generators.num (2)"),
        ("rollout.max_new_tokens=500", "exceeds generators.max_model_len"),
        ("ppo.clip", "not of the form key.sub=value"),
        ("reward.functions=[{name: 'a:b', wieght: 2}]", "unknown config key 'reward.functions.0.wieght'"),
    ],
)
def test_bad_overrides_are_one_line_errors(override, needle):
    with pytest.raises(UserError) as info:
        load_config("tiny", [override])
    message = str(info.value)
    assert needle in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["ppo.clip_low=0.3", "ppo.clip_high=0.2"], "ppo.clip_low=0.3 is larger than ppo.clip_high=0.2"),
        (["ppo.clip_low=0.3"], "ppo.clip_low=0.3 is larger than ppo.clip_high=0.2"),  # clip_high falls back on clip
        (["algo.rollout_correction=tis", "algo.rollout_correction_cap=1"], "config key 'algo.rollout_correction_cap'"),
        (["algo.rollout_correction_cap=0.5"], "config key 'algo.rollout_correction_cap'"),
        (["rollout.overlong=penalty", "rollout.overlong_buffer=24"], "0 < rollout.overlong_buffer < rollout.max_new_tokens"),
        (["rollout.overlong=penalty"], "rollout.overlong=penalty needs 0 < rollout.overlong_buffer"),
        (["rollout.overlong_buffer=30"], "rollout.overlong_buffer=30 must be smaller than rollout.max_new_tokens=24"),
        (["rollout.ignore_eos=true", "rollout.overlong=mask"], "rollout.overlong=mask would treat all of them"),
        (["rollout.dynamic_sampling=true"], "algo.estimator=gae has no groups"),
        (["rollout.dynamic_sampling=true", "algo.estimator=reinforce_pp"], "algo.estimator=reinforce_pp has no groups"),
        (["ppo.old_logprobs=sampler", "rollout.max_staleness=1"], "ppo.old_logprobs=sampler with rollout.max_staleness=1"),
        (["ppo.old_logprobs=sampler", "algo.rollout_correction=mis"], "leaves none to compare"),
        (["algo.estimator=grpo", "kl.approx=k1"], "kl.approx=k1 as a loss term"),
        (["kl.placement=loss", "kl.approx=k1"], "kl.approx=k1 as a loss term"),
        (["rollout.partial=true"], "rollout.max_staleness=0 no weights arrive during generation (nothing to interrupt)"),
        (["rollout.partial=true", "rollout.max_staleness=1", "env.name=ray_rlhf.envs.letters:LetterGame"],
         "rollout.partial=true supports single-turn rollouts only"),
        (["rollout.partial=true", "rollout.max_staleness=1", "env.agent=tests.integration.adder_env:agent"],
         "rollout.partial=true is not supported with env.agent"),
        (["rollout.partial=true", "rollout.max_staleness=1", "lora.rank=4", "lora.sync=adapter"],
         "lora.sync=adapter is not supported"),
        (["rollout.partial=true", "rollout.max_staleness=1", "sync.backend=collective"],
         "set sync.backend=object_store"),
        (["rollout.partial=true", "placement=colocated"], "rollout.max_staleness=0 no weights arrive"),
    ],
)
def test_refused_combinations_are_one_line_errors(overrides, needle):
    with pytest.raises(UserError) as info:
        load_config("tiny", overrides)
    assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_partial_resolves_and_reaches_the_generators():
    from ray_rlhf.run.actors import generator_kwargs

    cfg = load_config("tiny", ["rollout.max_staleness=1", "rollout.partial=true"])
    assert cfg.rollout.partial and generator_kwargs(cfg, "/m", "gen-0")["partial"] is True
    assert generator_kwargs(load_config("tiny", []), "/m", "gen-0")["partial"] is False


def test_new_options_resolve():
    cfg = load_config("tiny", ["algo.estimator=grpo", "rollout.dynamic_sampling=true", "ppo.clip_high=0.28",
                               "rollout.overlong=penalty", "rollout.overlong_buffer=4", "algo.rollout_correction=tis"])
    assert (cfg.ppo.clip_lo, cfg.ppo.clip_hi) == (0.2, 0.28)
    assert (cfg.kl.reward_estimator, cfg.kl.loss_estimator) == ("k1", "k3") and cfg.kl_in_loss
    assert not cfg.old_logprobs_from_sampler  # a rollout correction needs the learner's own pi_old
    assert load_config("tiny", ["algo.estimator=grpo"]).old_logprobs_from_sampler
    assert load_config("tiny", ["kl.approx=k2", "kl.placement=loss"]).kl.loss_estimator == "k2"


def test_unknown_preset_names_the_choices():
    with pytest.raises(UserError, match="neither a preset .*tiny"):
        load_config("huge")


def test_cli_bad_override_exits_nonzero_with_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "ray_rlhf", "show-config", "--config", "tiny", "ppo.bogus=1"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "ppo.bogus" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_show_config_prints_resolved_tree():
    proc = subprocess.run(
        [sys.executable, "-m", "ray_rlhf", "show-config", "--config", "tiny", "ppo.clip=0.25"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "clip: 0.25" in proc.stdout


def test_top_p_below_one_is_refused_with_the_reason():
    with pytest.raises(UserError) as e:
        load_config("tiny", ["rollout.top_p=0.9"])
    msg = str(e.value)
    assert "rollout.top_p=0.9 is not supported" in msg and "set rollout.top_p=1.0" in msg and "\n" not in msg


def test_verify_with_tensor_parallel_generators_is_refused():
    with pytest.raises(UserError, match="set sync.verify=false"):
        load_config("tiny", ["generators.tensor_parallel_size=2"])
    assert load_config("tiny", ["generators.tensor_parallel_size=2", "sync.verify=false"]).sync.verify is False


def test_compile_without_a_cpp_compiler_is_one_line(monkeypatch):
    import shutil

    from ray_rlhf import preflight
    from ray_rlhf.errors import UserError

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    preflight.check_compiler(load_config("tiny", ["learner.compile=true"]))  # g++ is on this machine
    monkeypatch.setattr(shutil, "which", lambda name: None)
    preflight.check_compiler(load_config("tiny", []))  # not asked for: no check
    with pytest.raises(UserError, match="learner.compile=true needs a C\\+\\+ compiler.*set learner.compile=false"):
        preflight.check_compiler(load_config("tiny", ["learner.compile=true"]))


def test_preload_of_a_missing_library_is_one_line(monkeypatch, tmp_path):
    from ray_rlhf import preflight

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    lib = tmp_path / "libx.so"
    lib.write_bytes(b"")
    preflight.check_preload(load_config("tiny", [f"generators.preload=[{lib}]"]))
    with pytest.raises(UserError, match=r"generators.preload: .*nope.so does not exist; give the full path"):
        preflight.check_preload(load_config("tiny", [f"generators.preload=[{lib},{tmp_path}/nope.so]"]))


@pytest.mark.parametrize("old, new, value, expected", [
    ("ppo.gamma", "algo.gamma", "0.9", 0.9),
    ("ppo.lam", "algo.lam", "0.8", 0.8),
    ("ppo.whiten_advantages", "algo.whiten_advantages", "false", False),
    ("algo.is_cap", "ppo.is_cap", "3.0", 3.0),
    ("algo.is_mode", "ppo.is_mode", "mask", "mask"),
    ("kl.estimator", "kl.approx", "k2", "k2"),
    ("faults.kill_learner_at_step", "faults.kill_learner", "3", [{"step": 3}]),
    ("faults.kill_reward_at_step", "faults.kill_reward", "2", [{"step": 2}]),
    ("faults.stop_after_step", "faults.stop", "2", [{"step": 2}]),
])
def test_renamed_keys_are_still_accepted_with_a_notice(old, new, value, expected, caplog):
    """0.3 regrouped the config (the estimator's knobs under ``algo``, the loss's under ``ppo``,
    ``kl.approx``, every ``faults`` key a list of events): users' scripts with the old names keep
    working for this version, and each old name gets one line naming the new key."""
    import logging

    with caplog.at_level(logging.WARNING, logger="ray_rlhf.config"):
        old_cfg = load_config("tiny", [f"{old}={value}"])
    new_cfg = load_config("tiny", [f"{new}={value}" if not isinstance(expected, list) else f"{new}={expected}"])
    section, key = new.split(".")
    got = getattr(getattr(old_cfg, section), key)
    got = [e.model_dump() for e in got] if isinstance(got, list) else got
    assert got == expected and old_cfg == new_cfg
    notices = [r.getMessage() for r in caplog.records]
    assert notices == [f"config key {old!r} is deprecated and will be removed in the next version; use {new!r}"]


def test_an_old_and_a_new_name_together_are_one_line_error():
    with pytest.raises(UserError, match="'ppo.gamma' \\(deprecated\\) and 'algo.gamma' are both set; keep only 'algo.gamma'"):
        load_config("tiny", ["ppo.gamma=0.9", "algo.gamma=0.8"])


def test_the_old_names_are_no_fields_any_more():
    from ray_rlhf.config.load import DEPRECATED
    from ray_rlhf.config.schema import RunConfig

    for old in DEPRECATED:
        section, key = old.split(".")
        assert key not in RunConfig.model_fields[section].annotation.model_fields, old


def test_ignore_eos_reaches_the_sampling_of_every_step():
    from ray_rlhf.records import SamplingSpec

    cfg = load_config("tiny", ["rollout.ignore_eos=true"])
    assert SamplingSpec.for_step(cfg.rollout, cfg.seed, 3).ignore_eos
    assert not SamplingSpec.for_step(load_config("tiny", []).rollout, 0, 3).ignore_eos


def test_data_path_is_the_alias_of_data_prompts_path(tmp_path):
    """Every command takes ``data.path``; a PPO run reads it as ``data.prompts_path``."""
    cfg = load_config("tiny", ["data.path=/some/prompts.parquet"])
    assert cfg.data.prompts_path == "/some/prompts.parquet"
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  path: /x.jsonl\n")
    assert load_config(str(f)).data.prompts_path == "/x.jsonl"
    f.write_text("data:\n  path: /x.jsonl\n  prompts_path: /y.jsonl\n")
    with pytest.raises(UserError, match="name the same setting"):
        load_config(str(f))
