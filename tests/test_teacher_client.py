"""TeacherClient against a real fault-injecting HTTP server on 127.0.0.1 (aiohttp in a thread).

The fault server answers like SGLang's prefill-only /generate, and can be scripted per request to fail in
every way the client must handle: 5xx bursts, slow answers, connection resets, malformed or wrong answers,
each error envelope. Nothing wrong may silently become log-probs.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from aiohttp import web
from loopback import LoopbackApp

from slime_xvocab import teacher_client
from slime_xvocab.errors import (
    SampleError,
    TeacherBadResponse,
    TeacherRequestRejected,
    TeacherTimeout,
    TeacherUnavailable,
)
from slime_xvocab.teacher_client import (
    RetryPolicy,
    SyncTeacherClient,
    TeacherClient,
    build_request,
    normalize_url,
    parse_error_message,
)


def fake_lp(token: int, pos: int) -> float:
    """The fault server's (deterministic) log-prob of ``token`` at position ``pos``."""
    return -(1.0 + (token % 7) * 0.1 + pos * 0.001)


def expected_lps(ids: list[int], response_start: int) -> np.ndarray:
    return np.array([fake_lp(t, k) for k, t in enumerate(ids)][response_start:], dtype=np.float32)


def _answer(ids: list[int], start: int, top_k: int, action: str) -> dict:
    L = len(ids)
    itl = [[None, ids[start], None]] + [[fake_lp(ids[k], k), ids[k], None] for k in range(start + 1, L)]
    meta = {"id": "x", "finish_reason": {"type": "length", "length": 0}, "prompt_tokens": L}
    if action == "short":
        itl = itl[:-1]
    elif action == "ids":
        itl[-1][1] = itl[-1][1] + 1
    elif action == "truncate":  # what --allow-auto-truncate would do: drop the tail, report fewer tokens
        meta["prompt_tokens"] = L - 1
        itl = itl[:-1]
    elif action == "positive":
        itl[-1][0] = 0.5
    elif action == "null":
        itl[-1][0] = None
    elif action == "leading":
        itl[0][0] = -1.0
    meta["input_token_logprobs"] = itl
    if top_k:
        top = [None] + [[[fake_lp(j, k), j, None] for j in range(top_k)] for k in range(start + 1, L)]
        if action == "top_short":
            top = top[:-1]
        meta["input_top_logprobs"] = top
    meta.update(output_token_logprobs=[], completion_tokens=0, cached_tokens=0, e2e_latency=0.0)
    return {"text": "", "output_ids": [], "meta_info": meta}


class FaultServer:
    """A scripted SGLang look-alike. ``script`` holds one action per incoming request (then ``default``)."""

    def __init__(self, default: str = "ok") -> None:
        self.script: list = []
        self.default = default
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.delay_s = 0.0
        self.slow_s = 2.0
        self.echo_temperature = False  # True: answer like SGLang with sglang#36213 (echo the applied T)
        self.outage_until = 0.0  # time.monotonic() before which every request gets outage_status
        self.outage_status = 500
        self.request_times: list[float] = []
        self._app = LoopbackApp(self._routes)
        self._loop = self._app.loop
        self.url = self._app.url

    def _routes(self, app: web.Application) -> None:
        app.router.add_post("/generate", self._generate)
        app.router.add_get("/health_generate", self._health)
        app.router.add_get("/server_info", self._info)

    def close(self) -> None:
        self._app.close()

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.default != "down" else 503)

    async def _info(self, request: web.Request) -> web.Response:
        return web.json_response({"context_length": 64, "max_req_input_len": 57, "tp_size": 1})

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            action = self.script.pop(0) if self.script else self.default
            body = await request.json()
            self.bodies.append(body)
            self.headers.append(dict(request.headers))
            self.request_times.append(time.monotonic())
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if time.monotonic() < self.outage_until:
                return web.json_response({"error": {"message": "outage"}}, status=self.outage_status)
            if isinstance(action, tuple):  # ("status", code, body[, headers])
                _, code, payload, *headers = action
                text = payload if isinstance(payload, str) else json.dumps(payload)
                return web.Response(
                    status=code, text=text, content_type="application/json", headers=headers[0] if headers else None
                )
            if action == "slow":
                await asyncio.sleep(self.slow_s)
                action = "ok"
            if action == "reset":
                request.transport.abort()
                return web.Response(status=200)
            if action == "malformed":
                return web.Response(status=200, text='{"meta_info": {', content_type="application/json")
            ids, starts = body["input_ids"], body["logprob_start_len"]
            top_k = body.get("top_logprobs_num", 0)
            if ids and isinstance(ids[0], list) and not isinstance(starts, list):
                starts = [starts] * len(ids)  # SGLang broadcasts a scalar over the batch
            if ids and isinstance(ids[0], list):
                answers = [_answer(i, s, top_k, "ok") for i, s in zip(ids, starts, strict=True)]
                if action == "batch_short":
                    answers = answers[:-1]
                elif action != "ok":
                    answers[-1] = _answer(ids[-1], starts[-1], top_k, action)
                return web.json_response(answers)
            answer = _answer(ids, starts, top_k, action)
            if self.echo_temperature:
                answer["meta_info"]["input_logprob_temperature"] = body.get("input_logprob_temperature", 1.0)
            return web.json_response(answer)
        finally:
            self.in_flight -= 1


@pytest.fixture
def server():
    s = FaultServer()
    yield s
    s.close()


@pytest.fixture
def server2():
    s = FaultServer()
    yield s
    s.close()


def dead_url() -> str:
    """A loopback URL where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


IDS = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]


def client(url, **kw) -> SyncTeacherClient:
    kw.setdefault("backoff_s", 0.001)
    kw.setdefault("max_backoff_s", 0.01)
    kw.setdefault("timeout_s", 5.0)
    kw.setdefault("trust_env", False)
    return SyncTeacherClient(url, **kw)


# ---------------------------------------------------------------------------- happy path and the request


def test_score_returns_response_log_probs_and_sends_the_documented_request(server):
    with client(server.url) as c:
        s = c.score(IDS, 6)
        assert s.log_probs.dtype == np.float32 and s.log_probs.shape == (4,)
        np.testing.assert_allclose(s.log_probs, expected_lps(IDS, 6), rtol=0, atol=1e-6)
        assert s.attempts == 1 and s.url == server.url + "/generate" and s.top_log_probs is None
        st = c.stats()
    assert server.bodies[0] == {
        "input_ids": IDS,
        "logprob_start_len": 5,
        "sampling_params": {"max_new_tokens": 0, "temperature": 1.0, "skip_special_tokens": False},
        "return_logprob": True,
    }
    assert st["requests"] == 1 and st["sequences"] == 1 and st["retries"] == 0 and st["errors"] == 0


def test_response_start_at_end_gives_empty_scores(server):
    with client(server.url) as c:
        assert c.score(IDS, len(IDS)).log_probs.shape == (0,)


def test_numpy_input_ids_and_top_logprobs(server):
    with client(server.url, top_logprobs=3) as c:
        s = c.score(np.array(IDS, dtype=np.int32), 7)
    assert server.bodies[0]["top_logprobs_num"] == 3
    assert len(s.top_log_probs) == 3
    ids, lps = s.top_log_probs[0]
    assert ids.dtype == np.int64 and lps.dtype == np.float32
    np.testing.assert_array_equal(ids, [0, 1, 2])
    np.testing.assert_allclose(lps, [fake_lp(j, 7) for j in range(3)], atol=1e-6)


def test_url_normalisation_and_error_envelopes():
    assert normalize_url("http://h:1") == "http://h:1/generate"
    assert normalize_url("http://h:1/") == "http://h:1/generate"
    assert normalize_url("http://h:1/generate/") == "http://h:1/generate"
    with pytest.raises(ValueError, match="http://"):
        normalize_url("h:1")
    assert (
        parse_error_message(b'{"error": {"message": "input_ids cannot be empty."}}')
        == "input_ids cannot be empty."
    )
    assert parse_error_message('{"error": "unknown field `foo`"}') == "unknown field `foo`"
    body = {"object": "error", "message": "bad types", "type": "Bad Request", "param": None, "code": 400}
    assert parse_error_message(json.dumps(body)) == "bad types"
    assert parse_error_message(b"<html>502 Bad Gateway</html>") == "<html>502 Bad Gateway</html>"
    assert parse_error_message(b"") == "<empty body>"
    assert build_request([([1, 2], 1), ([3, 4, 5], 2)], top_logprobs=2)["logprob_start_len"] == [0, 1]


# ---------------------------------------------------------------------------- client-side rejection


def test_over_long_and_invalid_inputs_are_rejected_before_sending(server):
    with client(server.url, max_input_tokens=8) as c:
        with pytest.raises(SampleError, match="10 tokens, more than the teacher's limit max_input_tokens=8"):
            c.score(IDS, 5)
        with pytest.raises(SampleError, match="sequence 1: input has 10 tokens"):
            c.score_many([(IDS[:5], 2), (IDS, 5)])  # validated as a whole: nothing is sent
        with pytest.raises(SampleError, match="teacher prompt cannot be empty"):
            c.score(IDS[:4], 0)
        with pytest.raises(SampleError, match="past the end"):
            c.score(IDS[:4], 5)
        with pytest.raises(SampleError, match="negative token id"):
            c.score([1, -2, 3], 1)
        with pytest.raises(SampleError, match="negative token id"):
            c.score(np.array([1, -2, 3]), 1)
        for not_ids in ([[1, 2], [3, 4]], [1.0, 2.0], [1, 2.5], [1, "2"], np.array([1.0, 2.0])):
            with pytest.raises(SampleError, match="integer token ids"):
                c.score(not_ids, 1)
        assert c.stats()["requests"] == 0
    assert server.requests == 0


# ---------------------------------------------------------------------------- retries


def test_5xx_burst_is_retried_then_succeeds(server):
    server.script = [
        ("status", 503, {"error": {"message": "overloaded"}}),
        ("status", 500, "boom"),
        ("status", 502, ""),
    ]
    with client(server.url, max_retries=3) as c:
        s = c.score(IDS, 5)
        st = c.stats()
    np.testing.assert_allclose(s.log_probs, expected_lps(IDS, 5), atol=1e-6)
    assert s.attempts == 4 and server.requests == 4
    assert st["requests"] == 4 and st["retries"] == 3 and st["failures_5xx"] == 3 and st["errors"] == 0


def test_5xx_forever_raises_unavailable_naming_url_and_message(server):
    server.default = ("status", 503, {"error": {"message": "KV cache full"}})
    with client(server.url, max_retries=2) as c:
        with pytest.raises(TeacherUnavailable, match="KV cache full") as ei:
            c.score(IDS, 5)
        st = c.stats()
    assert server.url in str(ei.value) and "3 attempt(s)" in str(ei.value)
    assert server.requests == 3 and st["failures_5xx"] == 3 and st["errors"] == 1 and st["sequences"] == 0


@pytest.mark.parametrize("code", [408, 429])
def test_408_and_429_are_retried(server, code):
    server.script = [("status", code, {"error": "slow down"})]
    with client(server.url) as c:
        assert c.score(IDS, 5).attempts == 2
        assert c.stats()["failures_4xx"] == 1


def test_slow_answer_times_out_and_is_retried(server):
    server.script = ["slow"]
    with client(server.url, timeout_s=0.3, max_retries=1) as c:
        s = c.score(IDS, 5)
        assert s.attempts == 2 and c.stats()["failures_timeout"] == 1
    server.default = "slow"
    with client(server.url, timeout_s=0.3, max_retries=1) as c:
        with pytest.raises(TeacherTimeout, match="timeout_s=0.3"):
            c.score(IDS, 5)
        assert c.stats()["failures_timeout"] == 2 and c.stats()["errors"] == 1


def test_connection_reset_is_retried(server):
    server.script = ["reset", "reset"]
    with client(server.url, max_retries=2) as c:
        s = c.score(IDS, 5)
        st = c.stats()
    np.testing.assert_allclose(s.log_probs, expected_lps(IDS, 5), atol=1e-6)
    assert s.attempts == 3 and st["failures_connection"] == 2
    server.default = "reset"
    with client(server.url, max_retries=1) as c:
        with pytest.raises(TeacherUnavailable, match="connection|Disconnected|Error"):
            c.score(IDS, 5)


def test_connection_refused_raises_unavailable():
    url = dead_url()
    with client(url, max_retries=1) as c:
        with pytest.raises(TeacherUnavailable, match="health_generate"):
            c.score(IDS, 5)
        assert c.stats()["failures_connection"] == 2


# ---------------------------------------------------------------------------- rejections and bad answers


@pytest.mark.parametrize(
    "body",
    [
        {
            "error": {
                "message": "The input (900 tokens) is longer than the model's context length (512 tokens)."
            }
        },
        {"error": "The input (900 tokens) is longer than the model's context length (512 tokens)."},
        {
            "object": "error",
            "message": "The input (900 tokens) is longer than the model's context length (512 tokens).",
            "type": "Bad Request",
            "param": None,
            "code": 400,
        },
    ],
    ids=["error-object", "error-string", "object-error"],
)
def test_4xx_is_raised_at_once_with_the_servers_message(server, body):
    server.script = [("status", 400, body)]
    with client(server.url) as c:
        with pytest.raises(TeacherRequestRejected, match=r"HTTP 400: The input \(900 tokens\) is longer"):
            c.score(IDS, 5)
        st = c.stats()
    assert server.requests == 1 and st["failures_4xx"] == 1 and st["retries"] == 0


def test_401_hints_at_the_api_key(server):
    server.script = [("status", 401, {"error": {"message": "Unauthorized"}})]
    with client(server.url, api_key="s3cret") as c:
        with pytest.raises(TeacherRequestRejected, match="check api_key"):
            c.score(IDS, 5)
    assert server.headers[0]["Authorization"] == "Bearer s3cret"


@pytest.mark.parametrize(
    "action, message",
    [
        ("malformed", "not JSON"),
        ("short", "len(input_token_logprobs)=4 but prompt_tokens - logprob_start_len = 10 - 5 = 5"),
        ("ids", "echoed token id at position 9 is 39, sent 38"),
        ("truncate", "prompt_tokens=9 but 10 input ids were sent"),
        ("positive", "offset 3 is 0.5; log-probs must be finite numbers <= 0"),
        ("null", "offset 3 is null"),
        ("leading", "leading input_token_logprobs entry should have a null logprob"),
        (("status", 200, "[1, 2]"), "expected an object with 'meta_info'"),
    ],
)
@pytest.mark.parametrize("off_loop", [False, True], ids=["on-loop", "off-loop"])
def test_bad_answers_raise_bad_response_and_are_not_used(server, action, message, off_loop, monkeypatch):
    if off_loop:  # every answer decoded in a worker thread, as long or top-k answers are
        monkeypatch.setattr(teacher_client, "OFFLOAD_BYTES", 0)
    server.script = [action]
    with client(server.url) as c:
        with pytest.raises(TeacherBadResponse, match=message.replace("(", r"\(").replace(")", r"\)")) as ei:
            c.score(IDS, 6)
        st = c.stats()
    assert server.url in str(ei.value)
    assert (
        server.requests == 1
        and st["failures_bad_response"] == 1
        and st["sequences"] == 0
        and st["errors"] == 1
    )


def test_bad_answers_can_be_retried_when_asked(server):
    server.script = ["ids"]
    with client(server.url, retry_bad_responses=True) as c:
        assert c.score(IDS, 6).attempts == 2
        assert c.stats()["failures_bad_response"] == 1


def test_answers_are_decoded_on_the_executor_given(server):
    class Counting(ThreadPoolExecutor):
        submitted = 0

        def submit(self, fn, *args, **kwargs):
            Counting.submitted += 1
            return super().submit(fn, *args, **kwargs)

    with Counting(1) as pool:
        with client(server.url, top_logprobs=2, executor=pool) as c:
            small = c.score(IDS, 8)  # 2 positions x 3 entries: decoded on the loop
            assert Counting.submitted == 0
            long_ids = list(range(1, 400))
            scores = c.score(long_ids, 2)  # 397 x 3 entries: decoded in the pool
    assert Counting.submitted == 1
    assert len(small.log_probs) == 2 and len(scores.log_probs) == 397 and len(scores.top_log_probs) == 397


def test_bad_top_logprobs_are_caught(server):
    server.script = ["top_short"]
    with client(server.url, top_logprobs=2) as c:
        with pytest.raises(TeacherBadResponse, match="input_top_logprobs has 4 entries, expected 5"):
            c.score(IDS, 6)


# ---------------------------------------------------------------------------- batching


def test_batching_packs_requests_and_keeps_order(server):
    items = [(IDS[: 4 + i % 6], 1 + i % 3) for i in range(10)]
    with client(server.url, batch_size=4) as c:
        out = c.score_many(items)
        st = c.stats()
    assert [len(b["input_ids"]) for b in server.bodies] == [4, 4, 2]
    assert server.bodies[0]["logprob_start_len"] == [0, 1, 2, 0]
    for s, (ids, rs) in zip(out, items, strict=True):
        np.testing.assert_allclose(s.log_probs, expected_lps(ids, rs), atol=1e-6)
    assert st["requests"] == 3 and st["sequences"] == 10


def test_batch_with_one_start_sends_a_scalar_start_that_a_router_accepts(server):
    """sglang-router's typed request rejects a list logprob_start_len (422); equal starts need no list."""
    items = [(IDS, 4), (IDS[:8], 4), (IDS[:6], 4)]
    with client(server.url, batch_size=3) as c:
        out = c.score_many(items)
    assert server.bodies[0]["logprob_start_len"] == 3
    for s, (ids, rs) in zip(out, items, strict=True):
        np.testing.assert_allclose(s.log_probs, expected_lps(ids, rs), atol=1e-6)
    assert build_request([(IDS, 4), (IDS, 5)])["logprob_start_len"] == [3, 4]


def test_temperature_is_sent_only_when_not_one_and_the_applied_value_is_reported(server):
    with client(server.url) as c:
        assert c.score(IDS, 6).temperature == 1.0
    assert "input_logprob_temperature" not in server.bodies[-1]  # T = 1: the stock body
    with client(server.url, temperature=0.7) as c:
        ignored = c.score(IDS, 6)  # this fault server predates sglang#36213: no echo
        server.echo_temperature = True
        applied = c.score(IDS, 6)
    assert server.bodies[-1]["input_logprob_temperature"] == 0.7
    assert ignored.temperature == 1.0 and applied.temperature == 0.7
    with pytest.raises(ValueError, match="temperature=0"):
        TeacherClient("http://127.0.0.1:1", temperature=0)


@pytest.mark.parametrize(
    "action, message", [("batch_short", "batch answer has 1 items, 2 sequences"), ("ids", "answer item 1")]
)
def test_bad_batch_answer_names_the_item(server, action, message):
    server.script = [action]
    with client(server.url, batch_size=2) as c:
        with pytest.raises(TeacherBadResponse, match=message):
            c.score_many([(IDS, 5), (IDS, 7)])


# ------------------------------------------------------------------------ balancing, failover, concurrency


def test_round_robin_over_two_endpoints(server, server2):
    with client([server.url, server2.url + "/generate"]) as c:
        for _ in range(10):
            c.score(IDS, 5)
        eps = c.endpoint_stats()
    assert server.requests == 5 and server2.requests == 5
    assert all(v["requests"] == 5 and v["healthy"] == 1.0 for v in eps.values())


def test_failover_to_healthy_endpoint_and_cooldown(server):
    dead = dead_url()
    with client([dead, server.url], max_retries=2, cooldown_s=60) as c:
        outs = [c.score(IDS, 5) for _ in range(8)]
        st, eps = c.stats(), c.endpoint_stats()
    assert all(o.url == server.url + "/generate" for o in outs)
    # the dead endpoint was tried once, then skipped while cooling down
    assert eps[dead + "/generate"]["requests"] == 1 and eps[dead + "/generate"]["healthy"] == 0.0
    assert st["failures_connection"] == 1 and st["sequences"] == 8 and st["errors"] == 0
    assert server.requests == 8


def test_failover_on_5xx_endpoint(server, server2):
    server.default = ("status", 500, {"error": {"message": "worker died"}})
    with client([server.url, server2.url], cooldown_s=60) as c:
        outs = [c.score(IDS, 5) for _ in range(6)]  # sequential: the first failure sets the cooldown
        outs += c.score_many([(IDS, 5)] * 6)
    assert {o.url for o in outs} == {server2.url + "/generate"}
    assert server.requests == 1


def test_all_endpoints_down_tries_anyway_and_reports():
    urls = [dead_url(), dead_url()]
    with client(urls, max_retries=3, cooldown_s=60) as c:
        with pytest.raises(TeacherUnavailable, match="4 attempt"):
            c.score(IDS, 5)
        st = c.stats()
    assert st["all_endpoints_down"] >= 2 and st["failures_connection"] == 4


def test_health_marks_endpoints(server):
    dead = dead_url()
    with client([server.url, dead]) as c:
        assert c.health() == {server.url + "/generate": True, dead + "/generate": False}
        assert c.server_info()["max_req_input_len"] == 57


def test_concurrency_limit_is_respected(server):
    server.delay_s = 0.05
    with client(server.url, max_concurrency=3) as c:
        out = c.score_many([(IDS, 5)] * 24)
    assert len(out) == 24 and server.requests == 24
    assert server.max_in_flight == 3


def test_async_client_works_across_event_loops(server):
    c = TeacherClient(server.url, max_concurrency=2, trust_env=False)

    async def run() -> list:
        async with c:
            return await c.score_many([(IDS, 5)] * 4)

    assert len(asyncio.run(run())) == 4
    assert len(asyncio.run(run())) == 4  # a new loop gets a new semaphore and pool
    assert c.stats()["sequences"] == 8


def test_client_left_open_on_a_finished_loop_is_closed_quietly(server, caplog):
    """Two asyncio.run() calls without aclose(): the pool of the dead loop is closed, nothing is logged."""
    async def run(c: TeacherClient) -> list:
        return await c.score_many([(IDS, 5)] * 4)

    gc.collect()  # garbage other tests left behind is collected (and may complain) before this test looks
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        c = TeacherClient(server.url, max_concurrency=2, trust_env=False)
        assert len(asyncio.run(run(c))) == 4
        assert len(asyncio.run(run(c))) == 4
        asyncio.run(c.aclose())  # on a third loop: the second loop's pool is closed too
        del c
        gc.collect()
    assert not [r for r in caplog.records if "Unclosed" in r.getMessage()]


def _clear_proxy_env(monkeypatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


def test_trust_env_sends_through_the_environments_proxy(server, server2, monkeypatch):
    """trust_env: HTTP_PROXY and its credentials are used (server2 plays the proxy); NO_PROXY bypasses it."""
    _clear_proxy_env(monkeypatch)
    monkeypatch.setenv("HTTP_PROXY", server2.url.replace("http://", "http://user:pw@"))
    with client(server.url, trust_env=True) as c:
        np.testing.assert_allclose(c.score(IDS, 5).log_probs, expected_lps(IDS, 5), atol=1e-6)
    assert server2.requests == 1 and server.requests == 0
    assert server2.headers[0]["Proxy-Authorization"] == "Basic dXNlcjpwdw=="  # base64("user:pw")
    with client(server.url, trust_env=False) as c:
        c.score(IDS, 5)
    assert server.requests == 1
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with client(server.url, trust_env=True) as c:
        c.score(IDS, 5)
    assert server.requests == 2 and server2.requests == 1


# ---------------------------------------------------------------------------- stats


def test_stats_latency_percentiles_and_reset(server):
    with client(server.url) as c:
        outs = [c.score(IDS, 5) for _ in range(7)]
        st = c.stats()
        lat = np.array([o.latency_s for o in outs])
        assert st["latency_p50_s"] == pytest.approx(np.percentile(lat, 50))
        assert st["latency_p99_s"] == pytest.approx(np.percentile(lat, 99))
        assert st["latency_mean_s"] == pytest.approx(lat.mean())
        assert st["bytes_sent"] > 0 and st["bytes_received"] > st["bytes_sent"]
        c.reset_stats()
        st = c.stats()
    assert all(v == 0 for v in st.values())


def test_client_settings_are_validated():
    with pytest.raises(ValueError, match="at least one teacher URL"):
        TeacherClient([])
    with pytest.raises(ValueError, match="max_concurrency=0"):
        TeacherClient("http://x:1", max_concurrency=0)


# ---------------------------------------------------------------------------- retry budget


def test_retry_policy_bounds_every_sleep_and_the_whole_budget():
    rng = __import__("random").Random(0)
    policy = RetryPolicy(budget_s=10.0, backoff_s=0.5, max_backoff_s=2.0)
    for retries in range(8):
        delay, why = policy.next_delay(retries, 1.0, None, rng)
        assert why == "" and 0.0 <= delay <= min(2.0, 0.5 * 2**retries)
    assert policy.next_delay(3, 9.9, None, rng)[0] <= 0.1 + 1e-9  # never sleeps past the budget
    delay, why = policy.next_delay(3, 10.0, None, rng)
    assert delay is None and "retry budget of 10s spent" in why
    assert policy.next_delay(0, 0.0, 4.0, rng)[0] >= 4.0  # Retry-After beyond max_backoff_s is honoured
    delay, why = policy.next_delay(0, 8.0, 4.0, rng)
    assert delay is None and "Retry-After=4s" in why
    delay, why = RetryPolicy(max_retries=2).next_delay(2, 0.0, None, rng)
    assert delay is None and "max_retries=2" in why


def test_an_outage_shorter_than_the_budget_is_ridden_through(server):
    server.outage_until = time.monotonic() + 1.5  # the 4 s blip of the fault run, shortened
    with client(server.url, retry_budget_s=5.0, backoff_s=0.05, max_backoff_s=0.2) as c:
        s = c.score(IDS, 5)
        st = c.stats()
    np.testing.assert_allclose(s.log_probs, expected_lps(IDS, 5), atol=1e-6)
    assert s.attempts == server.requests > 2 and s.latency_s >= 1.4
    assert st["retries"] == server.requests - 1 and st["failures_5xx"] == server.requests - 1


def test_an_outage_longer_than_the_budget_fails_with_its_attempts_counted(server):
    server.outage_until = time.monotonic() + 60
    with client(server.url, retry_budget_s=0.5, backoff_s=0.05, max_backoff_s=0.1) as c:
        t0 = time.monotonic()
        with pytest.raises(TeacherUnavailable, match=r"stopped: retry budget of 0.5s spent") as ei:
            c.score(IDS, 5)
        took = time.monotonic() - t0
        st = c.stats()
    assert 0.5 <= took < 1.5
    assert ei.value.attempts == server.requests == st["requests"] and st["retries"] == server.requests - 1
    assert ei.value.latency_s == pytest.approx(took, abs=0.1)


@pytest.mark.parametrize("code", [429, 503])
def test_429_and_503_after_the_budget_say_overloaded_not_fix_the_request(server, code):
    server.default = ("status", code, {"error": "slow down"})
    with client(server.url, max_retries=3) as c:
        with pytest.raises(TeacherUnavailable) as ei:
            c.score(IDS, 5)
    message = str(ei.value)
    assert "fix the request" not in message and "not retried" not in message
    assert "4 attempt(s)" in message and "max_retries=3" in message and "overloaded" in message
    assert server.requests == 4 and ei.value.attempts == 4


def test_retry_after_is_honoured(server):
    server.script = [("status", 503, {"error": "restarting"}, {"Retry-After": "0.4"})]
    with client(server.url) as c:
        assert c.score(IDS, 5).attempts == 2
    assert server.request_times[1] - server.request_times[0] >= 0.39


def test_a_rejected_request_says_why_it_is_not_retried(server):
    server.script = [("status", 400, {"error": "The input (900 tokens) is longer than the model's context length"})]
    with client(server.url) as c:
        with pytest.raises(TeacherRequestRejected, match="xvocab_max_teacher_tokens") as ei:
            c.score(IDS, 5)
    assert "not retried: HTTP 400 means the server refused this request itself" in str(ei.value)
    assert ei.value.attempts == 1


# ---------------------------------------------------------------------------- URLs and credentials


def test_bad_urls_and_credentials_fail_at_construction_without_echoing_secrets():
    with pytest.raises(ValueError, match="port 99999 is out of range"):
        TeacherClient("http://127.0.0.1:99999")
    with pytest.raises(ValueError, match="keep one") as ei:
        TeacherClient("http://bob:hunter22@127.0.0.1:1", api_key="sk-secret-key")
    assert "hunter22" not in str(ei.value) and "sk-secret-key" not in str(ei.value)
    with pytest.raises(ValueError, match="ca_bundle='/nonexistent/ca.pem' cannot be used"):
        TeacherClient("https://127.0.0.1:1", ca_bundle="/nonexistent/ca.pem")


def test_url_credentials_never_appear_in_errors_stats_or_scores(server):
    url = server.url.replace("http://", "http://bob:hunter22@")
    with client(url) as c:
        s = c.score(IDS, 5)
        assert s.url == server.url.replace("http://", "http://***@") + "/generate"
        assert "Basic" in server.headers[0]["Authorization"]  # the credentials are still sent
        server.default = ("status", 500, {"error": "boom"})
        c.client.retry_policy = RetryPolicy(budget_s=0.1, backoff_s=0.01, max_backoff_s=0.01)
        with pytest.raises(TeacherUnavailable) as ei:
            c.score(IDS, 5)
        assert "hunter22" not in str(ei.value) and "***@" in str(ei.value)
        assert all("hunter22" not in k for k in c.endpoint_stats())
    dead = dead_url().replace("http://", "http://bob:hunter22@")
    with client(dead, max_retries=0) as c:
        with pytest.raises(TeacherUnavailable) as ei:
            c.score(IDS, 5)
    assert "hunter22" not in str(ei.value)


# ---------------------------------------------------------------------------- TLS: a private CA


def _make_ca_and_server_cert(tmp_path):
    """A throwaway CA and a 127.0.0.1 server certificate it signs (openssl, nothing leaves tmp_path)."""
    import subprocess

    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    ca_key, ca_pem = tmp_path / "ca.key", tmp_path / "ca.pem"
    key, csr, pem, ext = tmp_path / "srv.key", tmp_path / "srv.csr", tmp_path / "srv.pem", tmp_path / "ext.cnf"
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=xvocab test CA",
        "-keyout", str(ca_key), "-out", str(ca_pem))
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(csr))
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca_pem), "-CAkey", str(ca_key), "-CAcreateserial", "-days", "1",
        "-extfile", str(ext), "-out", str(pem))
    return ca_pem, pem, key


def test_https_teacher_behind_a_private_ca(tmp_path):
    import shutil
    import ssl

    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    ca_pem, cert, key = _make_ca_and_server_cert(tmp_path)
    server = FaultServer()
    try:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(cert), str(key))
        tls = TLSServer(server, ctx)
        with client(tls.url, max_retries=0, ca_bundle=str(ca_pem)) as c:
            np.testing.assert_allclose(c.score(IDS, 5).log_probs, expected_lps(IDS, 5), atol=1e-6)
        with client(tls.url, max_retries=0) as c:  # the system store does not know the private CA
            with pytest.raises(TeacherUnavailable, match="(?i)certificate|ssl"):
                c.score(IDS, 5)
        with client(tls.url, max_retries=0, verify_tls=False) as c:
            assert c.score(IDS, 5).attempts == 1
        tls.close()
    finally:
        server.close()


class TLSServer:
    """An https front for a FaultServer's app: the same handlers on a second, TLS-wrapped site."""

    def __init__(self, fault: FaultServer, ctx) -> None:
        async def start():
            site = web.TCPSite(fault._app.runner, "127.0.0.1", 0, ssl_context=ctx)
            await site.start()
            return site

        self.site = asyncio.run_coroutine_threadsafe(start(), fault._loop).result(10)
        self._loop = fault._loop
        self.url = f"https://127.0.0.1:{self.site._server.sockets[0].getsockname()[1]}"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.site.stop(), self._loop).result(10)


def test_retry_after_as_seconds_or_http_date():
    from slime_xvocab.teacher_client import _retry_after

    assert _retry_after("2.5") == 2.5 and _retry_after("-1") == 0.0 and _retry_after(None) is None
    assert _retry_after("Wed, 21 Oct 2026 07:28:10 GMT", now=1792567680.0) == pytest.approx(10.0)
    assert _retry_after("soon") is None
