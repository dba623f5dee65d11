"""Prompt data: load a prompt file, and draw batches of prompts epoch by epoch, resumably.

:func:`load_prompts` reads one string column of a Parquet or JSON Lines file with pyarrow and
checks it (every problem is a one-line :class:`~ray_rlhf.errors.UserError` naming the file and
the fix). :class:`PromptStream` walks the prompts in a fresh seeded permutation each epoch; its
cursor (epoch, position) is all the state a checkpoint needs to resume the exact same sequence.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import pyarrow as pa

from ray_rlhf.errors import UserError
from ray_rlhf.records import PromptItem

PARQUET_SUFFIXES = (".parquet",)
JSONL_SUFFIXES = (".jsonl", ".json")


def bundled_prompts_path() -> Path:
    """The bundled prompt set (Parquet, column ``prompt``), made by ``python -m ray_rlhf.data.make_prompts``."""
    return Path(str(resources.files("ray_rlhf.data") / "bundled" / "prompts.parquet"))


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
            return pq.read_table(path, columns=[column])
        table = pj.read_json(path)
        if table.num_rows == 0:  # only blank lines
            raise UserError(f"prompt file {path} contains no prompts; add one JSON object per line")
    except (pa.ArrowException, OSError) as e:
        kind = "Parquet" if suffix in PARQUET_SUFFIXES else "JSON Lines (one JSON object per line)"
        detail = " ".join(str(e).split())[:200]
        raise UserError(f"prompt file {path} is not valid {kind}: {detail}; fix or regenerate the file") from None
    if column not in table.column_names:
        _missing_column(path, column, table.column_names)
    return table.select([column])


def _missing_column(path: Path, column: str, names: list[str]) -> None:
    available = ", ".join(repr(n) for n in names) or "none"
    raise UserError(
        f"prompt file {path} has no column {column!r} (available columns: {available}); "
        "set data.prompt_column to the column holding the prompt text"
    )


def load_prompts(path, column: str = "prompt") -> list[str]:
    """The prompts in column ``column`` of a Parquet (``.parquet``) or JSON Lines (``.jsonl``/``.json``) file.

    Raises :class:`UserError` (one line naming the file and the fix) when the file is missing,
    has another extension, can't be parsed, lacks the column, holds no rows, or holds a value that
    is not a non-empty string.
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

    col = _read_table(path, column).column(column)
    if len(col) == 0:
        raise UserError(f"prompt file {path} contains no prompts; add rows to column {column!r}")
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_null(col.type)):
        raise UserError(
            f"column {column!r} of prompt file {path} has type {col.type}, not string; "
            "store each prompt as text"
        )
    prompts = col.to_pylist()
    for i, p in enumerate(prompts):
        if p is None:
            raise UserError(f"prompt file {path}: row {i} of column {column!r} is null; remove it or give it text")
        if not p.strip():
            raise UserError(f"prompt file {path}: row {i} of column {column!r} is an empty prompt; remove it or give it text")
    return prompts


def tokenize_prompts(prompts: list[str], tokenizer, max_prompt_tokens: int, source: str = "the dataset") -> list[PromptItem]:
    """Tokenize every prompt once (special tokens included, as the engine and the learner see
    them) and check its length: the one prompt-length check of a run.

    Raises :class:`UserError` naming the longest prompt when one exceeds ``max_prompt_tokens``, or
    an empty one.
    """
    ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
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
    return [PromptItem(index=i, text=t, prompt_ids=tuple(int(v) for v in x)) for i, (t, x) in enumerate(zip(prompts, ids))]


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
