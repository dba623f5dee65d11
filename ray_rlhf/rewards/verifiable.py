"""Verifiable rewards: the dataset row says what a correct response is, the function checks it.

Both are per-sample reward functions (``kind: sample``) that read a dataset column as a keyword
argument (see :mod:`ray_rlhf.rewards.functions`). Refer to one in the config as
``ray_rlhf.rewards.verifiable:<name>``.

============================  =========================================================  =======
function                      rewards                                                    range
============================  =========================================================  =======
``target_letter_frequency``   fraction of the response's characters equal to the row's   [0, 1]
                              ``letter`` column (case-insensitive)
``exact_answer``              the response's last number equals the row's ``answer``     {0, 1}
                              column (GSM8K style)
============================  =========================================================  =======

:func:`target_letter_frequency` with the bundled ``letters_chat.parquet`` (made by
``python -m ray_rlhf.data.make_letters``) is a task a tiny random-init policy can learn on CPU:
the reward is dense (every character counts) and not saturated at the start, as for
:func:`ray_rlhf.rewards.rules.letter_frequency`, but the target letter changes from prompt to
prompt, so the policy has to read the prompt to score well. :func:`exact_answer` is the classic
sparse math reward (1 for the right final number, else 0), for GSM8K-like data with an ``answer``
column; a tiny model will not learn it.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

__all__ = ["target_letter_frequency", "exact_answer", "last_number"]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def target_letter_frequency(prompt: str, response: str, letter: str) -> float:
    """Fraction of the response's characters that are the row's ``letter`` (case-insensitive).

    ``reward = count(letter) / len(response)``; spaces and punctuation count in the denominator.
    Range [0, 1]; an empty response scores 0. The prompt is ignored. Raises ``ValueError`` unless
    ``letter`` is a one-character string.
    """
    if not isinstance(letter, str) or len(letter) != 1:
        raise ValueError(f"the letter column must hold one character, got {letter!r}")
    if not response:
        return 0.0
    return response.lower().count(letter.lower()) / len(response)


def last_number(text: str) -> Decimal | None:
    """The last number written in ``text`` (``-3``, ``1,234``, ``0.5``), as a Decimal; None if none.

    Thousands separators are dropped; a trailing sentence period is not part of the number.
    """
    for match in reversed(_NUMBER.findall(text)):
        try:
            return Decimal(match.replace(",", ""))
        except InvalidOperation:  # e.g. "1,,": keep looking further left
            continue
    return None


def exact_answer(prompt: str, response: str, answer) -> float:
    """1.0 if the last number in the response equals the row's ``answer``, else 0.0.

    ``answer`` is a number, or text whose final number is the answer: a GSM8K solution
    ``"... #### 72"`` works as is (the part after ``####`` is used). Numbers compare by value, so
    ``72``, ``72.0`` and ``72.00`` match. A response without a number scores 0. Raises
    ``ValueError`` if ``answer`` holds no number.
    """
    text = str(answer)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    target = last_number(text)
    if target is None:
        raise ValueError(f"the answer column holds no number: {str(answer)[:40]!r}")
    got = last_number(response)
    return 1.0 if got is not None and got == target else 0.0
