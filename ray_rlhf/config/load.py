"""Load a :class:`RunConfig` from a named preset or a YAML file, plus ``a.b.c=value`` overrides.

Every mistake is a :class:`~ray_rlhf.errors.UserError` with one line naming the key, e.g.
``unknown config key 'ppo.bogus' (valid keys under 'ppo': clip, dual_clip, ...)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ray_rlhf.config.schema import RunConfig
from ray_rlhf.errors import UserError

PRESETS_DIR = Path(__file__).parent / "presets"

log = logging.getLogger(__name__)


def _one_event(value: Any) -> Any:
    """A deprecated ``faults.*_at_step: N`` as the list of events its new key takes."""
    return value if value is None or isinstance(value, list) else [{"step": value}]


DEPRECATED: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "ppo.gamma": ("algo.gamma", lambda v: v),
    "ppo.lam": ("algo.lam", lambda v: v),
    "ppo.whiten_advantages": ("algo.whiten_advantages", lambda v: v),
    "algo.is_cap": ("ppo.is_cap", lambda v: v),
    "algo.is_mode": ("ppo.is_mode", lambda v: v),
    "kl.estimator": ("kl.approx", lambda v: v),
    "faults.kill_learner_at_step": ("faults.kill_learner", _one_event),
    "faults.kill_reward_at_step": ("faults.kill_reward", _one_event),
    "faults.stop_after_step": ("faults.stop", _one_event),
}
"""Keys renamed in 0.3, still accepted in this version with a one-line notice: old key -> (new key,
how the old value becomes the new one). The estimator's knobs moved to ``algo``, the loss's to
``ppo``; ``kl.estimator`` became ``kl.approx`` (one key named ``estimator``, ``algo.estimator``);
every ``faults`` key is a list of events (``[{step: N}]``)."""


ALIASES = {"data.path": "data.prompts_path"}
"""Other names of a key, accepted silently: ``data.path`` is the data key every command takes
(``ray-rlhf sft|rm|dpo`` too), so a PPO run accepts it for ``data.prompts_path``."""


def _apply_aliases(tree: dict[str, Any]) -> None:
    for alias, name in ALIASES.items():
        section, key = alias.split(".")
        node = tree.get(section)
        if not isinstance(node, dict) or key not in node:
            continue
        real = name.split(".")[1]
        if real in node:
            raise UserError(f"config keys {alias!r} and {name!r} name the same setting; keep one")
        node[real] = node.pop(key)


def _apply_deprecated(tree: dict[str, Any]) -> None:
    """Move every deprecated key of ``tree`` to its new name, with a notice naming both."""
    for old, (new, convert) in DEPRECATED.items():
        section, key = old.split(".")
        node = tree.get(section)
        if not isinstance(node, dict) or key not in node:
            continue
        new_section, new_key = new.split(".")
        target = tree.setdefault(new_section, {})
        if not isinstance(target, dict):
            continue  # a malformed section: validation names it
        if new_key in target:
            raise UserError(f"config keys {old!r} (deprecated) and {new!r} are both set; keep only {new!r}")
        target[new_key] = convert(node.pop(key))
        log.warning("config key %r is deprecated and will be removed in the next version; use %r", old, new)


def preset_names() -> list[str]:
    """Names of the presets shipped in the package."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of keys, not {type(data).__name__}")
    return data


def _base_dict(config: str) -> dict[str, Any]:
    if config in preset_names():
        return _read_yaml(PRESETS_DIR / f"{config}.yaml")
    path = Path(config)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return _read_yaml(path)
    raise UserError(
        f"--config {config!r} is neither a preset ({', '.join(preset_names())}) nor an existing YAML file"
    )


def apply_override(tree: dict[str, Any], override: str) -> None:
    """Set ``a.b.c=value`` in a nested dict; the value is parsed as YAML (``1e-4``, ``true``, ``[1, 2]``)."""
    key, sep, raw = override.partition("=")
    key = ALIASES.get(key.strip(), key.strip())  # data.path=X overrides a preset's data.prompts_path
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(f"override {override!r} is not of the form key.sub=value (e.g. ppo.clip=0.2)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {} if child is None else child
            if not isinstance(child, dict):
                raise UserError(f"config key {key!r}: {part!r} is a value, not a section")
            node[part] = child
        node = child
    node[parts[-1]] = value


def _section_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic section class at a location path (for listing valid keys)."""
    model: Any = RunConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        candidates = [ann, *args]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    return model


def _format_error(err: ValidationError) -> str:
    msgs = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            section = _section_at(loc[:-1])
            valid = ", ".join(sorted(section.model_fields)) if section else ""
            where = ".".join(str(p) for p in loc[:-1]) or "top level"
            msgs.append(f"unknown config key {key!r} (valid keys under {where!r}: {valid})")
        elif not loc:  # model-level validator (impossible combination)
            msgs.append(e["msg"].removeprefix("Value error, "))
        else:
            got = e.get("input")
            msgs.append(f"config key {key!r}: {e['msg'].removeprefix('Value error, ')} (got {got!r})")
    return "invalid config: " + "; ".join(msgs)


def load_config(config: str = "tiny", overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Resolve a preset name or YAML path, apply dotted overrides, validate.

    Raises :class:`UserError` (one line) on an unknown key, a wrong type or an impossible
    combination -- before anything expensive happens.
    """
    tree = _base_dict(config)
    for override in overrides:
        apply_override(tree, override)
    _apply_aliases(tree)
    _apply_deprecated(tree)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise UserError(_format_error(e)) from None


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (logged at start and saved beside the run)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
