"""The ``ray-rlhf`` command.

``ray-rlhf train --config tiny [key.sub=value ...]``   run PPO (same as ``python -m ray_rlhf.train``)
``ray-rlhf show-config --config tiny [overrides]``      print the resolved config and exit
``ray-rlhf make-model tiny OUT_DIR [--kind reward]``    build an offline random-init model

A user mistake (:class:`~ray_rlhf.errors.UserError`) prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys

from ray_rlhf.errors import user_error_of


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny", help="preset name (tiny, small) or a YAML file")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")


def train_parser(prog: str = "ray-rlhf train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Run RLHF with PPO on Ray.")
    _add_config_args(p)
    return p


def _cmd_train(args: argparse.Namespace) -> None:
    from ray_rlhf.config import load_config
    from ray_rlhf.run.driver import run

    run(load_config(args.config, args.overrides))


def _cmd_show_config(args: argparse.Namespace) -> None:
    from ray_rlhf.config import load_config, to_yaml

    print(to_yaml(load_config(args.config, args.overrides)), end="")


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
    return parser


def _stop_ray() -> None:
    """Shut Ray down (if this process started or joined it) so its log lines come before ours."""
    ray = sys.modules.get("ray")
    try:
        if ray is not None and ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001 -- best effort on the way out
        pass
    sys.stdout.flush()


def run_command(func, args) -> int:
    """Run a command; user mistakes become one line on stderr and exit status 2.

    A user mistake found inside a Ray actor (a reward function that raises, ...) comes back as a
    Ray error; it is unwrapped to its one line. Ray is shut down before the line is printed, so the
    error is the last thing on stderr rather than buried under actors' log output.
    """
    from ray_rlhf.run.preemption import EXIT_PREEMPTED, Preempted

    try:
        func(args)
    except Preempted as p:
        _stop_ray()
        print(f"ray-rlhf: preempted by {p.signame} after step {p.step}; checkpoint {p.checkpoint} is complete. "
              "Run the same command again to resume.", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        _stop_ray()
        print("ray-rlhf: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        user = user_error_of(e)
        if user is None:
            raise
        _stop_ray()
        print(f"ray-rlhf: error: {user}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.func, args)


def train_main(argv: list[str] | None = None) -> int:
    """``python -m ray_rlhf.train [--config ...] [overrides]``: the ``train`` command alone."""
    args = train_parser(prog="python -m ray_rlhf.train").parse_args(argv)
    return run_command(_cmd_train, args)


if __name__ == "__main__":
    sys.exit(main())
