"""``ray-rlhf sft|rm|dpo key=value ...``: a stage from the command line.

Keys are :class:`~ray_rlhf.stages.runner.StageOptions` fields (``model_path``, ``steps``, ``lr``,
``out`` ...) or their dotted names: ``data.path`` (``data.prompts_path`` is its alias),
``model.path``, ``dpo.beta``, ``dpo.loss``, ``dpo.label_smoothing``, ``data.eval_fraction``,
``data.eval_path``, ``eval.every``. An unknown key or a value of
the wrong type is one line, exit 2. SIGTERM stops after the current step, with a checkpoint; the
same command resumes.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
from pathlib import Path

from ray_rlhf.errors import UserError
from ray_rlhf.stages.runner import StageOptions, run_stage

ALIASES = {"data.path": "data_path", "data.prompts_path": "data_path", "model.path": "model_path",
           "dpo.beta": "beta", "dpo.loss": "loss", "dpo.label_smoothing": "label_smoothing",
           "data.eval_fraction": "eval_fraction", "data.eval_path": "eval_path", "eval.every": "eval_every"}


def parse_options(stage: str, overrides: list[str]) -> StageOptions:
    fields = {f.name: f for f in dataclasses.fields(StageOptions)}
    values: dict[str, object] = {"stage": stage}
    for item in overrides:
        key, sep, raw = item.partition("=")
        name = ALIASES.get(key, key)
        if not sep or name not in fields or name == "stage":
            valid = ", ".join(sorted(set(fields) - {"stage"} | set(ALIASES)))
            raise UserError(f"unknown {stage} option {item!r}; write key=value with a key among: {valid}")
        kind = type(fields[name].default) if fields[name].default is not dataclasses.MISSING else str
        try:
            values[name] = kind(raw)
        except ValueError:
            raise UserError(f"{key}={raw!r} is not a {kind.__name__}") from None
    missing = [n for n in ("model_path", "data_path", "out") if n not in values]
    if missing:
        raise UserError(f"ray-rlhf {stage} needs {', '.join(missing)} (e.g. model_path=DIR data.path=FILE out=DIR)")
    if stage == "dpo" and float(values.get("beta", 0.1)) <= 0:
        raise UserError(f"dpo.beta={values['beta']} must be > 0 (DPO's KL strength; 0.1 is usual)")
    return StageOptions(**values)


def main(stage: str, argv: list[str] | None = None) -> None:
    opts = parse_options(stage, list(sys.argv[1:] if argv is None else argv))
    stop = {"now": False}
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        log = Path(opts.out) / "metrics.jsonl"
        Path(opts.out).mkdir(parents=True, exist_ok=True)
        with log.open("a") as f:
            def report(row: dict) -> None:
                f.write(json.dumps(row) + "\n")
                f.flush()
                shown = " ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float))
                print(f"{stage} step {row['step']}/{opts.steps} {shown}", flush=True)

            run_stage(opts, report=report, should_stop=lambda: stop["now"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"{stage}: done; model in {Path(opts.out) / 'model'}" if not stop["now"]
          else f"{stage}: stopped by SIGTERM with a checkpoint in {opts.out}; run the same command to resume")
