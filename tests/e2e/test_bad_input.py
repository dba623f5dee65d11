"""User mistakes through the real command line: one clear line, exit status 2, checkpoints untouched.

Every case runs the command of ``python -m ray_rlhf.train --config tiny ...`` against the tiny
models built once per session (``model.cache_dir``): two of them in a fresh interpreter
(``fresh_interpreter``), the others in a process forked from a fork server that imported the CLI,
transformers and torch once (:func:`fork_train`; the same entry point, arguments, working
directory and environment, without paying ~5 s of imports per case). Each case asserts:

* exit status 2 (a :class:`~ray_rlhf.errors.UserError`, not a crash);
* the last non-empty line of stderr is ``ray-rlhf: error: <one line>`` naming the problem;
* no ``Traceback`` anywhere in stderr;
* where the run directory already holds a complete checkpoint: every byte of ``checkpoints/`` is
  unchanged, and no new ``step_*`` or ``.tmp-*`` directory appeared.

All but one case fail in the preflight checks (before Ray, vLLM or any model starts) and take a
few seconds each. ``reward_raises_in_actor`` starts Ray and vLLM: its reward function passes the
driver's preflight probe and fails inside the reward actor at the first step, so the error travels
back through Ray and must still come out as one line.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

# Reward functions the cases point reward.functions at (written into the subprocess's cwd).
BAD_REWARDS = '''
import math

def raises(prompt, response):
    raise ValueError("label not found")

def nan(prompt, response):
    return float("nan")

def one_arg(response):
    return 0.0

def raises_in_ray(prompt, response):
    """Fine in the driver's preflight probe, raises inside the Ray reward actor (as a function
    that only chokes on real generated text would)."""
    import ray

    if ray.is_initialized():
        raise KeyError("unexpected token in response")
    return 0.0
'''
# Environments the env.* cases point env.name at (written into the subprocess's cwd).
BAD_ENVS = '''
class WrongShape:
    def reset(self, row):
        return "Use the letter e."

    def step(self, action):
        return "ok", 1.0  # (observation, reward): done and info missing


class BadTools:
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object",
                                                                             "properties": {"a": {}}}}}]

    def reset(self, row):
        return None

    def step(self, action):
        return None, 0.0, True, {}


def sync_rollout(client, row):  # env.agent needs `async def`
    return 0.0
'''
BROKEN_IMPORT = "import package_that_is_not_installed_xyz\n\ndef score(prompt, response):\n    return 0.0\n"


@dataclass
class Case:
    """One user mistake: the overrides, how to set the scene, and what the one line must name."""

    overrides: list[str]
    expect: list[str]
    """Fragments the error line must contain (key names, file names)."""
    setup: Callable[["Scene"], None] | None = None
    env: dict[str, str] = field(default_factory=dict)
    config: str = "tiny"
    max_seconds: float | None = None
    """Wall-clock bound (e.g. an unreachable cluster must fail in seconds, not minutes)."""
    fresh_interpreter: bool = False
    """Run as ``python -m ray_rlhf.train`` in a new interpreter (else forked from the fork server)."""


@dataclass
class Scene:
    """Paths a case can use; ``{run}``, ``{tmp}``, ``{reward_model}``, ``{policy}`` in overrides are filled from it."""

    tmp: Path
    run: Path
    reward_model: Path

    def fmt(self, s: str) -> str:
        policy = self.reward_model.parent / self.reward_model.name.replace("reward-", "policy-")
        for key, value in (("{run}", self.run), ("{tmp}", self.tmp), ("{reward_model}", self.reward_model),
                           ("{policy}", policy)):
            s = s.replace(key, str(value))
        return s


def _ckpt(scene: Scene) -> Path:
    return scene.run / "checkpoints" / "step_000001"


def _write(name: str, data: bytes | str):
    def setup(scene: Scene) -> None:
        p = scene.tmp / name
        p.write_bytes(data.encode() if isinstance(data, str) else data)

    return setup


def _mkdir(name: str):
    return lambda scene: (scene.tmp / name).mkdir()


def _model_without_chat_template(scene: Scene) -> None:
    """A copy of the tiny policy whose tokenizer has no chat template (a base model)."""
    src = scene.reward_model.parent / scene.reward_model.name.replace("reward-", "policy-")
    dst = scene.tmp / "base_model"
    shutil.copytree(src, dst)
    cfg_path = dst / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    (dst / "chat_template.jinja").unlink(missing_ok=True)


def _gpt2_policy(scene: Scene) -> None:
    """A tiny GPT-2 (``GPT2LMHeadModel``: a causal LM not named ``*ForCausalLM``)."""
    from tests.architectures import build_arch

    build_arch("gpt2", scene.tmp / "gpt2")


def _bloom_policy(scene: Scene) -> None:
    """The tiny policy's tokenizer with a tiny Bloom (ALiBi: attention not confinable per packed sequence)."""
    from transformers import BloomConfig, BloomForCausalLM

    from tests.architectures import VOCAB_SIZE

    src = scene.reward_model.parent / scene.reward_model.name.replace("reward-", "policy-")
    dst = scene.tmp / "bloom"
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors*"):
        f.unlink()
    BloomForCausalLM(BloomConfig(vocab_size=VOCAB_SIZE, hidden_size=32, n_layer=1, n_head=4)).save_pretrained(dst)


def _corrupt_learner_json(scene: Scene) -> None:
    (_ckpt(scene) / "learner.json").write_text('{"version": 0, "kl_ctl": ')  # torn write


def _remove_optimizer(scene: Scene) -> None:
    (_ckpt(scene) / "optimizer.pt").unlink()


def _truncate_value_head(scene: Scene) -> None:
    p = _ckpt(scene) / "value_head.safetensors"
    p.write_bytes(p.read_bytes()[:200])


def _truncate_policy_weights(scene: Scene) -> None:
    p = _ckpt(scene) / "policy" / "model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _other_model_checkpoint(scene: Scene) -> None:
    p = _ckpt(scene) / "policy" / "config.json"
    cfg = json.loads(p.read_text())
    cfg["num_hidden_layers"] += 1  # as if written by a run of another model preset
    p.write_text(json.dumps(cfg))


FAST = ["steps=2", "logging.progress_bar=false", "logging.tensorboard=false"]
"""Every case: two steps at most (the checkpoint is at step 1), no progress bar."""

RAY_SMALL = ["generators.num=1", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2",
             "generators.shard_prompts=4", "rollout.max_new_tokens=8", "ppo.minibatch_size=8",
             "ppo.micro_batch_size=8", "ppo.epochs=1", "sync.verify=false", "ray.num_cpus=2"]
"""The smallest tiny run, for the one case that needs Ray and vLLM."""

CASES: dict[str, Case] = {
    "unknown_config_key": Case(["ppo.bogus=1"], ["unknown config key 'ppo.bogus'"], fresh_interpreter=True),
    "wrong_type": Case(["ppo.epochs=many"], ["'ppo.epochs'", "integer"]),
    "impossible_combination": Case(["ppo.minibatch_size=128"], ["ppo.minibatch_size=128", "larger than the batch"]),
    "config_file_missing": Case([], ["--config", "nothere.yaml"], config="nothere.yaml"),
    "missing_model_dir": Case(["model.policy_path={tmp}/no_such_model"], ["model.policy_path", "no such directory"]),
    # Not a mistake: a GPT-2 policy passes the whole preflight, so the run gets as far as joining Ray
    # (the last line names the unreachable address, not the model). Its own output_dir: the run
    # directory's checkpoint is of another model.
    "gpt2_policy_passes_preflight": Case(["model.policy_path={tmp}/gpt2", "output_dir={tmp}/gpt2_run"],
                                         ["127.0.0.1:1", "RAY_ADDRESS"], setup=_gpt2_policy,
                                         env={"RAY_ADDRESS": "127.0.0.1:1"}, max_seconds=60),
    "empty_model_dir": Case(["model.policy_path={tmp}/empty_model"], ["model.policy_path", "config.json"],
                            setup=_mkdir("empty_model")),
    "reward_model_as_policy": Case(["model.policy_path={reward_model}"], ["model.policy_path", "not a causal LM"]),
    "policy_as_reward_model": Case(["reward.model_path={policy}"], ["reward model", "not a *ForSequenceClassification"]),
    "empty_prompt_file": Case(["data.prompts_path={tmp}/empty.jsonl"], ["empty.jsonl", "empty"],
                              setup=_write("empty.jsonl", b"")),
    "malformed_jsonl": Case(["data.prompts_path={tmp}/bad.jsonl"], ["bad.jsonl", "not valid JSON Lines"],
                            setup=_write("bad.jsonl", '{"prompt": "hi"}\n{"prompt": "unterminated\n')),
    "prompt_not_utf8": Case(["data.prompts_path={tmp}/latin1.jsonl"],
                            ["latin1.jsonl", "line 2 (column 'prompt')", "not valid UTF-8", "byte 0xff"],
                            setup=_write("latin1.jsonl", b'{"prompt": "ok"}\n{"prompt": "bad \xff\xfe here"}\n')),
    "malformed_parquet": Case(["data.prompts_path={tmp}/bad.parquet"], ["bad.parquet", "not valid Parquet"],
                              setup=_write("bad.parquet", b"PAR1 this is not really parquet")),
    "missing_prompt_column": Case(["data.prompt_column=question"], ["no column 'question'", "data.prompt_column"]),
    "prompt_longer_than_context": Case(["data.max_prompt_tokens=3"], ["data.max_prompt_tokens=3", "tokens"]),
    "reward_import_error": Case(["reward.functions=[{name: 'broken_reward:score', weight: 1.0}]"],
                                ["broken_reward:score", "package_that_is_not_installed_xyz"]),
    "reward_missing_function": Case(["reward.functions=[{name: 'bad_rewards:nope', weight: 1.0}]"],
                                    ["bad_rewards:nope", "no attribute"]),
    "reward_raises": Case(["reward.functions=[{name: 'bad_rewards:raises', weight: 1.0}]"],
                          ["bad_rewards:raises", "raised ValueError", "label not found"]),
    "reward_returns_nan": Case(["reward.functions=[{name: 'bad_rewards:nan', weight: 1.0}]"],
                               ["bad_rewards:nan", "nan", "finite"]),
    "unreachable_ray_address": Case([], ["127.0.0.1:1", "RAY_ADDRESS"], env={"RAY_ADDRESS": "127.0.0.1:1"},
                                    max_seconds=60),
    "unwritable_checkpoint_dir": Case(["output_dir={tmp}/a_file/run"], ["a_file", "output_dir"],
                                      setup=_write("a_file", "not a directory")),
    "corrupt_checkpoint_json": Case([], ["step_000001", "learner.json"], setup=_corrupt_learner_json),
    "checkpoint_missing_file": Case([], ["step_000001", "optimizer.pt"], setup=_remove_optimizer),
    "checkpoint_truncated_tensors": Case([], ["step_000001", "value_head.safetensors"], setup=_truncate_value_head),
    "checkpoint_truncated_policy": Case([], ["step_000001", "model.safetensors"], setup=_truncate_policy_weights),
    "checkpoint_of_other_model": Case([], ["step_000001", "different model", "num_hidden_layers"],
                                      setup=_other_model_checkpoint),
    "resume_path_missing": Case(["checkpoint.resume={tmp}/no_such_checkpoint"],
                                ["no_such_checkpoint", "checkpoint.resume"]),
    "resume_never_over_checkpoints": Case(["checkpoint.resume=never"], ["checkpoint.resume=never"]),
    "messages_not_role_content": Case(
        ["data.prompts_path={tmp}/chat.jsonl", "data.prompt_column=messages"],
        ["chat.jsonl", "row 0 of column 'messages'", "{role, content}"],
        setup=_write("chat.jsonl", '{"messages": [{"role": "user"}]}\n{"messages": [{"role": "user"}]}\n')),
    "no_chat_template": Case(["model.policy_path={tmp}/base_model", "data.chat_template=always"],
                             ["has none", "chat template"], setup=_model_without_chat_template),
    "reward_signature_fits_no_form": Case(["reward.functions=[{name: 'bad_rewards:one_arg'}]"],
                                          ["bad_rewards:one_arg", "fits neither accepted form"]),
    "unreachable_reward_url": Case(["reward.remote=[{url: 'http://127.0.0.1:1/score'}]"],
                                   ["http://127.0.0.1:1/score", "unreachable"], max_seconds=60),
    "packing_on_with_alibi_model": Case(["model.policy_path={tmp}/bloom", "ppo.packing=on"],
                                        ["ppo.packing=on", "ppo.packing=off"], setup=_bloom_policy),
    "top_p_below_one": Case(["rollout.top_p=0.9"], ["rollout.top_p=0.9", "not supported"]),
    "clip_low_above_clip_high": Case(["ppo.clip_low=0.3", "ppo.clip_high=0.2"], ["ppo.clip_low=0.3", "ppo.clip_high"]),
    "dynamic_sampling_without_groups": Case(["rollout.dynamic_sampling=true"], ["rollout.dynamic_sampling", "no groups"]),
    "sampler_pi_old_when_stale": Case(["ppo.old_logprobs=sampler", "rollout.max_staleness=1"],
                                      ["ppo.old_logprobs=sampler", "rollout.max_staleness=1"]),
    "partial_without_staleness": Case(["rollout.partial=true"], ["rollout.partial=true", "rollout.max_staleness"]),
    "partial_with_multi_turn": Case(["rollout.partial=true", "rollout.max_staleness=1",
                                     "env.name=ray_rlhf.envs.letters:LetterGame"], ["rollout.partial=true", "env.name"]),
    "more_generators_than_the_local_ray_holds": Case(["generators.num=5", "ray.num_cpus=2"],
                                                     ["generators.num=5", "this local Ray has 2"], max_seconds=60),
    "colocated_counts_cannot_pair": Case(["placement=colocated", "generators.num=2", "learner.num=1"],
                                         ["placement=colocated", "generators.num=2", "learner.num=1", "cannot pair up"]),
    "colocated_budget_cannot_fit": Case(
        ["placement=colocated", "generators.num=2", "learner.num=2", "generators.num_gpus=0.5", "learner.num_gpus=0.5",
         "generators.num_cpus=0.25", "learner.num_cpus=0.25", "ray.num_gpus=2", "ray.gpu_memory_gib=2"],
        ["placement=colocated does not fit", "per GPU of 2.00 GiB", "AdamW", "generators.gpu_memory_utilization"]),
    "env_class_not_importable": Case(["env.name=no_such_env_module:Game"],
                                     ["env.name=no_such_env_module:Game", "cannot import"]),
    "env_step_wrong_shape": Case(["env.name=bad_envs:WrongShape"], ["bad_envs:WrongShape.step", "a tuple of 2"]),
    "env_invalid_tool_schema": Case(["env.name=bad_envs:BadTools"], ["bad_envs:BadTools.tools[0] (add)", "'a'"]),
    "agent_not_importable": Case(["env.agent=no_such_agent_module:rollout"],
                                 ["env.agent=no_such_agent_module:rollout", "cannot import"]),
    "agent_not_async": Case(["env.agent=bad_envs:sync_rollout"], ["env.agent=bad_envs:sync_rollout", "async def"]),
    "env_num_cpus_negative": Case(["env.name=ray_rlhf.envs.letters:LetterGame", "env.num_cpus=-1"],
                                  ["env.num_cpus", "greater than or equal to 0"]),
    "env_max_turns_zero": Case(["env.name=ray_rlhf.envs.letters:LetterGame", "env.max_turns=0"],
                               ["env.max_turns", "greater than 0"]),
    "max_total_tokens_below_prompt": Case(["env.name=ray_rlhf.envs.letters:LetterGame", "rollout.max_total_tokens=8"],
                                          ["rollout.max_total_tokens=8", "longest prompt"]),
    "lora_targets_match_no_module": Case(["lora.rank=8", "lora.target_modules=[q_proj, c_attn]"],
                                         ["lora.target_modules", "c_attn matches no linear module", "q_proj, up_proj, v_proj"]),
    "lora_rank_above_engine_max_lora_rank": Case(["lora.rank=16", "lora.sync=adapter", "generators.max_lora_rank=8"],
                                                 ["lora.rank=16", "max_lora_rank=8",
                                                  "set generators.max_lora_rank to 16 or more"]),
    "lora_rank_negative": Case(["lora.rank=-1"], ["'lora.rank'", "greater than or equal to 0"]),
    "reward_raises_in_actor": Case(
        ["reward.functions=[{name: 'bad_rewards:raises_in_ray', weight: 1.0}]", *RAY_SMALL],
        ["bad_rewards:raises_in_ray", "raised KeyError", "unexpected token in response"], fresh_interpreter=True,
    ),
}


def tree_digest(root: Path) -> dict[str, str]:
    """``relative path -> sha256`` of every file under ``root`` (directories as ``<dir>``)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="session")
def model_cache(tiny_policy_path, tiny_reward_path) -> Path:
    """The session's model cache (holds the tiny policy and reward model): no rebuild per case."""
    assert Path(tiny_policy_path).parent == Path(tiny_reward_path).parent
    return Path(tiny_policy_path).parent


@pytest.fixture(scope="session")
def good_run(tmp_path_factory, tiny_policy_path) -> Path:
    """A run directory holding one complete checkpoint at step 1, written by the real Learner
    into :func:`ray_rlhf.checkpoint.open_store`'s store (in-process, no Ray)."""
    from ray_rlhf import checkpoint
    from ray_rlhf.config import load_config
    from ray_rlhf.data.prompts import PromptStream, bundled_prompts_path, load_prompts
    from ray_rlhf.learning.learner import Learner

    cfg = load_config("tiny")
    learner = Learner(str(tiny_policy_path), cfg.ppo, cfg.kl, seed=cfg.seed)
    stream = PromptStream(load_prompts(bundled_prompts_path()), seed=cfg.seed)
    stream.next_batch(cfg.rollout.prompts_per_step)
    run = tmp_path_factory.mktemp("good_run")
    state = {"step": 1, "version": learner.version, "data": stream.state_dict(), "pool_restarts": 0}
    store = checkpoint.open_store(run)
    store.save(1, lambda staging: store.write_part(staging, learner.save_state),
               {"driver.json": json.dumps(state, indent=1, sort_keys=True).encode()}, keep=2)
    return run


def run_train(config: str, overrides: list[str], cwd: Path, env: dict[str, str], timeout: float):
    """``python -m ray_rlhf.train --config <config> <overrides>`` in a fresh interpreter."""
    full_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    full_env.update(env)
    cmd = [sys.executable, "-m", "ray_rlhf.train", "--config", config, *overrides]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - t0


PRELOAD = ["ray_rlhf.cli", "ray_rlhf.run.inputs", "ray_rlhf.preflight", "transformers", "transformers.models.auto"]
"""What the fork server imports once (the cases' fresh interpreters each spent ~5 s on these)."""


def _train_in_child(config: str, overrides: list[str], cwd: str, env: dict[str, str], out: str) -> None:
    """In a process forked from the fork server: what ``python -m ray_rlhf.train`` does in ``cwd``
    with ``env``, stdout and stderr into ``out``.{stdout,stderr}; exits with the command's status."""
    code = 1
    try:
        os.chdir(cwd)
        os.environ.pop("RAY_ADDRESS", None)
        os.environ.update(env)
        sys.path.insert(0, cwd)  # as `python -m` does: the user's modules import from the cwd
        for fd, suffix in ((1, "stdout"), (2, "stderr")):
            os.dup2(os.open(f"{out}.{suffix}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.argv = ["ray_rlhf.train", "--config", config, *overrides]
        from ray_rlhf.cli import train_main

        code = train_main(sys.argv[1:])
    except SystemExit as e:  # argparse
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 -- a crash: its traceback goes where the test reads it
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)


@dataclass
class Finished:
    """What a case's command left: like :class:`subprocess.CompletedProcess`."""

    returncode: int
    stdout: str
    stderr: str


def fork_train(forks, config: str, overrides: list[str], cwd: Path, env: dict[str, str], timeout: float):
    """:func:`run_train`'s command in a child of the fork server ``forks`` (a multiprocessing
    context), which imported :data:`PRELOAD` once: the same entry point and arguments, without
    each case paying for a fresh interpreter's imports."""
    out = str(cwd / "command")
    t0 = time.monotonic()
    child = forks.Process(target=_train_in_child, args=(config, overrides, str(cwd), env, out))
    child.start()
    child.join(timeout)
    if child.exitcode is None:
        child.kill()
        child.join()
        raise subprocess.TimeoutExpired(["ray_rlhf.train", *overrides], timeout)
    done = Finished(child.exitcode, Path(f"{out}.stdout").read_text(), Path(f"{out}.stderr").read_text())
    return done, time.monotonic() - t0


def _run_case(name: str, tmp_path: Path, model_cache: Path, good_run: Path, reward_model: Path, forks):
    """Set up case ``name`` in ``tmp_path`` and run the command; (process, seconds, digest before, run dir)."""
    case = CASES[name]
    (tmp_path / "bad_rewards.py").write_text(BAD_REWARDS)
    (tmp_path / "broken_reward.py").write_text(BROKEN_IMPORT)
    (tmp_path / "bad_envs.py").write_text(BAD_ENVS)
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    scene = Scene(tmp=tmp_path, run=run, reward_model=reward_model)
    if case.setup:
        case.setup(scene)
    before = tree_digest(run / "checkpoints")
    overrides = [f"output_dir={run}", f"model.cache_dir={model_cache}", *FAST, *map(scene.fmt, case.overrides)]
    if case.fresh_interpreter:
        proc, seconds = run_train(case.config, overrides, cwd=tmp_path, env=case.env, timeout=540)
    else:
        proc, seconds = fork_train(forks, case.config, overrides, cwd=tmp_path, env=case.env, timeout=540)
    return proc, seconds, before, run


PARALLEL = 3
"""Cases run this many at a time: each is mostly a fresh interpreter importing torch and friends,
and they share nothing (own directory, own Ray for the one that starts it)."""


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, model_cache, good_run, tiny_reward_path) -> dict:
    skip_ray = bool(os.environ.get("RAY_RLHF_SKIP_RAY_E2E"))
    names = sorted((n for n in CASES if not (n == "reward_raises_in_actor" and skip_ray)),
                   key=lambda n: not CASES[n].fresh_interpreter)  # the slowest first
    forks = multiprocessing.get_context("forkserver")
    forks.set_forkserver_preload(PRELOAD)
    with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        return {n: pool.submit(_run_case, n, tmp_path_factory.mktemp(n), model_cache, good_run, Path(tiny_reward_path),
                               forks)
                for n in names}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, outcomes):
    case = CASES[name]
    if name not in outcomes:
        pytest.skip("RAY_RLHF_SKIP_RAY_E2E is set")
    proc, seconds, before, run = outcomes[name].result()

    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    tail = "\n".join(lines[-15:])
    assert proc.returncode == 2, f"exit {proc.returncode}; stderr tail:\n{tail}"
    assert "Traceback" not in proc.stderr, tail
    last = lines[-1]
    assert last.startswith("ray-rlhf: error: "), tail
    for fragment in case.expect:
        assert fragment in last, f"{fragment!r} not in {last!r}"
    if case.max_seconds:
        assert seconds < case.max_seconds, f"took {seconds:.1f}s"
    # The existing checkpoint is byte-for-byte untouched; nothing new was started beside it.
    assert tree_digest(run / "checkpoints") == before
    print(f"{name}: {seconds:.1f}s: {last}")


# ---- the unwrap itself, without a cluster: Ray's wrappers around a remote UserError -----------------------


def _remote(cause: Exception, where: str = "RewardScorer.score"):
    from ray.exceptions import RayTaskError

    tb = (f"Traceback (most recent call last):\n  File \"scorer.py\", line 1, in {where}\n"
          f"{type(cause).__module__}.{type(cause).__qualname__}: {cause}")
    return RayTaskError(where, tb, cause)


def test_user_error_unwrapped_from_ray_errors():
    from ray.exceptions import ActorDiedError

    from ray_rlhf.errors import user_error_of
    from ray_rlhf.rewards.scorer import RewardError

    msg = "reward function 'm:f' raised KeyError: 'x' on prompt 3 sample 1; fix the function"
    task = _remote(RewardError(msg)).as_instanceof_cause()
    assert "\n" in str(task)  # what printing the caught exception would have shown
    assert str(user_error_of(task)) == msg
    assert str(user_error_of(_remote(_remote(RewardError(msg))))) == msg  # nested remote calls
    died = ActorDiedError(cause=_remote(RewardError(msg), "RewardScorer.__init__"))  # constructor raised
    assert str(user_error_of(died)) == msg
    assert user_error_of(_remote(ZeroDivisionError("bug")).as_instanceof_cause()) is None  # a bug: traceback
    assert user_error_of(RuntimeError("x")) is None


def test_run_command_prints_one_line_and_exits_2(capsys):
    from ray_rlhf.cli import run_command
    from ray_rlhf.rewards.scorer import RewardError

    def fails(_):
        raise _remote(RewardError("reward function 'm:f' returned nan")).as_instanceof_cause()

    assert run_command(fails, None) == 2
    assert capsys.readouterr().err == "ray-rlhf: error: reward function 'm:f' returned nan\n"

    def bug(_):
        raise ZeroDivisionError("a bug keeps its traceback")

    with pytest.raises(ZeroDivisionError):
        run_command(bug, None)


def test_a_failed_sync_verification_is_one_line_and_exit_3(capsys):
    """A WeightSyncError (the engine does not compute with what the learner sent: e.g. an adapter
    changed but the engine's probe log-probs did not), raised in the driver or carried by a Ray
    error, ends the command with one line and exit 3 -- not a traceback."""
    from ray_rlhf.cli import run_command
    from ray_rlhf.run.command import EXIT_SYNC_FAILED
    from ray_rlhf.sync.types import WeightSyncError

    msg = "generator g0: adapter version 3 changed but the engine's probe log-probs did not\n(stale adapter id?)"

    def fails(_):
        raise WeightSyncError(msg)

    def fails_remotely(_):
        raise _remote(WeightSyncError(msg), "Generator.verify").as_instanceof_cause()

    for func in (fails, fails_remotely):
        assert run_command(func, None) == EXIT_SYNC_FAILED == 3
        err = capsys.readouterr().err
        assert err == ("ray-rlhf: weight sync failed verification: generator g0: adapter version 3 changed but "
                       "the engine's probe log-probs did not (stale adapter id?)\n")
