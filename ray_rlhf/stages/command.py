"""``ray-rlhf sft|rm|dpo [--config PRESET|FILE.yaml] key=value ...``: a stage from the command line.

Keys are those of the stage's typed config tree (:class:`~ray_rlhf.config.stage.StageConfig`:
``model.path``, ``data.path``, ``output_dir``, ``steps``, ``optim.lr``, ``dpo.beta``, ``eval.every``
...), or 0.2's flat names (``model_path``, ``out``, ``lr`` ...). With no key at all the stage runs on
the offline tiny model and the bundled data. An unknown key or a value of the wrong type is one
line, exit 2. SIGTERM stops after the current step, with a checkpoint; the same command resumes.
``learner.num=N`` (N > 1) runs the stage on N ranks as Ray actors (:mod:`ray_rlhf.stages.group`),
``learner.strategy=fsdp`` shards them (FSDP2), ``learner.device=cuda`` / ``learner.dtype=bfloat16``
train on GPUs / in bf16 autocast.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from ray_rlhf.config.stage import BUNDLED_DATA, StageConfig, load_stage_config
from ray_rlhf.errors import UserError
from ray_rlhf.stages.runner import StageOptions, run_stage


def split_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """(``--config`` value or None, the ``key=value`` overrides) of a stage's argument list."""
    config, rest, it = None, [], iter(argv)
    for item in it:
        if item == "--config":
            config = next(it, None)
        elif item.startswith("--config="):
            config = item.partition("=")[2]
        else:
            rest.append(item)
    return config, rest


def to_options(cfg: StageConfig) -> StageOptions:
    """The runner's resolved options: the model built if it is the offline preset, the bundled
    data if none is named, ``runs/<stage>`` if no output directory is."""
    from ray_rlhf.models.factory import ensure_model

    model = cfg.model.path or str(ensure_model("policy", cfg.model.preset, cfg.model.cache_dir, seed=cfg.model.init_seed))
    return StageOptions(
        stage=cfg.stage, model_path=model, data_path=cfg.data.path or str(BUNDLED_DATA[cfg.stage]),
        out=cfg.output_dir or f"runs/{cfg.stage}", steps=cfg.steps, batch_size=cfg.optim.batch_size,
        micro_batch_size=cfg.optim.micro_batch_size, lr=cfg.optim.lr, max_grad_norm=cfg.optim.max_grad_norm,
        seed=cfg.seed, checkpoint_every=cfg.checkpoint.every, beta=cfg.dpo.beta, loss=cfg.dpo.loss,
        label_smoothing=cfg.dpo.label_smoothing, max_tokens=cfg.data.max_tokens,
        eval_fraction=cfg.data.eval_fraction, eval_path=cfg.data.eval_path or "", eval_every=cfg.eval.every,
        num_ranks=cfg.learner.num, num_cpus=cfg.learner.num_cpus, strategy=cfg.learner.strategy,
        device=cfg.learner.device, dtype=cfg.learner.dtype, lora_rank=cfg.lora.rank, lora_alpha=cfg.lora.alpha,
        lora_targets=None if cfg.lora.target_modules is None else tuple(cfg.lora.target_modules),
        lora_dropout=cfg.lora.dropout)


def parse_options(stage: str, overrides: list[str], config: str | None = None) -> StageConfig:
    """The validated config tree of ``ray-rlhf <stage> [--config C] overrides`` (nothing built yet)."""
    if config is None:
        config, overrides = split_config(overrides)
    return load_stage_config(stage, config, overrides)


def check_device(cfg: StageConfig) -> None:
    """``learner.device=cuda`` in the command's own process (one rank) needs a GPU it can see; with
    several ranks the Ray cluster's GPUs are counted when the ranks start (:mod:`ray_rlhf.stages.group`)."""
    if cfg.learner.device != "cuda" or cfg.learner.num > 1:
        return
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"learner.device=cuda but this process sees no CUDA GPU (torch {torch.__version__}, "
                        "torch.cuda.is_available() is False); run on a GPU node or set learner.device=cpu")


POSTFIX = {"sft": {"loss": "sft/loss"}, "rm": {"loss": "rm/loss", "acc": "rm/accuracy"},
           "dpo": {"loss": "dpo/loss", "margin": "rewards/margins"}}
"""Progress-bar label -> metric key, per stage."""


def resumed_step(out: Path) -> int | None:
    """The step of ``out/checkpoint.pt`` (read without loading the weights), or None: a fresh stage."""
    import torch

    ckpt = out / "checkpoint.pt"
    if not ckpt.exists():
        return None
    return int(torch.load(ckpt, weights_only=True, mmap=True, map_location="cpu")["step"])


def metrics_logger(stage: str, opts: StageOptions):
    """Each step's row to ``out/metrics.jsonl`` (a resume keeps the rows up to its checkpoint and
    drops later ones), TensorBoard (``out/tensorboard``), a progress bar where stderr is a terminal,
    and Ray's metrics (Prometheus ``ray_rlhf_<key>``, label ``run=<stage>:<out>``) when the stage runs
    on a Ray cluster (``learner.num > 1``, or ``RAY_ADDRESS`` set as under ``ray job submit``)."""
    import os

    from ray_rlhf.metrics import MetricsLogger

    out = Path(opts.out)
    sinks = []
    if opts.num_ranks > 1 or os.environ.get("RAY_ADDRESS"):
        from ray_rlhf.stages.group import connect
        from ray_rlhf.telemetry.ray_metrics import RayMetricsSink

        connect()
        sinks.append(RayMetricsSink(f"{stage}:{out.name}"))
    start = resumed_step(out)
    return MetricsLogger(out, total_steps=opts.steps, start_step=start or 0, tensorboard=True,
                         progress_bar=sys.stderr.isatty(), resume_from_step=start, postfix=POSTFIX[stage], sinks=sinks)


def main(stage: str, argv: list[str] | None = None) -> None:
    cfg = parse_options(stage, list(sys.argv[1:] if argv is None else argv))
    check_device(cfg)  # before the model is built or loaded
    opts = to_options(cfg)
    if opts.lora_rank:
        from ray_rlhf.preflight import check_lora_targets

        check_lora_targets(opts.model_path, opts.lora_targets)  # on the meta device: before the weights load
    stop = {"now": False}
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        with metrics_logger(stage, opts) as logger:
            def report(row: dict) -> None:
                logger.log(row["step"], row)
                shown = " ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float))
                print(f"{stage} step {row['step']}/{opts.steps} {shown}", flush=True)

            if opts.num_ranks > 1:
                from ray_rlhf.stages.group import run_stage_group

                run_stage_group(opts, report=report, should_stop=lambda: stop["now"])
            else:
                run_stage(opts, report=report, should_stop=lambda: stop["now"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"{stage}: done; model in {Path(opts.out) / 'model'}" if not stop["now"]
          else f"{stage}: stopped by SIGTERM with a checkpoint in {opts.out}; run the same command to resume")
