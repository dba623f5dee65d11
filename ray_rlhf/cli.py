"""The ``ray-rlhf`` command.

``ray-rlhf train --config tiny [key.sub=value ...]``   run PPO (same as ``python -m ray_rlhf.train``)
``ray-rlhf show-config --config tiny [overrides]``      print the resolved config and exit
``ray-rlhf make-model tiny OUT_DIR [--kind reward]``    build an offline random-init model
``ray-rlhf sft|rm|dpo [--config tiny|FILE.yaml] [key=value ...]``  a stage (docs/pipeline.md)
``ray-rlhf export [--merge] RUN_DIR OUT_DIR``          the newest checkpoint's model (LoRA: ``--merge`` merges)
``ray-rlhf bench [--config my_run.yaml] [overrides] [--quick] [--sweep key=v1,v2]``  benchmark a run's config

A user mistake (:class:`~ray_rlhf.errors.UserError`) prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys

from ray_rlhf.run.command import run_command


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny", help="preset name (tiny, small) or a YAML file")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")


def train_parser(prog: str = "ray-rlhf train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Run RLHF with PPO on Ray.")
    _add_config_args(p)
    return p


def _cmd_train(args: argparse.Namespace) -> None:
    from ray_rlhf.config import load_config

    cfg = load_config(args.config, args.overrides)  # a config mistake is reported before Ray and torch load
    from ray_rlhf.run.driver import run

    run(cfg)


def _cmd_show_config(args: argparse.Namespace) -> None:
    from ray_rlhf.config import load_config, to_yaml

    print(to_yaml(load_config(args.config, args.overrides)), end="")


def _cmd_export(args: argparse.Namespace) -> None:
    from ray_rlhf.checkpoint.export import export_checkpoint

    out, step, part = export_checkpoint(args.run_dir, args.out_dir, merge=args.merge)
    what = "the merged model" if part == "policy" else "the LoRA adapters (peft folder; --merge for a merged model)"
    print(f"exported {what} of step {step} to {out}")


def _cmd_make_model(args: argparse.Namespace) -> None:
    from ray_rlhf.models.factory import build_causal_lm, build_reward_model

    build = build_causal_lm if args.kind == "policy" else build_reward_model
    path = build(args.preset, args.out_dir, seed=args.seed)
    print(f"built {args.kind} model '{args.preset}' (seed {args.seed}) in {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ray-rlhf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run PPO")
    _add_config_args(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("show-config", help="print the resolved config")
    _add_config_args(p)
    p.set_defaults(func=_cmd_show_config)

    p = sub.add_parser("make-model", help="build an offline random-init model in Hugging Face format")
    p.add_argument("preset", help="model preset, e.g. tiny or small")
    p.add_argument("out_dir")
    p.add_argument("--kind", choices=["policy", "reward"], default="policy")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_make_model)

    p = sub.add_parser("export", help="write a run's newest checkpoint as a Hugging Face model directory")
    p.add_argument("--merge", action="store_true",
                   help="LoRA runs: the model with the adapters merged in (default: the adapter folder)")
    p.add_argument("run_dir", help="the run's output_dir (a path or a store URI)")
    p.add_argument("out_dir", help="a new directory")
    p.set_defaults(func=_cmd_export)

    for stage, what in (("sft", "supervised fine-tuning"), ("rm", "train a reward model"), ("dpo", "DPO")):
        p = sub.add_parser(stage, help=f"{what} on one learner rank")
        p.add_argument("--config", default=None, help="stage preset (tiny, the default) or a YAML file")
        p.add_argument("overrides", nargs="*", metavar="key=value")
        p.set_defaults(func=_cmd_stage, stage=stage)

    from ray_rlhf.bench.args import build_parser as bench_parser

    bench = bench_parser()
    p = sub.add_parser("bench", help="benchmark a run's config (phases, bound, MFU, weight sync, memory)",
                       parents=[bench], add_help=False, description=bench.description)
    p.set_defaults(func=_cmd_bench)
    return parser


def _cmd_stage(args: argparse.Namespace) -> None:
    from ray_rlhf.stages.command import main as stage_main

    stage_main(args.stage, ([] if args.config is None else ["--config", args.config]) + args.overrides)


def _cmd_bench(args: argparse.Namespace) -> None:
    import logging

    from ray_rlhf.bench.run import run_bench

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_bench(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.func, args)


def train_main(argv: list[str] | None = None) -> int:
    """``python -m ray_rlhf.train [--config ...] [overrides]``: the ``train`` command alone."""
    args = train_parser(prog="python -m ray_rlhf.train").parse_args(argv)
    return run_command(_cmd_train, args)


if __name__ == "__main__":
    sys.exit(main())
