"""Prompt data: load a prompt file, tokenize it once, and draw batches epoch by epoch, resumably.

:func:`load_prompt_table` reads a Parquet or JSON Lines file with pyarrow: the prompt column --
text, or chat messages (a list of ``{role, content}``) -- and every other column of the row (an
``answer``, a ``data_source``...), which travels with the prompt to the reward functions and the
rollout log. Every problem is a one-line :class:`~ray_rlhf.errors.UserError` naming the file, the
row and the fix. :func:`tokenize_prompts` applies the chat template and tokenizes every prompt
once (the one prompt-length check of a run). :class:`PromptStream` walks the prompts in a fresh
seeded permutation each epoch; its cursor (epoch, position) is all the state a checkpoint needs
to resume the exact same sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ray_rlhf.errors import UserError
from ray_rlhf.records import PromptItem

PARQUET_SUFFIXES = (".parquet",)
JSONL_SUFFIXES = (".jsonl", ".json")
CHAT_TEMPLATE_MODES = ("auto", "always", "never")

Messages = list[dict[str, str]]
"""A chat prompt: ``[{"role": "system" | "user" | "assistant", "content": str}, ...]``."""


def bundled_prompts_path() -> Path:
    """The bundled prompt set (Parquet, column ``prompt``), made by ``python -m ray_rlhf.data.make_prompts``."""
    return Path(str(resources.files("ray_rlhf.data") / "bundled" / "prompts.parquet"))


def bundled_letters_path() -> Path:
    """The bundled verifiable-reward chat set (``messages``, ``letter``, ``data_source``), made by
    ``python -m ray_rlhf.data.make_letters``."""
    return Path(str(resources.files("ray_rlhf.data") / "bundled" / "letters_chat.parquet"))


def bundled_path(name: str) -> Path:
    """``bundled:prompts`` / ``bundled:letters`` in ``data.prompts_path``."""
    paths = {"prompts": bundled_prompts_path, "letters": bundled_letters_path}
    if name not in paths:
        raise UserError(f"data.prompts_path=bundled:{name} names no bundled dataset (bundled: {', '.join(paths)})")
    return paths[name]()


def _read_table(path: Path, column: str) -> pa.Table:
    """The file as an Arrow table holding ``column``; UserError if it can't be read or lacks it."""
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    suffix = path.suffix.lower()
    try:
        if suffix in PARQUET_SUFFIXES:
            names = pq.read_schema(path).names
            if column not in names:
                _missing_column(path, column, names)
            return pq.read_table(path)
        table = pj.read_json(path)
        if table.num_rows == 0:  # only blank lines
            raise UserError(f"prompt file {path} contains no prompts; add one JSON object per line")
    except (pa.ArrowException, OSError) as e:
        kind = "Parquet" if suffix in PARQUET_SUFFIXES else "JSON Lines (one JSON object per line)"
        detail = " ".join(str(e).split())[:200]
        raise UserError(f"prompt file {path} is not valid {kind}: {detail}; fix or regenerate the file") from None
    if column not in table.column_names:
        _missing_column(path, column, table.column_names)
    return table


def _missing_column(path: Path, column: str, names: list[str]) -> None:
    available = ", ".join(repr(n) for n in names) or "none"
    raise UserError(
        f"prompt file {path} has no column {column!r} (available columns: {available}); "
        "set data.prompt_column to the column holding the prompt text or chat messages"
    )


def _to_pylist(path: Path, table: pa.Table, name: str) -> list:
    """Column ``name`` as Python values; a :class:`UserError` naming the line (JSON Lines) or row
    (Parquet) when a text value is not valid UTF-8 (neither reader checks it; decoding does)."""
    col = table.column(name)
    try:
        return col.to_pylist()
    except UnicodeDecodeError:
        pass
    row, err = next(_decode_errors(col))
    byte = f"byte 0x{err.object[err.start]:02x}"
    if path.suffix.lower() in PARQUET_SUFFIXES:
        raise UserError(f"prompt file {path}: row {row} of column {name!r} is not valid UTF-8 ({byte}); "
                        "write the text as UTF-8 (decode the bytes before saving the file)")
    raise UserError(f"prompt file {path}: line {_jsonl_line(path, row)} (column {name!r}) is not valid UTF-8 "
                    f"({byte}); re-encode the file as UTF-8 (e.g. iconv -f <its encoding> -t UTF-8) or fix that line")


def _decode_errors(col: pa.ChunkedArray):
    """``(row, UnicodeDecodeError)`` for each row of ``col`` that does not decode (slow: error path only)."""
    for i in range(len(col)):
        try:
            col[i].as_py()
        except UnicodeDecodeError as e:
            yield i, e


def _jsonl_line(path: Path, row: int) -> int:
    """The 1-based line of JSON Lines row ``row`` (0-based): the reader skips blank lines."""
    seen = -1
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            seen += bool(line.strip())
            if seen == row:
                return number
    raise AssertionError(f"{path} has no row {row}")


def _check_messages(path: Path, column: str, i: int, cell: Any) -> Messages:
    fix = ("each cell must be a non-empty list of {role, content} objects with string values, e.g. "
           "[{role: user, content: 'Hi'}]")
    if not isinstance(cell, list) or not cell:
        raise UserError(f"prompt file {path}: row {i} of column {column!r} is {type(cell).__name__} "
                        f"{str(cell)[:40]!r}, not a list of chat messages; {fix}")
    for m in cell:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(f"prompt file {path}: row {i} of column {column!r} holds the message {str(m)[:60]!r}, "
                            f"not a {{role, content}} object; {fix}")
    return [{"role": m["role"], "content": m["content"]} for m in cell]


@dataclass
class PromptTable:
    """A prompt file's rows: the prompts and every other column."""

    prompts: list[str | Messages]
    """Text, or chat messages, per row."""
    columns: dict[str, list]
    """Every other column of the file, one value per row."""
    path: str


def load_prompt_table(path, column: str = "prompt") -> PromptTable:
    """The prompt column (text or chat messages) and every other column of a Parquet
    (``.parquet``) or JSON Lines (``.jsonl``/``.json``) file.

    Raises :class:`UserError` (one line naming the file and the fix) when the file is missing,
    has another extension, can't be parsed, lacks the column, holds no rows, holds text that is
    not valid UTF-8 (naming the line of a JSON Lines file, the row of a Parquet file), or holds a
    prompt that is not non-empty text or a list of ``{role, content}`` messages.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompt file {path} does not exist; set data.prompts_path to an existing Parquet or JSONL file")
    suffix = path.suffix.lower()
    if suffix not in PARQUET_SUFFIXES + JSONL_SUFFIXES:
        raise UserError(
            f"prompt file {path} has unknown extension {path.suffix!r}; "
            "use a .parquet or .jsonl (JSON Lines) file"
        )
    if path.stat().st_size == 0:
        raise UserError(f"prompt file {path} is empty; add prompts (one row per prompt) or use another file")

    table = _read_table(path, column)
    col = table.column(column)
    if len(col) == 0:
        raise UserError(f"prompt file {path} contains no prompts; add rows to column {column!r}")
    is_text = pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_null(col.type)
    is_list = pa.types.is_list(col.type) or pa.types.is_large_list(col.type)
    if not (is_text or is_list):
        raise UserError(
            f"column {column!r} of prompt file {path} has type {col.type}, neither text nor a list of chat "
            "messages; store each prompt as text or as [{role, content}, ...]"
        )
    prompts: list[str | Messages] = []
    for i, p in enumerate(_to_pylist(path, table, column)):
        if p is None:
            raise UserError(f"prompt file {path}: row {i} of column {column!r} is null; remove it or give it text")
        if is_list:
            prompts.append(_check_messages(path, column, i, p))
        elif not p.strip():
            raise UserError(f"prompt file {path}: row {i} of column {column!r} is an empty prompt; remove it or give it text")
        else:
            prompts.append(p)
    columns = {name: _to_pylist(path, table, name) for name in table.column_names if name != column}
    return PromptTable(prompts, columns, str(path))


def load_prompts(path, column: str = "prompt") -> list[str | Messages]:
    """The prompt column of a prompt file (see :func:`load_prompt_table`)."""
    return load_prompt_table(path, column).prompts


def render_prompt(prompt: str | Messages, tokenizer, mode: str = "auto", system_prompt: str | None = None,
                  tools: list[dict] | None = None) -> tuple[str, bool]:
    """The text the model reads for one prompt, and whether it was templated (its special tokens
    are then in the text already).

    ``mode``: ``auto`` applies the tokenizer's chat template (with ``add_generation_prompt``) to
    message lists and leaves text as it is; ``always`` also wraps text as one user message;
    ``never`` refuses message lists. ``system_prompt`` is put first in every templated prompt that
    does not start with a system message. ``tools``: JSON schemas of the environment's tools, passed
    to the template as ``tools=`` (a chat model's template lists them, e.g. in its system message).
    """
    if isinstance(prompt, str) and mode != "always":
        return prompt, False
    if mode == "never":
        raise UserError("the prompt file holds chat messages but data.chat_template=never; set data.chat_template=auto")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    kwargs = {"tools": list(tools)} if tools else {}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs), True


def tokenize_prompts(prompts: list[str | Messages], tokenizer, max_prompt_tokens: int, source: str = "the dataset",
                     columns: dict[str, list] | None = None, chat_template: str = "auto",
                     system_prompt: str | None = None, tools: list[dict] | None = None) -> list[PromptItem]:
    """Render (chat template) and tokenize every prompt once -- as the engine and the learner see
    it -- and check its length: the one prompt-length check of a run. ``tools``: the environment's
    tool schemas, passed to the chat template (:func:`render_prompt`).

    Raises :class:`UserError` naming the longest prompt when one exceeds ``max_prompt_tokens``, an
    empty one, or chat messages for a tokenizer without a chat template.
    """
    if chat_template not in CHAT_TEMPLATE_MODES:
        raise UserError(f"data.chat_template={chat_template!r}; use one of {', '.join(CHAT_TEMPLATE_MODES)}")
    wants_template = chat_template == "always" or any(not isinstance(p, str) for p in prompts)
    if wants_template and chat_template != "never" and not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"{source} needs a chat template (chat messages or data.chat_template=always) but the model's tokenizer "
            f"({getattr(tokenizer, 'name_or_path', '?')}) has none; use an instruct model with a chat template, or "
            "give plain-text prompts with data.chat_template=auto"
        )
    rendered = [render_prompt(p, tokenizer, chat_template, system_prompt, tools) for p in prompts]
    ids = [tokenizer(text, add_special_tokens=not templated)["input_ids"] for text, templated in rendered]
    lengths = [len(x) for x in ids]
    worst = max(range(len(prompts)), key=lengths.__getitem__)
    if lengths[worst] > max_prompt_tokens:
        n_over = sum(n > max_prompt_tokens for n in lengths)
        raise UserError(
            f"prompt {worst} of {source} is {lengths[worst]} tokens, longer than data.max_prompt_tokens="
            f"{max_prompt_tokens} ({n_over} prompts too long); raise data.max_prompt_tokens "
            f"(and generators.max_model_len) or shorten the prompts"
        )
    empty = next((i for i, n in enumerate(lengths) if n == 0), None)
    if empty is not None:
        raise UserError(f"prompt {empty} of {source} is empty after tokenization; drop it from the dataset")
    columns = columns or {}
    return [PromptItem(index=i, text=text, prompt_ids=tuple(int(v) for v in x),
                       columns={k: v[i] for k, v in columns.items()})
            for i, ((text, _), x) in enumerate(zip(rendered, ids))]


class PromptStream:
    """An endless, deterministic stream of prompts: a fresh shuffle every epoch.

    Epoch ``e`` visits the prompts in the order ``permutation(len(prompts))`` drawn from a numpy
    generator seeded with ``(seed, e)``, so any epoch's order can be recomputed without replaying
    the earlier ones. :meth:`next_batch` crosses epoch boundaries seamlessly. The cursor
    (:meth:`state_dict`) is ``{"epoch": e, "position": i}``: the next prompt is item ``i`` of epoch
    ``e``'s permutation. A stream restored with :meth:`load_state_dict` yields exactly what the
    uninterrupted stream would have.
    """

    def __init__(self, prompts: list[PromptItem] | list[str], seed: int):
        if len(prompts) == 0:
            raise UserError("the prompt set is empty; give at least one prompt")
        self._prompts = [p if isinstance(p, PromptItem) else PromptItem(index=i, text=p) for i, p in enumerate(prompts)]
        self._seed = int(seed)
        self._epoch = 0
        self._position = 0
        self._order_epoch = -1
        self._order: np.ndarray | None = None

    def __len__(self) -> int:
        """Prompts per epoch."""
        return len(self._prompts)

    @property
    def epoch(self) -> int:
        """Epoch of the next prompt (0-based)."""
        return self._epoch

    def epoch_order(self, epoch: int) -> list[int]:
        """Dataset indices in the order epoch ``epoch`` visits them."""
        return self._order_for(epoch).tolist()

    def _order_for(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            rng = np.random.default_rng([self._seed, epoch])
            self._order = rng.permutation(len(self._prompts))
            self._order_epoch = epoch
        return self._order

    def next_batch(self, n: int) -> list[PromptItem]:
        """The next ``n`` prompts (continuing into the next epoch's shuffle when this one ends)."""
        if n <= 0:
            raise ValueError(f"batch size must be positive, got {n}")
        items: list[PromptItem] = []
        while len(items) < n:
            order = self._order_for(self._epoch)
            take = min(n - len(items), len(order) - self._position)
            items.extend(self._prompts[int(idx)] for idx in order[self._position : self._position + take])
            self._position += take
            if self._position == len(order):
                self._epoch += 1
                self._position = 0
        return items

    def state_dict(self) -> dict[str, int]:
        """The cursor: ``{"epoch": int, "position": int}``."""
        return {"epoch": self._epoch, "position": self._position}

    def load_state_dict(self, state: dict) -> None:
        """Move the cursor to a saved :meth:`state_dict` (same prompts and seed assumed)."""
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"bad prompt-stream state {state!r}: expected {{'epoch': int, 'position': int}}") from None
        if epoch < 0 or not 0 <= position < len(self._prompts):
            raise UserError(
                f"prompt-stream state {state!r} does not fit a set of {len(self._prompts)} prompts; "
                "resume with the prompt file the checkpoint was made with"
            )
        self._epoch, self._position = epoch, position
