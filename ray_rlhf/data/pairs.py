"""SFT and preference data: load and check the rows (padding into a batch:
:func:`ray_rlhf.learning.batch.pad_batch`).

SFT rows: ``prompt`` + ``response`` (text), or ``messages`` (a chat whose last message is the
assistant's answer: the prompt is every message before it). Preference rows: ``prompt``,
``chosen``, ``rejected`` -- each text or a list of chat messages -- and an optional numeric
``margin``. Files are JSON Lines or Parquet, read with pyarrow. Every problem is a one-line
:class:`~ray_rlhf.errors.UserError` naming the file, the row and the fix, raised before training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from ray_rlhf.data.prompts import PARQUET_SUFFIXES, Messages
from ray_rlhf.errors import UserError


def read_rows(path) -> list[dict[str, Any]]:
    """Every row of a JSON Lines or Parquet file as a dict."""
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file {path} does not exist; set data.path to a JSON Lines or Parquet file")
    try:
        table = pq.read_table(path) if path.suffix.lower() in PARQUET_SUFFIXES else pj.read_json(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"data file {path} is not valid JSON Lines or Parquet: {' '.join(str(e).split())[:200]}") from None
    if table.num_rows == 0:
        raise UserError(f"data file {path} contains no rows; add one JSON object per line")
    return table.to_pylist()


@dataclass(frozen=True)
class SFTExample:
    prompt: str | Messages
    response: str


@dataclass(frozen=True)
class PreferenceExample:
    prompt: str | Messages
    chosen: str
    rejected: str
    margin: float = 0.0


def _text(path, i: int, column: str, cell: Any) -> str:
    """A completion: text, or a list of messages whose last is the assistant's (its content)."""
    if isinstance(cell, str) and cell:
        return cell
    if isinstance(cell, list) and cell and isinstance(cell[-1], dict) and isinstance(cell[-1].get("content"), str):
        return cell[-1]["content"]
    raise UserError(f"data file {path}: row {i} has no usable {column!r} (got {str(cell)[:40]!r}); "
                    f"give {column!r} as non-empty text or a list of chat messages ending with the answer")


def load_sft(path) -> list[SFTExample]:
    """SFT examples from ``prompt`` + ``response`` or ``messages`` rows."""
    out = []
    for i, row in enumerate(read_rows(path)):
        if row.get("messages"):
            msgs = row["messages"]
            if not isinstance(msgs, list) or len(msgs) < 2 or msgs[-1].get("role") != "assistant":
                raise UserError(f"data file {path}: row {i} 'messages' does not end with an assistant message "
                                "(the response to train on); add it or use prompt + response columns")
            out.append(SFTExample([{"role": m["role"], "content": m["content"]} for m in msgs[:-1]],
                                  _text(path, i, "response", msgs[-1]["content"])))
            continue
        if row.get("prompt") is None:
            raise UserError(f"data file {path}: row {i} has neither 'messages' nor 'prompt'; SFT rows need "
                            "prompt + response, or messages")
        if not row.get("response"):
            raise UserError(f"data file {path}: SFT row {i} has no 'response'; every SFT row needs the answer to "
                            "train on (a 'response' column, or 'messages' ending with an assistant message)")
        out.append(SFTExample(row["prompt"], _text(path, i, "response", row["response"])))
    return out


def load_preferences(path) -> list[PreferenceExample]:
    """Preference pairs from ``prompt``, ``chosen``, ``rejected`` (+ optional ``margin``) rows."""
    out = []
    for i, row in enumerate(read_rows(path)):
        for col in ("prompt", "chosen", "rejected"):
            if row.get(col) is None:
                raise UserError(f"data file {path}: preference row {i} has no {col!r}; every row needs "
                                "prompt, chosen and rejected")
        margin = row.get("margin")
        if margin is not None and not isinstance(margin, (int, float)):
            raise UserError(f"data file {path}: row {i} 'margin' is {margin!r}, not a number")
        out.append(PreferenceExample(row["prompt"], _text(path, i, "chosen", row["chosen"]),
                                     _text(path, i, "rejected", row["rejected"]), float(margin or 0.0)))
    if all(p.chosen == p.rejected for p in out):
        raise UserError(f"data file {path}: chosen equals rejected in every row; there is no preference to learn "
                        "(check the chosen and rejected columns)")
    return out
