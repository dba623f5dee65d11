"""The stages' typed config tree: presets, YAML, dotted keys, 0.2's flat names, one-line errors, and
every key reaching the runner."""

from __future__ import annotations

import dataclasses

import pytest

from ray_rlhf.config.stage import BUNDLED_DATA, FLAT_ALIASES, _keys, load_stage_config
from ray_rlhf.errors import UserError
from ray_rlhf.stages.command import parse_options, split_config, to_options


def test_no_key_at_all_is_the_tiny_model_on_the_bundled_data(tmp_path):
    cfg = load_stage_config("dpo", None, [f"model.cache_dir={tmp_path}"])
    opts = to_options(cfg)
    assert opts.data_path == str(BUNDLED_DATA["dpo"]) and opts.out == "runs/dpo"
    assert (tmp_path / opts.model_path.split("/")[-1] / "config.json").is_file()  # built once, offline


def test_flat_names_and_dotted_keys_are_the_same_setting():
    flat = parse_options("dpo", ["model_path=/m", "out=/o", "lr=0.5", "beta=0.3", "loss=ipo", "eval_every=3",
                                 "data.prompts_path=/d.jsonl"])
    dotted = parse_options("dpo", ["model.path=/m", "output_dir=/o", "optim.lr=0.5", "dpo.beta=0.3", "dpo.loss=ipo",
                                   "eval.every=3", "data.path=/d.jsonl"])
    assert flat == dotted
    assert (dotted.optim.lr, dotted.dpo.beta, dotted.data.path) == (0.5, 0.3, "/d.jsonl")


def test_a_yaml_file_then_overrides(tmp_path):
    f = tmp_path / "sft.yaml"
    f.write_text("steps: 7\noptim:\n  lr: 0.01\n  batch_size: 8\ndata:\n  eval_fraction: 0.25\n")
    cfg = parse_options("sft", ["--config", str(f), "optim.lr=0.02"])
    assert (cfg.steps, cfg.optim.lr, cfg.optim.batch_size, cfg.data.eval_fraction) == (7, 0.02, 8, 0.25)
    assert split_config(["--config=x.yaml", "a=1"]) == ("x.yaml", ["a=1"])


@pytest.mark.parametrize("args, match", [
    (["bogus=1"], "unknown sft option 'bogus=1'"),
    (["dpo.beta=0"], "dpo.beta=0"),
    (["dpo.loss=hinge"], "dpo.loss='hinge'"),
    (["data.eval_fraction=1.0"], "data.eval_fraction=1.0"),
    (["steps=many"], "steps='many'"),
    (["learner.strategy=zero3"], "learner.strategy='zero3'"),
    (["learner.dtype=float16"], "learner.dtype='float16'"),
    (["lora.rank=-1"], "lora.rank=-1"),
    (["lora.rank=8", "learner.num=2", "learner.strategy=fsdp"], "not supported for the stages yet"),
    (["--config", "nope"], "neither a stage preset"),
])
def test_bad_keys_are_one_line(args, match):
    with pytest.raises(UserError, match=match) as e:
        parse_options("sft", args)
    assert "\n" not in str(e.value)


def test_every_key_reaches_the_runner(tmp_path, monkeypatch):
    """Each key of the tree (and each flat alias) set to a non-default value changes the runner's
    options: no key is accepted and then ignored."""
    values = {"seed": 3, "steps": 5, "output_dir": "/o2", "model.path": "/m2", "model.preset": "small",
              "model.init_seed": 2, "model.cache_dir": str(tmp_path / "c"), "data.path": "/d2",
              "data.eval_fraction": 0.5, "data.eval_path": "/e2", "data.max_tokens": 9, "optim.lr": 0.3,
              "optim.batch_size": 3, "optim.micro_batch_size": 1, "optim.max_grad_norm": 0.5, "eval.every": 4,
              "checkpoint.every": 6, "dpo.beta": 0.7, "dpo.loss": "ipo", "dpo.label_smoothing": 0.2,
              "learner.num": 2, "learner.num_cpus": 0.5, "learner.strategy": "fsdp", "learner.device": "cuda",
              "learner.dtype": "bfloat16", "lora.rank": 8, "lora.alpha": 8.0, "lora.target_modules": ["q_proj"],
              "lora.dropout": 0.1}
    assert set(values) == set(_keys())
    base = dict(model_path="model.path=/m", data="data.path=/d")
    built = []

    def ensure(kind, preset, cache_dir, seed):
        built.append((preset, cache_dir, seed))
        return f"{cache_dir}/{preset}-{seed}"

    import ray_rlhf.models.factory as factory

    monkeypatch.setattr(factory, "ensure_model", ensure)
    ref = dataclasses.asdict(to_options(parse_options("dpo", [base["data"]])))
    assert ref["model_path"].endswith("tiny-0") and built == [("tiny", "runs/models", 0)]
    for key, value in values.items():
        extra = [] if key.startswith("model.") and key != "model.path" else [base["model_path"]]
        ref_k = dataclasses.asdict(to_options(parse_options("dpo", [base["data"], *extra])))
        got = dataclasses.asdict(to_options(parse_options("dpo", [base["data"], *extra, f"{key}={value}"])))
        assert got != ref_k, f"{key}={value} changed nothing"
    assert set(FLAT_ALIASES.values()) <= set(_keys())


def test_cuda_without_a_gpu_is_one_line_before_anything_is_built():
    """``learner.device=cuda`` on a machine without a visible GPU: one line naming the fix (the
    check runs before the model is built; several ranks count the Ray cluster's GPUs instead)."""
    import torch

    from ray_rlhf.stages.command import check_device

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match="learner.device=cuda but this process sees no CUDA GPU") as e:
        check_device(parse_options("sft", ["learner.device=cuda"]))
    assert "\n" not in str(e.value) and "learner.device=cpu" in str(e.value)
    check_device(parse_options("sft", ["learner.device=cuda", "learner.num=2"]))  # counted when the ranks start


def test_lora_for_rm_is_refused_in_one_line():
    with pytest.raises(UserError, match="lora.rank > 0 is not supported for rm yet") as e:
        parse_options("rm", ["lora.rank=8"])
    assert "\n" not in str(e.value)
