"""Every config key is read by the code it configures: a key nothing reads is a lie to the user.

Each leaf of the config tree (:class:`~ray_rlhf.config.RunConfig`, its sections, and the models of
list items such as :class:`~ray_rlhf.config.schema.RewardFunctionSpec`) must be read somewhere in
``ray_rlhf/`` outside ``ray_rlhf/config/`` -- the validators and the loader do not count.

"Read" is an attribute access ``X.field`` where ``X`` is known to hold the key's section. The
analysis is static and per module (:class:`_Reads`): ``X`` holds a section when it is

* an attribute chain through the tree's own names: ``cfg.learner``, ``self.cfg.reward.functions``,
  ``run_config.rollout`` (``.learner`` holds the ``learner`` section whatever is left of it);
* a variable or ``self.`` attribute assigned one (``lc = cfg.learner``, ``g, lc = cfg.generators,
  cfg.learner``, ``self.ppo = ppo``), or a loop / comprehension variable over a list section
  (``for f in rc.functions``);
* a parameter annotated with the section's class (``ppo: PPOConfig``), or a bare name spelled like a
  section (``ppo``, ``kl``, ``learner``...) or like ``rollout_cfg`` / ``rollout_config`` (the low
  layers, e.g. ``records.py``, take a section untyped: they may not import the config).

A property of a config class (``ppo.clip_lo``, ``cfg.uses_critic``) counts as reading the keys its
body reads. A field name alone (``.num``, ``.max``, ``.compile``) is not enough: torch has those too.

Keys read only by name (a dumped dict, ``getattr`` with a computed name) are in :data:`READ_BY_NAME`,
each with where it is read.
"""

from __future__ import annotations

import ast
import types
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from ray_rlhf.config import RunConfig

PACKAGE = Path(__file__).resolve().parents[2] / "ray_rlhf"
CONFIG_DIR = PACKAGE / "config"

READ_BY_NAME: dict[str, str] = {
    # reward.remote: rewards/sources.py:reward_sources hands the reward actor each spec as a dict
    # (RemoteRewardSpec.model_dump(): the actor's arguments stay plain data), and
    # rewards/scorer.py:check_sources reads its keys: r["url"], r.get("weight"), r.get("timeout_s"),
    # r.get("retries").
    "reward.remote[].url": "rewards/scorer.py",
    "reward.remote[].weight": "rewards/scorer.py",
    "reward.remote[].timeout_s": "rewards/scorer.py",
    "reward.remote[].retries": "rewards/scorer.py",
}
"""Key -> the module (under ``ray_rlhf/``) that reads it by its quoted name."""


# ------------------------------------------------------------------------------ the config tree


def _sections_in(annotation) -> list[tuple[type[BaseModel], bool]]:
    """The config models inside a field's annotation: ``(model, is_list_item)``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, False)]
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (list, tuple):
        return [(m, True) for a in args for m, _ in _sections_in(a)]
    if origin in (typing.Union, types.UnionType):
        return [x for a in args for x in _sections_in(a)]
    return []


def config_tree() -> tuple[dict[str, tuple[type, str]], dict[str, type], dict[type, list[str]]]:
    """``(leaves, sections, prefixes)``: every leaf key (``reward.functions[].name`` -> (class, field)),
    every section path (``""`` is the root) -> its class, and each class -> the paths it sits at."""
    leaves: dict[str, tuple[type, str]] = {}
    sections: dict[str, type] = {}
    prefixes: dict[type, list[str]] = {}

    def walk(cls: type, path: str) -> None:
        sections[path] = cls
        prefixes.setdefault(cls, []).append(path)
        for name, field in cls.model_fields.items():
            key = f"{path}.{name}" if path else name
            subs = _sections_in(field.annotation)
            if subs:
                for sub, is_list in subs:
                    walk(sub, key + "[]" if is_list else key)
            else:
                leaves[key] = (cls, name)

    walk(RunConfig, "")
    return leaves, sections, prefixes


LEAVES, SECTIONS, PREFIXES = config_tree()
CLASS_NAMES = {cls.__name__: cls for cls in PREFIXES}
TOP_SECTIONS = {name for name in RunConfig.model_fields if name in SECTIONS}


def _is_list(path: str) -> bool:
    """``reward.functions``: a list of sections (its items are at ``reward.functions[]``)."""
    return path + "[]" in SECTIONS


def _child(path: str, attr: str) -> str | None:
    """The section or list of sections at ``path.attr``, or None."""
    key = f"{path}.{attr}" if path else attr
    return key if key in SECTIONS or _is_list(key) else None


# ------------------------------------------------------------------------------- who reads what


def _dotted(node: ast.AST) -> str | None:
    """``self.cfg.learner`` for an attribute chain on a name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def _annotation_classes(ann: ast.AST | None) -> list[type]:
    if ann is None:
        return []
    if isinstance(ann, ast.Constant) and isinstance(ann.value, str):
        try:
            ann = ast.parse(ann.value, mode="eval").body
        except SyntaxError:
            return []
    names = {n.id for n in ast.walk(ann) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(ann) if isinstance(n, ast.Attribute)}
    return [CLASS_NAMES[n] for n in names if n in CLASS_NAMES]


class _Reads:
    """The config paths that the expressions of one module hold, and the keys it reads."""

    def __init__(self, tree: ast.AST, self_paths: list[str] | None = None):
        self.bound: dict[str, set[str]] = {}
        if self_paths is not None:  # a config class's own method: `self` is the section
            self.bound["self"] = set(self_paths)
        nodes = list(ast.walk(tree))
        self.binders = [n for n in nodes if isinstance(n, ast.Assign | ast.AnnAssign | ast.For | ast.comprehension | ast.arg)]
        self.attributes = [n for n in nodes if isinstance(n, ast.Attribute)]
        for _ in range(3):  # bindings through bindings (x = cfg.reward; for f in x.functions: ...)
            self._bind()

    def paths(self, node: ast.AST) -> set[str]:
        """The config paths ``node`` may hold: sections (``reward``, ``reward.functions[]``: an item)
        and lists of sections (``reward.functions``)."""
        out: set[str] = set()
        dotted = _dotted(node)
        if dotted in self.bound:
            out |= self.bound[dotted]
        if isinstance(node, ast.Name):
            if node.id in TOP_SECTIONS and node.id not in ("ray", "logging", "model"):  # modules / torch models
                out.add(node.id)
            section = node.id.removesuffix("_cfg").removesuffix("_config")
            if section != node.id and section in TOP_SECTIONS:
                out.add(section)
        elif isinstance(node, ast.Attribute):
            if node.attr in TOP_SECTIONS:
                out.add(node.attr)
            for base in self.paths(node.value):
                child = _child(base, node.attr) if base in SECTIONS else None
                if child:
                    out.add(child)
        elif isinstance(node, ast.Subscript):  # rc.functions[0]
            out |= {p + "[]" for p in self.paths(node.value) if _is_list(p)}
        return out

    def _bind_target(self, target: ast.AST, paths: set[str]) -> None:
        name = _dotted(target)
        if name and paths:
            self.bound.setdefault(name, set()).update(paths)

    def _bind(self) -> None:
        for node in self.binders:
            if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                        for t, v in zip(target.elts, node.value.elts):
                            self._bind_target(t, self.paths(v))
                    else:
                        self._bind_target(target, self.paths(node.value))
            elif isinstance(node, ast.For | ast.comprehension):
                items = {p + "[]" for p in self.paths(node.iter) if _is_list(p)}
                self._bind_target(node.target, items)
            elif isinstance(node, ast.arg):
                for cls in _annotation_classes(node.annotation):
                    self._bind_target(ast.Name(node.arg), set(PREFIXES[cls]))

    def reads(self) -> set[str]:
        """``path.attr`` for each attribute access on a config path (fields and properties alike)."""
        out = set()
        for node in self.attributes:
            for base in self.paths(node.value):
                if base in SECTIONS:
                    out.add(f"{base}.{node.attr}" if base else node.attr)
        return out


def _property_reads() -> dict[str, set[str]]:
    """``path.prop`` -> the keys its body reads, for every property of every config class."""
    import inspect
    import textwrap

    out: dict[str, set[str]] = {}
    for cls, paths in PREFIXES.items():
        for name, member in vars(cls).items():
            if isinstance(member, property):
                body = ast.parse(textwrap.dedent(inspect.getsource(member.fget)))
                reads = _Reads(body, self_paths=paths).reads()
                for p in paths:
                    out[f"{p}.{name}" if p else name] = reads
    changed = True
    while changed:  # a property reading another property reads what that one reads
        changed = False
        for reads in out.values():
            more = set().union(*(out.get(r, set()) for r in reads)) - reads
            if more:
                reads |= more
                changed = True
    return out


def keys_read_outside_config() -> dict[str, list[str]]:
    """Each key read outside ``ray_rlhf/config/`` -> the modules reading it."""
    props = _property_reads()
    out: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if CONFIG_DIR in path.parents:
            continue
        rel = str(path.relative_to(PACKAGE))
        reads = _Reads(ast.parse(path.read_text())).reads()
        for r in reads | set().union(*(props.get(r, set()) for r in reads)):
            if r in LEAVES:
                out.setdefault(r, []).append(rel)
    return out


# ------------------------------------------------------------------------------------- the tests


READ = keys_read_outside_config()


def test_the_tree_walk_finds_nested_and_list_item_keys():
    assert {"ppo.clip", "reward.functions[].name", "reward.remote[].url", "faults.kill_generator[].step",
            "faults.hang_generator[].index", "logging.wandb.project", "seed"} <= set(LEAVES)
    assert "reward.functions" not in LEAVES and "logging.wandb" not in LEAVES  # sections, not leaves


def test_the_analysis_has_teeth():
    """Names that torch or Python also use do not count without their section."""
    src = "import torch\ndef f(m):\n    m.compile()\n    x = torch.zeros(3).max()\n    return m.num\n"
    assert not _Reads(ast.parse(src)).reads() & set(LEAVES)
    src = ("def f(run: 'RunConfig', lc: 'LearnerConfig'):\n    g, r = run.generators, run.reward\n"
           "    names = [s.name for s in r.functions]\n    return g.max, lc.compile, run.seed, run.pool_max\n")
    reads = _Reads(ast.parse(src)).reads()
    assert reads & set(LEAVES) == {"generators.max", "learner.compile", "reward.functions[].name", "seed"}
    assert "pool_max" in reads
    props = _property_reads()
    assert props["pool_max"] & set(LEAVES) == {"generators.max", "generators.num"}
    assert props["rollout.batch_size"] & set(LEAVES) == {"rollout.prompts_per_step", "rollout.samples_per_prompt"}


def test_allow_list_names_real_keys_read_by_name():
    for key, module in READ_BY_NAME.items():
        assert key in LEAVES, f"{key}: not a config key any more; drop it from READ_BY_NAME"
        assert key not in READ, f"{key} is read as an attribute in {READ[key]}; drop it from READ_BY_NAME"
        field = key.rsplit(".", 1)[-1]
        assert f'"{field}"' in (PACKAGE / module).read_text(), f"{key}: {module} does not name {field!r} any more"


@pytest.mark.parametrize("key", sorted(LEAVES))
def test_config_key_is_read(key):
    assert key in READ or key in READ_BY_NAME, (
        f"config key {key!r} is read nowhere outside ray_rlhf/config/: wire it into the code it configures, or "
        "remove it (if it is read by name, add it to READ_BY_NAME saying where)"
    )
