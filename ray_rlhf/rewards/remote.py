"""A remote reward source: POST a batch to an HTTP service (an LLM judge, a verifier) and read rewards.

Protocol (JSON over HTTP, one request per batch)::

    POST <url>            Content-Type: application/json
    {"prompts":   ["...", ...],                  # N strings
     "responses": ["...", ...],                  # N strings
     "columns":   {"answer": [...], ...}}        # each extra dataset column, N values ({} if none)

    200 OK                Content-Type: application/json
    {"rewards": [0.5, ...]}                      # N finite numbers, in request order

Other keys in the response are ignored. Any other status is a failure. Sample ``i`` of the
response scores sample ``i`` of the request.

Failures and retries. Each attempt has a ``timeout`` (seconds, per socket operation: connect, and
each read). An attempt that cannot connect, times out, loses its connection, or gets status 408, 429 or 5xx is retried
up to ``retries`` more times, waiting ``backoff * 2**k`` seconds (at most ``max_backoff``) before
retry ``k``. Any other status (a 4xx: the request is wrong) and a malformed body (not JSON, no
``rewards`` list, a wrong count, a non-number, NaN or an infinity) fail at once: retrying would
not help. Every failure is one line (a :class:`~ray_rlhf.rewards.functions.RewardError`, a
:class:`~ray_rlhf.errors.UserError`) naming the URL and what went wrong.

:meth:`RemoteReward.check_reachable` is the cheap preflight: it only opens a TCP connection to
the host and port, so an unreachable service fails before training starts. Only the standard
library is used.
"""

from __future__ import annotations

import http.client
import json
import math
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from ray_rlhf.errors import UserError
from ray_rlhf.rewards.functions import RewardError

__all__ = ["RemoteReward"]

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
"""HTTP statuses that mean "try again later" rather than "this request is wrong"."""


def _json_default(obj: Any) -> Any:
    """Encode NumPy scalars and arrays (``.tolist()``) found in dataset columns."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _excerpt(text: str, n: int = 60) -> str:
    return repr(text[:n]) + ("..." if len(text) > n else "")


class RemoteReward:
    """Scores batches by POSTing them to ``url`` (the protocol is in the module docstring).

    Args:
        url: ``http://`` or ``https://`` endpoint.
        timeout: seconds per socket operation of one attempt.
        retries: extra attempts after a connection failure, a timeout or a 408/429/5xx status.
        backoff: seconds before the first retry; doubled for each further retry.
        max_backoff: cap on one wait between attempts.
        headers: extra request headers (e.g. ``{"Authorization": "Bearer ..."}``); never logged.
    """

    def __init__(self, url: str, timeout: float = 30.0, retries: int = 2, backoff: float = 0.5,
                 max_backoff: float = 8.0, headers: Mapping[str, str] | None = None):
        parsed = urllib.parse.urlsplit(url) if isinstance(url, str) else None
        if parsed is None or parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise UserError(f"remote reward URL {url!r} is not an http(s) URL; write it as "
                            "'http://host:port/path'")
        try:
            port = parsed.port
        except ValueError:
            raise UserError(f"remote reward URL {url!r} has a bad port; write it as 'http://host:port/path'") from None
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise UserError(f"remote reward {url}: timeout is {timeout!r}; give a positive number of seconds")
        if not (isinstance(retries, int) and retries >= 0):
            raise UserError(f"remote reward {url}: retries is {retries!r}; give a non-negative integer")
        if not (isinstance(backoff, (int, float)) and backoff >= 0):
            raise UserError(f"remote reward {url}: backoff is {backoff!r}; give a non-negative number of seconds")
        self.url = url
        self.host = parsed.hostname
        self.port = port or (443 if parsed.scheme == "https" else 80)
        self.timeout = float(timeout)
        self.retries = retries
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self._headers = {"Content-Type": "application/json", "Accept": "application/json", **(headers or {})}
        self.spec = url
        """Source name for messages and ``reward_parts`` keys, as :attr:`RewardFn.spec`."""

    def __repr__(self) -> str:
        return f"RemoteReward({self.url!r}, timeout={self.timeout}, retries={self.retries})"

    # -- public API ---------------------------------------------------------------------------

    def check_reachable(self, timeout: float = 3.0) -> None:
        """Open (and close) a TCP connection to the URL's host and port; no request is sent.

        Raises :class:`UserError` naming the URL when the host does not resolve or nothing listens.
        """
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout):
                pass
        except OSError as exc:
            raise UserError(f"remote reward {self.url} is unreachable: cannot connect to {self.host}:{self.port} "
                            f"({exc.strerror or exc}); start the service or fix the URL") from None

    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 columns: Mapping[str, Sequence[Any]] | None = None,
                 where: Sequence[str] | None = None) -> list[float]:
        """One finite float per sample, from one POST (plus retries).

        ``columns`` maps each extra dataset column to one value per sample; ``where`` is accepted
        for the same call signature as :class:`~ray_rlhf.rewards.functions.RewardFn` and unused.
        Raises :class:`RewardError` (one line naming the URL) on any failure.
        """
        n = len(prompts)
        if len(responses) != n:
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if n == 0:
            return []
        columns = {name: list(values) for name, values in (columns or {}).items()}
        for name, values in columns.items():
            if len(values) != n:
                raise ValueError(f"column {name!r} has {len(values)} values for a batch of {n}")
        try:
            body = json.dumps({"prompts": list(prompts), "responses": list(responses), "columns": columns},
                              default=_json_default).encode()
        except (TypeError, ValueError) as exc:
            raise self._error(f"cannot encode the batch as JSON ({exc}); make the dataset columns plain "
                              "strings, numbers or lists") from None
        return self._parse(self._post(body), n)

    # -- internals ----------------------------------------------------------------------------

    def _error(self, what: str) -> RewardError:
        return RewardError(f"remote reward {self.url}: {what}", self.url)

    def _post(self, body: bytes) -> bytes:
        """The response body of the first successful attempt; RewardError once retries are spent."""
        attempts = self.retries + 1
        last = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), self.max_backoff))
            request = urllib.request.Request(self.url, data=body, headers=self._headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as exc:
                try:
                    detail = exc.read(200).decode("utf-8", "replace")
                except OSError:
                    detail = ""
                last = f"HTTP {exc.code} {exc.reason}" + (f" ({_excerpt(detail)})" if detail.strip() else "")
                if exc.code not in RETRY_STATUSES:
                    raise self._error(f"{last}; check the service's log and the request protocol "
                                      '{"prompts", "responses", "columns"}') from None
            except TimeoutError:  # socket.timeout is TimeoutError
                last = f"no response within the {self.timeout:g}s timeout"
            except urllib.error.URLError as exc:
                reason = exc.reason
                if isinstance(reason, TimeoutError):
                    last = f"no response within the {self.timeout:g}s timeout"
                else:
                    last = f"cannot connect ({getattr(reason, 'strerror', None) or reason})"
            except (ConnectionError, http.client.HTTPException) as exc:  # reset, or a truncated response
                last = f"connection failed ({type(exc).__name__}: {exc})"
        tries = f"{attempts} attempts" if attempts > 1 else "1 attempt"
        raise self._error(f"{last} after {tries}; check that the service is up, or raise the timeout/retries")

    def _parse(self, raw: bytes, n: int) -> list[float]:
        try:
            payload = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise self._error(f"response is not JSON ({_excerpt(raw.decode('utf-8', 'replace'))}); it must be "
                              '{"rewards": [float, ...]}') from None
        rewards = payload.get("rewards") if isinstance(payload, dict) else None
        if not isinstance(rewards, list):
            raise self._error(f"response has no 'rewards' list ({_excerpt(raw.decode('utf-8', 'replace'))}); it "
                              'must be {"rewards": [float, ...]}')
        if len(rewards) != n:
            raise self._error(f"response has {len(rewards)} rewards for a batch of {n} samples; it must return "
                              "one per sample, in request order")
        out: list[float] = []
        for i, value in enumerate(rewards):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise self._error(f"reward {i} of the response is {repr(value)[:30]}; every reward must be "
                                  "a finite number")
            out.append(float(value))
        return out
