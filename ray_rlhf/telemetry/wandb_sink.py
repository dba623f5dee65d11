"""Optional Weights & Biases sink (``logging.wandb``): one ``run.log(row, step=step)`` per step.

``wandb`` is imported only when a run is started in ``online`` or ``offline`` mode; ``disabled``
needs no package and records nothing. Keys are logged verbatim (``reward/mean`` appears in the
``reward`` section; ``.`` and ``:`` in ``reward_part/<module:function>`` are kept). ``None``
values (NaN/inf in ``metrics.jsonl``) are left out of the row, so a chart shows a gap and the run
summary keeps the last finite value.

W&B's step must increase: after a resume from step ``k``, rows of steps ``<= k`` that this W&B run
already holds are dropped by W&B (with a warning). Pass ``run_id`` (e.g. saved in the checkpoint)
to continue the same W&B run after a resume; without it a resumed training run starts a new W&B run.

Offline runs are written to ``<dir>/wandb/offline-run-<time>-<id>/`` and uploaded later with
``wandb sync <that dir>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from ray_rlhf.errors import UserError
from ray_rlhf.telemetry.sinks import Row

WandbMode = Literal["online", "offline", "disabled"]
MODES: tuple[str, ...] = ("online", "offline", "disabled")


def import_wandb() -> Any:
    """The ``wandb`` module, or a one-line :class:`UserError` telling how to install it."""
    try:
        import wandb
    except ImportError:
        raise UserError("logging.wandb is set but the wandb package is not installed: pip install wandb "
                        "(or set logging.wandb.mode=disabled)") from None
    return wandb


class WandbSink:
    """Logs each step's row to a W&B run. Implements :class:`~ray_rlhf.telemetry.sinks.MetricSink`.

    Args:
        project: W&B project.
        name: display name of the W&B run (the ray-rlhf run name).
        mode: ``online`` (needs ``wandb login`` or ``WANDB_API_KEY``), ``offline`` (files only, sync
            later) or ``disabled`` (nothing; wandb not imported).
        dir: directory under which W&B writes ``wandb/`` (default: W&B's, ``WANDB_DIR`` or cwd);
            the driver passes the run's ``output_dir``.
        config: the resolved run config, stored with the W&B run.
        entity: W&B team or user (default: the logged-in user's default entity).
        run_id: W&B run id to continue (``resume="allow"``); None starts a new run.
    """

    def __init__(self, project: str, name: str | None = None, mode: WandbMode = "online",
                 dir: str | Path | None = None, config: dict[str, Any] | None = None,
                 entity: str | None = None, run_id: str | None = None):
        if mode not in MODES:
            raise UserError(f"logging.wandb.mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self._run = None
        self.run_id: str | None = None
        self.run_dir: Path | None = None
        """Local directory of the W&B run (``.../wandb/offline-run-...``); None when disabled."""
        if mode == "disabled":
            return
        wandb = import_wandb()
        if dir is not None:
            Path(dir).mkdir(parents=True, exist_ok=True)
        try:
            self._run = wandb.init(project=project, name=name, mode=mode, dir=None if dir is None else str(dir),
                                   config=config, entity=entity, id=run_id,
                                   resume="allow" if run_id else None, reinit="create_new")
        except wandb.errors.UsageError as e:
            raise UserError(f"cannot start the W&B run ({e}); run `wandb login` or set WANDB_API_KEY, "
                            "or set logging.wandb.mode=offline") from None
        self.run_id = self._run.id
        self.run_dir = Path(self._run.dir).parent

    def write(self, step: int, row: Row) -> None:
        """Log this step's finite values at W&B step ``step``."""
        if self.mode == "disabled":
            return
        if self._run is None:
            raise RuntimeError("WandbSink is closed")
        self._run.log({k: v for k, v in row.items() if v is not None and k != "step"}, step=int(step))

    def close(self) -> None:
        """Finish the W&B run (flushes it; an online run uploads what is left). Safe to call twice."""
        if self._run is not None:
            self._run.finish()
            self._run = None

    def __enter__(self) -> WandbSink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
