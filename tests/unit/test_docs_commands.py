"""Every command the docs show still runs its config: a renamed or removed key breaks this test.

From ``README.md``, ``docs/**/*.md`` and the other READMEs, every ``ray-rlhf ...`` and
``python -m ray_rlhf...`` command line -- in fenced code blocks (backslash-continued lines joined,
a leading ``$ `` prompt and ``# comments`` dropped, also after ``ray job submit ... --``) and in
one-line inline code spans -- is parsed by the CLI's own parser and its config resolved the way the
command would resolve it (:func:`ray_rlhf.config.load_config`, as ``ray-rlhf train`` and
``show-config`` do; ``bench`` also each ``--sweep`` value), without starting Ray. ``make-model``
takes no config: its preset must exist. A command followed in its block by a
``ray-rlhf: error: ...`` line is an example of a mistake: it must fail with that message.

Inline ``section.key=value`` spans in the prose (``data.prompts_path=bundled:letters``) must name
existing keys (their values may be placeholders such as ``s``, ``k``, ``N``).

Placeholders: ``<...>`` becomes a dummy string, ``--config <...>`` or a YAML file the docs invent
(``my_run.yaml``) becomes the ``tiny`` preset, and usage brackets such as ``[key=value ...]`` and a
bare ``key=value`` are dropped.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from ray_rlhf.config import load_config, preset_names
from ray_rlhf.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")),
             ROOT / "benchmarks" / "README.md", ROOT / "clusters" / "README.md"]
PROGRAM = re.compile(r"(?<![\w./`-])(ray-rlhf|python -m ray_rlhf(?:\.\w+)*)(?=\s|$)")
"""Where a command starts: ``ray-rlhf`` or ``python -m ray_rlhf[.module]`` (not ``ray-rlhf:``, nor a
`quoted` name inside a code block, as in the README's file tree)."""
INLINE_OVERRIDE = re.compile(r"^([a-z_]+(?:\.[a-z_0-9]+)+)=")
ERROR_PREFIX = "ray-rlhf: error: "


@dataclass(frozen=True)
class Command:
    where: str
    """``file:line`` of the command's first line."""
    program: str
    """``ray-rlhf`` or ``python -m ray_rlhf.<module>``."""
    argv: tuple[str, ...]
    """The arguments after the program, placeholders filled."""
    error: str | None = None
    """The documented ``ray-rlhf: error:`` message that follows it, if any."""


def _fill_placeholders(text: str) -> str:
    text = re.sub(r"\s\[[^\]]*\.\.\.\]", " ", text)  # usage brackets: [key=value ...]
    text = re.sub(r"(?<!\S)key(?:\.sub)*=value(?!\S)", " ", text)  # a generic override
    text = re.sub(r"--config\s+<[^>]*>", "--config tiny", text)
    return re.sub(r"<[^<>\s]*>", "placeholder", text)


def _command(where: str, text: str, error: str | None = None, anywhere: bool = True) -> Command | None:
    """The command in ``text`` (from its program on), or None when ``text`` holds none."""
    m = PROGRAM.search(text) if anywhere else PROGRAM.match(text)
    if m is None:
        return None
    argv = shlex.split(_fill_placeholders(text[m.end():]), comments=True)
    return Command(where, m.group(1), tuple(argv), error)


def _logical_lines(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Lines of a code block with backslash continuations joined: ``(first line number, text)``."""
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for number, line in lines:
        start, text = pending or (number, "")
        text = f"{text} {line.strip()}" if pending else line
        if text.rstrip().endswith("\\"):
            pending = (start, text.rstrip()[:-1])
        else:
            out.append((start, text))
            pending = None
    if pending:
        out.append(pending)
    return out


def commands_in(name: str, text: str) -> list[Command]:
    """Every command of a Markdown text: in fenced code blocks, and inline spans that start with one."""
    found: list[Command] = []
    block: list[tuple[int, str]] | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith("```"):
            if block is None:
                block = []
                continue
            found += _block_commands(name, block)
            block = None
        elif block is not None:
            block.append((number, line))
        else:
            for span in re.findall(r"`([^`]+)`", line):
                cmd = _command(f"{name}:{number}", span.strip(), anywhere=False)
                if cmd and not (cmd.program == "ray-rlhf" and not cmd.argv):  # `ray-rlhf`: the tool's name
                    found.append(cmd)
    return found


def _block_commands(name: str, block: list[tuple[int, str]]) -> list[Command]:
    lines = _logical_lines(block)
    out = []
    for i, (number, line) in enumerate(lines):
        text = line.strip()
        if text.startswith(ERROR_PREFIX):
            continue
        nxt = lines[i + 1][1].strip() if i + 1 < len(lines) else ""
        error = nxt.removeprefix(ERROR_PREFIX) if nxt.startswith(ERROR_PREFIX) else None
        cmd = _command(f"{name}:{number}", text.removeprefix("$ "), error)
        if cmd:
            out.append(cmd)
    return out


def inline_overrides_in(name: str, text: str) -> list[tuple[str, str]]:
    """``(file:line, span)`` for each inline ``section.key=value`` span whose section is a config section."""
    from ray_rlhf.config import RunConfig

    sections = set(RunConfig.model_fields)
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        for span in re.findall(r"`([^`]+)`", line):
            m = INLINE_OVERRIDE.match(span)
            if m and m.group(1).split(".")[0] in sections:
                out.append((f"{name}:{number}", span))
    return out


def _docs():
    return [(str(p.relative_to(ROOT)), p.read_text()) for p in DOC_FILES if p.is_file()]


COMMANDS = [c for name, text in _docs() for c in commands_in(name, text)]
OVERRIDES = [o for name, text in _docs() for o in inline_overrides_in(name, text)]


# ------------------------------------------------------------------------- resolving a command


def _parse(parser, cmd: Command):
    """The CLI's own argument parsing; a refusal fails the test with argparse's message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(list(cmd.argv))
    except SystemExit:
        pytest.fail(f"{cmd.where}: the CLI's parser refuses `{cmd.program} {shlex.join(cmd.argv)}`: "
                    f"{err.getvalue().strip()}")


def _config_name(config: str | None) -> str | None:
    """A YAML file the docs invent (``my_run.yaml``) stands for a preset."""
    if config and config.endswith((".yaml", ".yml")) and not (ROOT / config).is_file() and not Path(config).is_file():
        return "tiny"
    return config


def _bench_configs(args) -> list:
    """The configs ``ray-rlhf bench`` resolves before it starts (:func:`ray_rlhf.bench.run.run_bench`)."""
    from ray_rlhf.bench.args import parse_sweep
    from ray_rlhf.bench.run import MODES, _bench_overrides

    mode = MODES["quick" if args.quick else "full"]
    config = _config_name(args.config) or mode["preset"]
    extra = _bench_overrides(Path("bench-results") / "run", mode["steps"], args.cache_dir)
    cfgs = [load_config(config, [*args.overrides, *extra])]
    sweep = parse_sweep(args.sweep)
    if sweep:
        key, values = sweep
        cfgs += [load_config(config, [*args.overrides, f"{key}={v}", *extra]) for v in values]
    return cfgs


def resolve(cmd: Command) -> list:
    """Parse ``cmd`` with the CLI's parser and resolve its config(s) (no Ray); [] for a command
    without a config."""
    from ray_rlhf.cli import build_parser, train_parser

    if cmd.program == "ray-rlhf":
        args = _parse(build_parser(), cmd)
        if args.command in ("train", "show-config"):
            return [load_config(_config_name(args.config), args.overrides)]
        if args.command == "bench":
            return _bench_configs(args)
        if args.command == "make-model":
            from ray_rlhf.models.factory import PRESETS

            assert args.preset in PRESETS, f"{cmd.where}: make-model preset {args.preset!r} (presets: {', '.join(PRESETS)})"
            return []
        if args.command == "export":
            return []  # RUN_DIR OUT_DIR: parsed above; tested in tests/integration/test_lora_learns.py
        if args.command in ("sft", "rm", "dpo"):
            from ray_rlhf.stages.command import parse_options

            parse_options(args.command, args.overrides, args.config)  # every key known, every value of its type
            return []
        raise AssertionError(f"{cmd.where}: `ray-rlhf {args.command}` is new: teach this test what it resolves")
    module = cmd.program.split()[-1]
    if module == "ray_rlhf.train":
        args = _parse(train_parser(), cmd)
        return [load_config(_config_name(args.config), args.overrides)]
    if module == "ray_rlhf.bench":
        from ray_rlhf.bench.args import build_parser as bench_parser

        return _bench_configs(_parse(bench_parser(), cmd))
    assert importlib.util.find_spec(module) is not None, f"{cmd.where}: no module {module}"
    return []


# ------------------------------------------------------------------------------------ the docs


def test_the_docs_show_commands():
    """The extraction finds what the docs hold (guards against a regex that silently finds nothing)."""
    where = {c.where.split(":")[0] for c in COMMANDS}
    assert {"README.md", "docs/bring-your-own.md", "docs/fault-tolerance.md"} <= where
    assert any(c.error for c in COMMANDS)  # the README's `ppo.bogus` example
    assert len(OVERRIDES) > 20


@pytest.mark.parametrize("cmd", COMMANDS, ids=[f"{c.where} {c.program.split()[-1]}" for c in COMMANDS])
def test_documented_command_resolves(cmd):
    if cmd.error is None:
        try:
            resolve(cmd)
        except UserError as e:
            pytest.fail(f"{cmd.where}: `{cmd.program} {shlex.join(cmd.argv)}`: {e}")
        return
    # A documented mistake: it still fails, with the message the docs print (up to its first
    # parenthesis or ellipsis, where the docs abbreviate).
    with pytest.raises(UserError) as e:
        resolve(cmd)
    head = re.split(r" \(|\.\.\.", cmd.error)[0]
    assert str(e.value).startswith(head), f"{cmd.where}: the docs print {cmd.error!r}, the CLI says {e.value}"


@pytest.mark.parametrize("where, span", OVERRIDES, ids=[f"{w} {s.split('=')[0]}" for w, s in OVERRIDES])
def test_inline_override_names_a_config_key(where, span):
    """The value may be a placeholder (``s``, ``k``, ``N``): only an unknown key fails."""
    try:
        load_config("tiny", [_fill_placeholders(span)])
    except UserError as e:
        assert "unknown config key" not in str(e) and "not a section" not in str(e), f"{where}: `{span}`: {e}"


# ----------------------------------------------------------------------- the extraction itself


SAMPLE = """
Prose with `ray-rlhf show-config --config tiny ppo.lr=1e-4` and `ray-rlhf` alone, and `data.bogus_key=1`.

```bash
$ ray-rlhf train --config my_run.yaml model.policy_path=/models/<name> \\
    'reward.functions=[{name: m:f, weight: 1.0}]'   # a comment
ray job submit --address http://HEAD:8265 -- \\
  python -m ray_rlhf.train --config <preset> [key=value ...] steps=3
ray-rlhf bench --config my_run.yaml key=value     # your run
make demo
ray_rlhf/bench/       `ray-rlhf bench`: phases, bound (a file tree, not a command)
```

```
$ ray-rlhf train --config tiny ppo.bogus=1
ray-rlhf: error: invalid config: unknown config key 'ppo.bogus' (valid keys under 'ppo': ...)
```
"""


def test_extraction_joins_lines_fills_placeholders_and_pairs_errors():
    cmds = commands_in("x.md", SAMPLE)
    assert [(c.where, c.program, c.argv, c.error) for c in cmds] == [
        ("x.md:2", "ray-rlhf", ("show-config", "--config", "tiny", "ppo.lr=1e-4"), None),
        ("x.md:5", "ray-rlhf", ("train", "--config", "my_run.yaml", "model.policy_path=/models/placeholder",
                                "reward.functions=[{name: m:f, weight: 1.0}]"), None),
        ("x.md:7", "python -m ray_rlhf.train", ("--config", "tiny", "steps=3"), None),
        ("x.md:9", "ray-rlhf", ("bench", "--config", "my_run.yaml"), None),
        ("x.md:15", "ray-rlhf", ("train", "--config", "tiny", "ppo.bogus=1"),
         "invalid config: unknown config key 'ppo.bogus' (valid keys under 'ppo': ...)"),
    ]
    for cmd in cmds:
        if cmd.error is None:
            resolve(cmd)
    assert inline_overrides_in("x.md", SAMPLE) == [("x.md:2", "data.bogus_key=1")]


@pytest.mark.parametrize("text", [
    "```\nray-rlhf train --config tiny ppo.clipp=0.2\n```",  # a renamed key in a command
    "```\npython -m ray_rlhf.train --config tiny data.pth=bundled:letters\n```",
    "`ray-rlhf bench --quick --sweep ppo.clipp=0.1,0.2`",  # a sweep over a renamed key
])
def test_a_renamed_key_breaks_a_command(text):
    (cmd,) = commands_in("x.md", text)
    with pytest.raises(UserError, match="unknown config key"):
        resolve(cmd)


def test_a_renamed_key_breaks_an_inline_override():
    ((where, span),) = inline_overrides_in("x.md", "The letters task (`data.pth=bundled:letters`).")
    with pytest.raises(AssertionError, match="unknown config key 'data.pth'"):
        test_inline_override_names_a_config_key(where, span)


def test_an_unknown_subcommand_or_option_is_refused_by_the_parser():
    for text in ("`ray-rlhf trian --config tiny`", "`ray-rlhf train --confg tiny`"):
        (cmd,) = commands_in("x.md", text)
        with pytest.raises(pytest.fail.Exception, match="parser refuses"):
            resolve(cmd)


def test_presets_named_in_the_docs_exist():
    """``--config <name>`` of a documented command is a shipped preset (or a YAML file the docs invent)."""
    for cmd in COMMANDS:
        argv = list(cmd.argv)
        if "--config" in argv:
            name = argv[argv.index("--config") + 1]
            assert name in preset_names() or name.endswith((".yaml", ".yml")), f"{cmd.where}: --config {name}"
