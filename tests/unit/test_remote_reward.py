"""The remote reward source against small local HTTP servers: scoring, timeout, retry, garbage, unreachable."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ray_rlhf.errors import UserError
from ray_rlhf.rewards.functions import RewardError
from ray_rlhf.rewards.remote import RemoteReward


class Service:
    """A scoring service on 127.0.0.1 (free port, own thread). ``mode`` picks its behaviour:

    ``score``: reward = count of the row's ``letter`` in the response; ``slow``: sleeps ``delay``
    seconds first; ``flaky``: HTTP 500 on the first request, then scores; ``garbage``: a 200 with
    a non-JSON body; ``json`` replies with ``body`` as given; ``status``: replies with ``status``.
    """

    def __init__(self, mode: str, delay: float = 0.0, body: object = None, status: int = 200):
        self.mode, self.delay, self.body, self.status = mode, delay, body, status
        self.requests: list[dict] = []
        self.stop = threading.Event()
        service = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                service.requests.append(payload)
                try:
                    service.respond(self, payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/score"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)

    def respond(self, handler, payload):
        if self.mode == "slow":
            self.stop.wait(self.delay)
        if self.mode == "flaky" and len(self.requests) == 1:
            return self.send(handler, 500, b"warming up")
        if self.mode == "garbage":
            return self.send(handler, 200, b"<html>not json</html>")
        if self.mode == "json":
            return self.send(handler, 200, json.dumps(self.body).encode())
        if self.mode == "status":
            return self.send(handler, self.status, b"bad request: no prompts")
        rewards = [float(r.count(letter)) for r, letter in zip(payload["responses"], payload["columns"]["letter"])]
        self.send(handler, 200, json.dumps({"rewards": rewards, "model": "counter"}).encode())

    @staticmethod
    def send(handler, status: int, body: bytes):
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg
    return msg


PROMPTS = ["Write with many e's.", "Write with many a's."]
RESPONSES = ["eee e", "banana"]
COLUMNS = {"letter": ["e", "a"], "data_source": ["letters", "letters"]}


def test_scores_a_batch_and_sends_the_protocol():
    with Service("score") as service:
        remote = RemoteReward(service.url, timeout=5)
        remote.check_reachable()
        assert remote(PROMPTS, RESPONSES, COLUMNS) == [4.0, 3.0]  # 4 e's; 3 a's
        assert remote([], [], {}) == []  # no request for an empty batch
    assert service.requests == [{"prompts": PROMPTS, "responses": RESPONSES, "columns": COLUMNS}]


def test_numpy_column_values_are_sent_as_json():
    np = pytest.importorskip("numpy")
    with Service("score") as service:
        out = RemoteReward(service.url)(["p"], ["ee"], {"letter": np.array(["e"]), "n": [np.int64(3)]})
    assert out == [2.0] and service.requests[0]["columns"]["n"] == [3]


def test_timeout_after_retries():
    with Service("slow", delay=5.0) as service:
        remote = RemoteReward(service.url, timeout=0.2, retries=1, backoff=0.05)
        t0 = time.perf_counter()
        with pytest.raises(RewardError) as info:
            remote(PROMPTS, RESPONSES, COLUMNS)
        elapsed = time.perf_counter() - t0
    msg = one_line(info.value)
    assert msg.startswith(f"remote reward {service.url}: no response within the 0.2s timeout after 2 attempts")
    assert len(service.requests) == 2 and elapsed < 2.0


def test_500_then_success_is_retried():
    with Service("flaky") as service:
        out = RemoteReward(service.url, timeout=5, retries=2, backoff=0.01)(PROMPTS, RESPONSES, COLUMNS)
    assert out == [4.0, 3.0] and len(service.requests) == 2


def test_500_every_time_fails_after_retries():
    with Service("status", status=503) as service:
        with pytest.raises(RewardError, match="HTTP 503 .* after 3 attempts"):
            RemoteReward(service.url, retries=2, backoff=0.01)(PROMPTS, RESPONSES, COLUMNS)
    assert len(service.requests) == 3


def test_4xx_is_not_retried():
    with Service("status", status=400) as service:
        with pytest.raises(RewardError) as info:
            RemoteReward(service.url, retries=3, backoff=0.01)(PROMPTS, RESPONSES, COLUMNS)
    assert f"remote reward {service.url}: HTTP 400 Bad Request ('bad request: no prompts')" in one_line(info.value)
    assert len(service.requests) == 1


def test_garbage_response():
    with Service("garbage") as service:
        with pytest.raises(RewardError) as info:
            RemoteReward(service.url, retries=3)(PROMPTS, RESPONSES, COLUMNS)
    msg = one_line(info.value)
    assert msg.startswith(f"remote reward {service.url}: response is not JSON ('<html>not json</html>')")
    assert len(service.requests) == 1  # a malformed body is not retried
    assert isinstance(info.value, UserError) and info.value.source == service.url


@pytest.mark.parametrize("body, fragment", [
    ({"scores": [1, 2]}, "response has no 'rewards' list"),
    ([1.0, 2.0], "response has no 'rewards' list"),
    ({"rewards": [1.0]}, "response has 1 rewards for a batch of 2 samples"),
    ({"rewards": [1.0, "2"]}, "reward 1 of the response is '2'"),
    ({"rewards": [float("nan"), 1.0]}, "reward 0 of the response is nan"),  # json.dumps writes NaN
    ({"rewards": [True, 1.0]}, "reward 0 of the response is True"),
])
def test_malformed_rewards(body, fragment):
    with Service("json", body=body) as service:
        with pytest.raises(RewardError) as info:
            RemoteReward(service.url)(PROMPTS, RESPONSES, COLUMNS)
    assert fragment in one_line(info.value)


def test_unreachable_url_fails_fast_with_one_line():
    url = f"http://127.0.0.1:{closed_port()}/score"
    remote = RemoteReward(url, timeout=1, retries=2, backoff=0.01)
    t0 = time.perf_counter()
    with pytest.raises(UserError) as info:
        remote.check_reachable(timeout=1)
    assert one_line(info.value).startswith(f"remote reward {url} is unreachable: cannot connect to 127.0.0.1:")
    with pytest.raises(RewardError) as info:
        remote(PROMPTS, RESPONSES, COLUMNS)
    msg = one_line(info.value)
    assert msg.startswith(f"remote reward {url}: cannot connect (") and "after 3 attempts" in msg
    assert time.perf_counter() - t0 < 2.0


@pytest.mark.parametrize("url, kwargs, fragment", [
    ("ftp://host/x", {}, "is not an http(s) URL"),
    ("localhost:8000", {}, "is not an http(s) URL"),
    ("http://host:99999/x", {}, "has a bad port"),
    ("http://host/x", {"timeout": 0}, "timeout is 0"),
    ("http://host/x", {"retries": -1}, "retries is -1"),
])
def test_bad_settings(url, kwargs, fragment):
    with pytest.raises(UserError) as info:
        RemoteReward(url, **kwargs)
    assert fragment in one_line(info.value)
