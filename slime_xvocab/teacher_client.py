"""Score token sequences on an SGLang teacher: prefill-only ``/generate`` with input log-probs.

The client sends one sequence (or a batch) to SGLang's native ``/generate`` with ``max_new_tokens=0`` and
``return_logprob=true``, and returns the teacher's log-probability of every response token::

    log_probs[k - response_start] = log p_teacher(input_ids[k] | input_ids[:k])   for k >= response_start

The exact request (one sequence)::

    {"input_ids": [...],
     "sampling_params": {"max_new_tokens": 0, "temperature": 1.0, "skip_special_tokens": false},
     "return_logprob": true,
     "logprob_start_len": response_start - 1}          # + "top_logprobs_num": k when top_logprobs > 0
                                                       # + "input_logprob_temperature": T when T != 1

``logprob_start_len = response_start - 1`` makes the answer carry exactly one (null) entry plus one entry per
response token, so the payload grows with the response, not the prompt, and SGLang may reuse the cached
prompt KV across the samples of a group. Stock SGLang computes input log-probs at temperature 1 whatever
``sampling_params.temperature`` says; ``temperature=T`` asks a server with sglang#36213 for log softmax(z / T)
through ``input_logprob_temperature``, and :attr:`TeacherScores.temperature` reports what the server applied
(1.0 from a server that does not echo the option back).

Every answer is validated before it becomes numbers (a wrong answer raises, it is never silently used):

* it is JSON of the right shape (an object per sequence; an array of them for a batch);
* ``meta_info.prompt_tokens == len(input_ids)`` (catches a server that truncates, ``--allow-auto-truncate``);
* ``len(input_token_logprobs) == prompt_tokens - logprob_start_len`` and the leading entry's logprob is null;
* the echoed token ids equal the ids sent;
* every log-prob is finite and ``<= 0`` (up to ``1e-4`` of rounding).

Failures map onto :mod:`slime_xvocab.errors`:

* connection refused/reset, 5xx (503 included), 408, 429: retried within the retry budget, then
  ``TeacherUnavailable``;
* no answer within ``timeout_s``: retried within the budget, then ``TeacherTimeout``;
* any other 4xx (bad request, 401, 404 ...): ``TeacherRequestRejected`` at once, with the server's message
  and why it is not retried;
* an answer that fails validation: ``TeacherBadResponse`` at once (unless ``retry_bad_responses``);
* an input longer than ``max_input_tokens`` or with ``response_start < 1``: ``SampleError``, nothing is sent.

Every raised :class:`~slime_xvocab.errors.TeacherError` carries ``attempts`` and ``latency_s``, so the
retries of calls that finally failed are counted too.

Retries follow a :class:`RetryPolicy`: a failed call is retried until ``retry_budget_s`` seconds have passed
since its first failure (default 60 s, long enough for a router failover or a replica restart; optionally
also at most ``max_retries`` retries), sleeping ``uniform(0, min(max_backoff_s, backoff_s * 2**n))`` between
attempts (exponential backoff with full jitter) or longer when the server sends ``Retry-After``.
With several URLs, requests go round-robin over the healthy endpoints; an endpoint that fails is put in
cooldown and the retry goes to another one at once. If every endpoint is cooling down the client tries
anyway (the one whose cooldown ends first) and counts it in ``stats()["all_endpoints_down"]``. A
``sglang-router`` in front of several replicas is simply one URL.

Layout: the client composes the wire format (:mod:`slime_xvocab.sglang_wire`, pure functions: request in,
parsed arrays out), a :class:`RetryPolicy` (when to retry, how long to sleep), an :class:`EndpointPool`
(which URL, cooldowns) and the HTTP transport below; it keeps the statistics.

Transport: aiohttp, one ``ClientSession`` per event loop holding a keep-alive pool of ``max_concurrency``
connections (idle ones are dropped after ``KEEPALIVE_S``); bodies go through orjson when it is installed
(json otherwise). The client spends well under 0.5 ms of CPU per request, so one request per sequence (what
spreads the load behind a router) sustains more than 2,000 sequences/s on one core; see
``benchmarks/bench_teacher_client.py``.

Example::

    async with TeacherClient("http://teacher:30000", timeout_s=60) as client:
        scores = await client.score(input_ids, response_start=len(prompt_ids))
        scores.log_probs          # float32[len(input_ids) - len(prompt_ids)]

    with SyncTeacherClient(["http://t1:30000", "http://t2:30000"], batch_size=8) as client:
        all_scores = client.score_many([(ids_a, 12), (ids_b, 40)])
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import math
import random
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import numpy as np
from yarl import URL

from .errors import (
    SampleError,
    TeacherBadResponse,
    TeacherError,
    TeacherRequestRejected,
    TeacherTimeout,
    TeacherUnavailable,
)
from .sglang_wire import (
    LOGPROB_EPS,
    TEMPERATURE_KEY,
    BadAnswer,
    build_request,
    collector_paused,
    parse_answer,
    parse_error_message,
)
from .sglang_wire import dumps as _dumps
from .sglang_wire import loads as _loads
from .urls import check_url, has_credentials, redact_url

__all__ = [
    "TeacherScores",
    "TeacherClient",
    "SyncTeacherClient",
    "RetryPolicy",
    "EndpointPool",
    "redact_url",
    "parse_error_message",
    "normalize_url",
    "build_request",
    "LOGPROB_EPS",
    "TEMPERATURE_KEY",
]

logger = logging.getLogger(__name__)

#: Answers larger than this (bytes), or with more top-k candidates than ``OFFLOAD_ENTRIES``, are decoded and
#: validated in a worker thread, in one hop: on the event loop, a burst of top-k answers arriving together
#: stalls slime's rollout (a 33-token answer with a top-20 costs about 0.3 ms to decode and check). A smaller
#: answer stays on the loop: the hop costs more CPU than the decode (measured in benchmarks/README.md).
OFFLOAD_BYTES = 1 << 16
OFFLOAD_ENTRIES = 512
#: HTTP statuses that are retried (besides every 5xx): request timeout, too many requests.
RETRY_STATUSES = frozenset({408, 429})
#: Failure kinds, each counted in ``stats()`` as ``failures_<kind>``.
FAILURE_KINDS = ("timeout", "connection", "5xx", "4xx", "bad_response")
#: How many recent call latencies the percentiles are computed over.
LATENCY_WINDOW = 65536
#: Idle keep-alive connections are dropped after this many seconds: below the 5 s keep-alive of SGLang's
#: uvicorn server, so the client never reuses a socket the server is about to close (a spurious reset).
KEEPALIVE_S = 4.0
#: Transport failures of one attempt (besides timeouts, which are caught first: on Python >= 3.11
#: ``TimeoutError`` is an ``OSError``).
_NET_ERRORS = (aiohttp.ClientError, OSError)

T = TypeVar("T")


@dataclass(frozen=True)
class TeacherScores:
    """The teacher's log-probs for the response part of one sequence.

    Attributes:
        log_probs: float32 ``[len(input_ids) - response_start]``; entry ``i`` is
            ``log p(input_ids[response_start + i] | input_ids[:response_start + i])`` (natural log, T=1).
        top_log_probs: ``None`` unless the client was built with ``top_logprobs=k > 0``. Then one entry per
            response position, ``(ids int64[k], lps float32[k])``, best first: the teacher's k most likely
            tokens at that position (the distribution ``log_probs[i]`` was read from); a
            :class:`~slime_xvocab.sglang_wire.TopK`, which also holds them as flat arrays.
        latency_s: wall time of the call, retries and backoff included (seconds).
        attempts: HTTP attempts made (1 = no retry).
        url: the ``/generate`` URL that answered.
        temperature: the input-logprob temperature the server says it applied (``meta_info``'s
            ``input_logprob_temperature``; 1.0 when it says nothing, as a server without sglang#36213 does).
    """

    log_probs: np.ndarray
    top_log_probs: Sequence | None
    latency_s: float
    attempts: int
    url: str
    temperature: float = 1.0


def normalize_url(url: str) -> str:
    """Return the ``/generate`` URL for a base URL or a ``/generate`` URL.

    Args:
        url: ``http://host:port``, ``http://host:port/``, ``http://host:port/prefix`` or ``.../generate``.

    Returns:
        The URL ending in ``/generate``, e.g. ``normalize_url("http://h:30000") == "http://h:30000/generate"``.

    Raises:
        ValueError: the URL is empty, not http(s), has no host or a port outside 1-65535 (the message
            never repeats credentials).
    """
    problem = check_url(url)
    if problem is not None:
        raise ValueError(f"teacher URL {problem}")
    u = url.strip().rstrip("/")
    return u if u.endswith("/generate") else u + "/generate"


@dataclass(frozen=True)
class RetryPolicy:
    """When a failed attempt is retried, and how long to sleep first (pure: no clock, no I/O).

    A call keeps retrying retryable failures until ``budget_s`` seconds have passed since its first failure
    (and, if ``max_retries`` is set, at most that many retries). Each sleep is drawn with full jitter,
    ``uniform(0, min(max_backoff_s, backoff_s * 2**(retry - 1)))``, raised to the server's ``Retry-After``
    when it sends one, and never runs past the budget: the last retry starts at the budget's end at the
    latest.

    Attributes:
        budget_s: seconds after a call's first failure during which retries are started.
        max_retries: an extra cap on retries per call; None: the budget alone bounds them.
        backoff_s: base of the exponential backoff, seconds.
        max_backoff_s: cap of one (jittered) backoff sleep, seconds.
    """

    budget_s: float = 60.0
    max_retries: int | None = None
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0

    def next_delay(
        self, retries_done: int, since_first_failure_s: float, retry_after_s: float | None, rng: random.Random
    ) -> tuple[float | None, str]:
        """Decide about the next retry.

        Args:
            retries_done: retries this call has already made.
            since_first_failure_s: seconds since the call's first failed attempt.
            retry_after_s: the server's ``Retry-After`` for the last failure, if any.
            rng: where the jitter comes from.

        Returns:
            ``(delay_s, "")`` to retry after ``delay_s`` seconds, or ``(None, why)`` to stop, ``why`` saying
            which bound was reached.
        """
        if self.max_retries is not None and retries_done >= self.max_retries:
            return None, f"max_retries={self.max_retries} retries spent"
        left = self.budget_s - since_first_failure_s
        if left <= 0:
            return None, f"retry budget of {self.budget_s:g}s spent"
        delay = rng.uniform(0.0, min(self.max_backoff_s, self.backoff_s * (2.0 ** retries_done)))
        if retry_after_s is not None:
            if retry_after_s > left:
                return None, (
                    f"the server asked to wait Retry-After={retry_after_s:g}s, more than the {left:.1f}s left of "
                    f"the retry budget ({self.budget_s:g}s)"
                )
            delay = max(delay, retry_after_s)
        return min(delay, left), ""


def _base_url(generate_url: str) -> str:
    return generate_url[: -len("/generate")]


class _Endpoint:
    """One teacher URL, its health state and how to reach it."""

    __slots__ = (
        *("url", "shown", "yurl", "via"),
        *("cooldown_until", "consecutive_failures", "requests", "failures"),
    )

    def __init__(self, url: str) -> None:
        self.url = url
        self.shown = redact_url(url)  # what messages, stats and TeacherScores.url show
        self.yurl = URL(url)  # parsed once: aiohttp would parse the string on every request
        self.via: dict[str, Any] = {}  # the proxy keyword arguments of every request to it (trust_env)
        self.cooldown_until = 0.0
        self.consecutive_failures = 0
        self.requests = 0
        self.failures = 0


class EndpointPool:
    """The teacher endpoints, their health, and which one the next attempt goes to (no I/O).

    Attempts go round-robin over the healthy endpoints, preferring ones the call has not tried yet. An
    endpoint that fails a transport-level attempt is put in cooldown for ``cooldown_s``; when every endpoint
    is cooling down, the one whose cooldown ends first is used anyway (and :meth:`pick` says so).

    Args:
        urls: the ``/generate`` URLs (normalised, deduplicated).
        cooldown_s: how long a failed endpoint is skipped, seconds.
    """

    def __init__(self, urls: Sequence[str], cooldown_s: float) -> None:
        self.endpoints = [_Endpoint(u) for u in urls]
        self.cooldown_s = cooldown_s
        self._rr = 0

    def pick(self, tried: set[str]) -> tuple[_Endpoint, bool]:
        """The endpoint for the next attempt of a call that already tried ``tried`` (URLs), and whether
        every endpoint was in cooldown."""
        eps = self.endpoints
        now = time.monotonic()
        if len(eps) == 1:
            return eps[0], eps[0].cooldown_until > now
        n = len(eps)
        start = self._rr
        self._rr = (self._rr + 1) % n
        healthy = [eps[(start + i) % n] for i in range(n) if eps[(start + i) % n].cooldown_until <= now]
        fresh = [ep for ep in healthy if ep.url not in tried]
        if fresh:
            return fresh[0], False
        if healthy:
            return healthy[0], False
        untried = [ep for ep in eps if ep.url not in tried] or eps
        return min(untried, key=lambda ep: ep.cooldown_until), True

    def has_fresh(self, tried: set[str]) -> bool:
        """Whether a healthy endpoint the call has not tried exists (then it fails over without sleeping)."""
        now = time.monotonic()
        return any(ep.cooldown_until <= now and ep.url not in tried for ep in self.endpoints)

    def ordered(self) -> list[_Endpoint]:
        """Healthy endpoints first (for info requests)."""
        now = time.monotonic()
        return sorted(self.endpoints, key=lambda ep: ep.cooldown_until > now)

    def mark_failed(self, ep: _Endpoint, *, count: bool = True) -> None:
        """Put ``ep`` in cooldown (``count``: also count a failed attempt against it)."""
        if count:
            ep.failures += 1
            ep.consecutive_failures += 1
        ep.cooldown_until = time.monotonic() + self.cooldown_s

    @staticmethod
    def mark_ok(ep: _Endpoint) -> None:
        """``ep`` answered: healthy again."""
        ep.consecutive_failures = 0
        ep.cooldown_until = 0.0


class _AttemptFailed(Exception):
    """Internal: one HTTP attempt failed; ``kind`` is one of FAILURE_KINDS."""

    def __init__(
        self, kind: str, message: str, retryable: bool, retry_after: float | None = None, status: int = 0
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.retryable = retryable
        self.retry_after = retry_after
        self.status = status


class TeacherClient:
    """Async scoring client for one or more SGLang ``/generate`` endpoints (or one router).

    Args:
        urls: one URL or several; base URLs (``http://host:port``) or ``.../generate``.
        api_key: sent as ``Authorization: Bearer <api_key>`` (SGLang ``--api-key``).
        timeout_s: per-attempt timeout, seconds: the whole attempt (connect, send, wait for and read the
            answer) must end within it.
        max_retries: an optional cap on retries per call on top of ``retry_budget_s`` (None: no cap).
        retry_budget_s: retryable failures are retried until this many seconds after a call's first failure
            (see :class:`RetryPolicy`); 0 disables retries.
        backoff_s: base of the exponential backoff, seconds.
        max_backoff_s: cap of one backoff sleep, seconds (a ``Retry-After`` may ask for longer).
        max_concurrency: most HTTP requests in flight at once (per event loop); also the connection pool size.
        max_input_tokens: reject longer inputs client-side with SampleError (use the worker's
            ``/server_info`` ``max_req_input_len``). ``None`` = no client-side limit.
        top_logprobs: k > 0 also fetches the teacher's top-k log-probs at every response position.
        batch_size: ``score_many`` packs this many sequences per request (SGLang batch form). Note that a
            router sends a whole batch to one worker, and one bad item fails the whole batch.
        cooldown_s: how long a failed endpoint is skipped by the balancer, seconds.
        retry_bad_responses: also retry answers that fail validation (default: raise at once, since a
            wrong answer usually means a misconfigured server, not a transient fault).
        connect_timeout_s: connect timeout, seconds (default ``min(timeout_s, 10)``).
        trust_env: use the proxy that ``HTTP_PROXY``/``HTTPS_PROXY``/``NO_PROXY`` give for each URL (read
            once per event loop; credentials go in the proxy URL, ``http://user:pass@proxy:3128``).
        health_path: what ``health()`` polls (``/health_generate`` runs a tiny forward on SGLang;
            ``/health`` is tried when it answers 404).
        ca_bundle: PEM file of the CA(s) that sign the teacher's certificate (a private CA); default: the
            system store (and ``SSL_CERT_FILE``).
        verify_tls: False skips certificate verification for ``https://`` teachers (testing only).
        executor: where answers are decoded and validated off the event loop (default: the loop's default
            executor); pass one shared with the caller's other CPU work to bound the threads that compete
            with the event loop for the GIL.

    Raises:
        ValueError: no URL, a bad URL (scheme, host, port), credentials in a URL together with
            ``api_key``, an unreadable ``ca_bundle``, or a bad numeric setting.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        max_retries: int | None = None,
        retry_budget_s: float = 60.0,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        max_concurrency: int = 32,
        max_input_tokens: int | None = None,
        top_logprobs: int = 0,
        temperature: float = 1.0,
        batch_size: int = 1,
        cooldown_s: float = 5.0,
        retry_bad_responses: bool = False,
        connect_timeout_s: float | None = None,
        trust_env: bool = True,
        health_path: str = "/health_generate",
        ca_bundle: str | None = None,
        verify_tls: bool = True,
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        url_list = [urls] if isinstance(urls, str) else list(urls)
        if not url_list:
            raise ValueError("TeacherClient needs at least one teacher URL, e.g. http://127.0.0.1:30000")
        problems = []
        if timeout_s <= 0:
            problems.append(f"timeout_s={timeout_s} must be > 0")
        if max_retries is not None and max_retries < 0:
            problems.append(f"max_retries={max_retries} must be >= 0 or None")
        if retry_budget_s < 0:
            problems.append(f"retry_budget_s={retry_budget_s} must be >= 0")
        if backoff_s < 0 or max_backoff_s < 0:
            problems.append("backoff_s and max_backoff_s must be >= 0")
        if max_concurrency < 1:
            problems.append(f"max_concurrency={max_concurrency} must be >= 1")
        if batch_size < 1:
            problems.append(f"batch_size={batch_size} must be >= 1")
        if top_logprobs < 0:
            problems.append(f"top_logprobs={top_logprobs} must be >= 0")
        if not math.isfinite(temperature) or temperature <= 0:
            problems.append(f"temperature={temperature} must be a finite number > 0")
        if max_input_tokens is not None and max_input_tokens < 1:
            problems.append(f"max_input_tokens={max_input_tokens} must be >= 1 or None")
        if api_key and any(has_credentials(u) for u in url_list):
            problems.append("a teacher URL carries user:password@ and api_key is set too: keep one")
        if problems:
            raise ValueError("invalid TeacherClient settings: " + "; ".join(problems))
        seen: dict[str, None] = {}
        for u in url_list:
            seen.setdefault(normalize_url(u))
        self.urls: list[str] = list(seen)
        self.api_key = api_key
        self.timeout_s = float(timeout_s)
        self.max_retries = None if max_retries is None else int(max_retries)
        self.retry_budget_s = float(retry_budget_s)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.retry_policy = RetryPolicy(self.retry_budget_s, self.max_retries, self.backoff_s, self.max_backoff_s)
        self._ssl = _ssl_option(ca_bundle, verify_tls)
        self.max_concurrency = int(max_concurrency)
        self.max_input_tokens = max_input_tokens
        self.top_logprobs = int(top_logprobs)
        self.temperature = float(temperature)
        self.batch_size = int(batch_size)
        self.cooldown_s = float(cooldown_s)
        self.retry_bad_responses = retry_bad_responses
        self.connect_timeout_s = min(self.timeout_s, 10.0) if connect_timeout_s is None else connect_timeout_s
        self.trust_env = trust_env
        self.health_path = health_path
        self.executor = executor
        self.pool = EndpointPool(self.urls, self.cooldown_s)
        self._endpoints = self.pool.endpoints
        # Per-event-loop resources: an asyncio.Semaphore and an aiohttp session are bound to the loop that
        # first uses them, so both are (re)created lazily when the client is used from a different loop.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sem: asyncio.Semaphore | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closing: set[asyncio.Future] = set()  # closes of sessions left on another loop, in flight
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._rng = random.Random()
        self.reset_stats()

    # ------------------------------------------------------------------ resources

    def _resources(self) -> tuple[asyncio.Semaphore, aiohttp.ClientSession]:
        loop = asyncio.get_running_loop()
        session = self._session
        if self._loop is loop and session is not None and not session.closed:
            assert self._sem is not None
            return self._sem, session
        if self._loop is not loop:
            if session is not None:
                self._abandon(session)
            self._loop = loop
            self._sem = asyncio.Semaphore(self.max_concurrency)
        if self.trust_env:
            for ep in self._endpoints:
                ep.via = _env_proxy(ep.url)
        # One session, one pool of max_concurrency keep-alive connections. trust_env=False on the session:
        # aiohttp would look the proxy up in a thread on every request (half the throughput); it is
        # resolved above, once. No cookies: a teacher has no use for them and the jar costs per request.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=self.max_concurrency, limit_per_host=0, keepalive_timeout=KEEPALIVE_S, ssl=self._ssl
            ),
            timeout=aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=self.connect_timeout_s),
            headers=self._headers,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        assert self._sem is not None
        return self._sem, self._session

    def _abandon(self, session: aiohttp.ClientSession) -> asyncio.Future:
        """Close a session made on another event loop; return the future of that close.

        The current loop cannot await futures of the old one. If the old loop still runs (in another
        thread) the close goes to it. If it is closed, ``close()`` has nothing to await and finishes in one
        step of a task here: the sockets died with that loop, this only marks the pool closed so aiohttp
        does not log "Unclosed connector" when it is collected.
        """
        old = self._loop
        if old is not None and old.is_running() and not old.is_closed():
            fut = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(_close_quietly(session), old))
        else:
            fut = asyncio.get_running_loop().create_task(_close_quietly(session))
        self._closing.add(fut)
        fut.add_done_callback(self._closing.discard)
        return fut

    async def aclose(self) -> None:
        """Close the connection pool (safe to call twice; the client reopens it if used again)."""
        session, self._session = self._session, None
        if session is None or session.closed:
            return
        if self._loop is asyncio.get_running_loop():
            await session.close()
        else:
            await self._abandon(session)

    async def __aenter__(self) -> TeacherClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ stats

    def reset_stats(self) -> None:
        """Zero every counter and forget the latency history."""
        self._counts: dict[str, float] = {
            "requests": 0,
            "sequences": 0,
            "retries": 0,
            "errors": 0,
            "all_endpoints_down": 0,
            "bytes_sent": 0,
            "bytes_received": 0,
        }
        for kind in FAILURE_KINDS:
            self._counts[f"failures_{kind}"] = 0
        self._latencies: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)
        for ep in getattr(self, "_endpoints", []):
            ep.requests = ep.failures = 0

    def stats(self) -> dict[str, float]:
        """Counters since construction or the last ``reset_stats()``.

        Returns:
            A flat dict:

            * ``requests``: HTTP ``/generate`` attempts sent (retries included; a batch is one request);
            * ``sequences``: sequences scored successfully;
            * ``retries``: attempts after the first one of a call;
            * ``failures_{timeout,connection,5xx,4xx,bad_response}``: failed attempts by kind;
            * ``errors``: calls that raised after all retries (or at once);
            * ``all_endpoints_down``: attempts made while every endpoint was in cooldown;
            * ``bytes_sent`` / ``bytes_received``: request / response body bytes of ``/generate`` calls;
            * ``latency_{p50,p99,mean}_s``: end-to-end latency of successful calls (retries included),
              over the last 65,536 calls; 0.0 when there are none.
        """
        out = dict(self._counts)
        if self._latencies:
            lat = np.fromiter(self._latencies, dtype=np.float64, count=len(self._latencies))
            p50, p99 = np.percentile(lat, [50.0, 99.0])
            out.update(latency_p50_s=float(p50), latency_p99_s=float(p99), latency_mean_s=float(lat.mean()))
        else:
            out.update(latency_p50_s=0.0, latency_p99_s=0.0, latency_mean_s=0.0)
        return out

    def endpoint_stats(self) -> dict[str, dict[str, float]]:
        """Per-URL counters: ``requests``, ``failures``, ``healthy`` (1.0 unless in cooldown now).

        Keys are the ``/generate`` URLs with any credentials redacted (``http://***@host:port/generate``).
        """
        now = time.monotonic()
        return {
            ep.shown: {
                "requests": float(ep.requests),
                "failures": float(ep.failures),
                "healthy": float(ep.cooldown_until <= now),
            }
            for ep in self._endpoints
        }

    # ------------------------------------------------------------------ validation (client side)

    def _check_item(self, input_ids: Sequence[int], response_start: int, index: int | None) -> list[int]:
        where = "sequence" if index is None else f"sequence {index}"
        if type(input_ids) is list and set(map(type, input_ids)) <= {int}:  # the common case, without numpy
            ids, lowest = list(input_ids), min(input_ids, default=0)
        else:
            arr = np.asarray(input_ids)
            if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):  # signed or unsigned ints
                raise SampleError(
                    f"{where}: input_ids must be a flat sequence of integer token ids, got array of shape "
                    f"{arr.shape} and dtype {arr.dtype}"
                )
            ids, lowest = arr.astype(np.int64, copy=False).tolist(), int(arr.min()) if arr.size else 0
        n = len(ids)
        rs = int(response_start)
        if rs < 1:
            raise SampleError(
                f"{where}: response_start={rs}, but the teacher prompt cannot be empty: the teacher gives no "
                "log-prob for the first token of a sequence. Start the teacher input with at least one "
                "prompt token (e.g. BOS or the chat template's prefix) so response_start >= 1."
            )
        if rs > n:
            raise SampleError(
                f"{where}: response_start={rs} is past the end of input_ids (len {n}); "
                "it must be <= len(input_ids)"
            )
        if lowest < 0:
            raise SampleError(f"{where}: input_ids contain a negative token id ({lowest})")
        if self.max_input_tokens is not None and n > self.max_input_tokens:
            raise SampleError(
                f"{where}: input has {n} tokens, more than the teacher's limit max_input_tokens="
                f"{self.max_input_tokens}; shorten the prompt/response or raise the teacher's "
                "--context-length (and max_input_tokens). It was not sent."
            )
        return ids

    # ------------------------------------------------------------------ public API

    async def score(self, input_ids: Sequence[int], response_start: int) -> TeacherScores:
        """Score one sequence.

        Args:
            input_ids: the teacher's token ids, prompt then response (list, tuple or 1-D int array).
            response_start: index of the first response token, ``1 <= response_start <= len(input_ids)``.

        Returns:
            TeacherScores with ``len(input_ids) - response_start`` log-probs.

        Raises:
            SampleError: invalid input or longer than ``max_input_tokens`` (nothing is sent).
            TeacherUnavailable, TeacherTimeout, TeacherRequestRejected, TeacherBadResponse: see module doc.
        """
        ids = self._check_item(input_ids, response_start, None)
        return (await self._score_batch([(ids, int(response_start))]))[0]

    async def score_many(self, items: Sequence[tuple[Sequence[int], int]]) -> list[TeacherScores]:
        """Score many sequences concurrently (``max_concurrency`` requests in flight).

        With ``batch_size > 1`` consecutive items are packed into requests of ``batch_size`` sequences.
        Every item is validated before anything is sent.

        Args:
            items: ``(input_ids, response_start)`` pairs.

        Returns:
            One TeacherScores per item, in order. If any request fails for good, its error is raised
            (the other requests still run to completion first).
        """
        checked = [(self._check_item(ids, rs, i), int(rs)) for i, (ids, rs) in enumerate(items)]
        if not checked:
            return []
        chunks = [checked[i : i + self.batch_size] for i in range(0, len(checked), self.batch_size)]
        results = await asyncio.gather(*(self._score_batch(c) for c in chunks), return_exceptions=True)
        out: list[TeacherScores] = []
        for r in results:
            if isinstance(r, BaseException):
                raise r
            out.extend(r)
        return out

    async def health(self) -> dict[str, bool]:
        """GET ``health_path`` on every endpoint; updates the balancer's view.

        Returns:
            ``{generate_url: healthy}`` (URLs as given, credentials included: keys to match ``self.urls``;
            print them with :func:`redact_url`); healthy means HTTP 200 within ``timeout_s``.
        """
        _, http = self._resources()

        paths = [self.health_path] + (["/health"] if self.health_path != "/health" else [])

        async def one(ep: _Endpoint) -> bool:
            ok = False
            for path in paths:  # a server without /health_generate (404) may still have /health
                try:
                    async with http.get(_base_url(ep.url) + path, **ep.via) as r:
                        await r.read()
                        status = r.status
                except (asyncio.TimeoutError, *_NET_ERRORS):
                    break
                ok = status == 200
                if status != 404:
                    break
            if ok:
                self.pool.mark_ok(ep)
            else:
                self.pool.mark_failed(ep, count=False)
            return ok

        oks = await asyncio.gather(*(one(ep) for ep in self._endpoints))
        return {ep.url: ok for ep, ok in zip(self._endpoints, oks, strict=True)}

    async def model_info(self) -> dict:
        """``/model_info`` (falls back to ``/get_model_info``) of the first endpoint that answers."""
        return await self._get_info(("/model_info", "/get_model_info"))

    async def server_info(self) -> dict:
        """``/server_info`` (falls back to ``/get_server_info``) of the first endpoint that answers.

        On an SGLang worker it holds ``context_length`` and ``max_req_input_len`` (use the latter as
        ``max_input_tokens``). Behind a router it is the router's own info, without those keys.
        """
        return await self._get_info(("/server_info", "/get_server_info"))

    # ------------------------------------------------------------------ internals

    async def _get_info(self, paths: tuple[str, ...]) -> dict:
        _, http = self._resources()
        problems = []
        for ep in self.pool.ordered():
            for path in paths:
                url = _base_url(ep.url) + path
                shown = redact_url(url)
                try:
                    async with http.get(url, **ep.via) as r:
                        status, content = r.status, await r.read()
                except (asyncio.TimeoutError, *_NET_ERRORS) as e:
                    problems.append(redact_url(f"{shown}: {type(e).__name__}: {e}"))
                    break  # endpoint unreachable: try the next one
                if status == 200:
                    try:
                        data = _loads(content)
                    except ValueError:
                        problems.append(f"{shown}: answer is not JSON")
                        continue
                    if isinstance(data, dict):
                        return data
                    problems.append(f"{shown}: answer is not a JSON object")
                elif status in (401, 403):
                    raise TeacherRequestRejected(
                        f"{shown} answered {status}: {parse_error_message(content)} (check api_key)"
                    )
                else:
                    problems.append(f"{shown}: HTTP {status}")
        raise TeacherUnavailable(
            "no teacher endpoint answered " + " or ".join(paths) + ": " + "; ".join(problems)
        )

    async def _score_batch(self, items: list[tuple[list[int], int]]) -> list[TeacherScores]:
        """Send one request for ``items`` with retries (see :class:`RetryPolicy`); return validated scores."""
        body = _dumps(build_request(items, self.top_logprobs, self.temperature))
        sem, http = self._resources()
        t0 = time.perf_counter()
        tried: set[str] = set()
        attempts = 0
        first_failure: float | None = None
        while True:
            ep, all_down = self.pool.pick(tried)
            self._counts["all_endpoints_down"] += all_down
            tried.add(ep.url)
            attempts += 1
            if attempts > 1:
                self._counts["retries"] += 1
            try:
                async with sem:
                    content = await self._post(http, ep, body)
                candidates = sum(len(ids) - start for ids, start in items) * self.top_logprobs
                if candidates > OFFLOAD_ENTRIES or len(content) > OFFLOAD_BYTES:
                    loop = asyncio.get_running_loop()
                    parsed = await loop.run_in_executor(
                        self.executor, _decode_answer, content, items, self.top_logprobs, ep.shown
                    )
                else:
                    parsed = _decode_answer(content, items, self.top_logprobs, ep.shown)
            except _AttemptFailed as e:
                self._counts[f"failures_{e.kind}"] += 1
                if e.kind != "4xx" and e.kind != "bad_response":
                    self.pool.mark_failed(ep)
                first_failure = time.perf_counter() if first_failure is None else first_failure
                retryable = e.retryable or (e.kind == "bad_response" and self.retry_bad_responses)
                if not retryable:
                    raise self._give_up(e, items, attempts, tried, t0, "") from None
                delay, why = self.retry_policy.next_delay(
                    attempts - 1, time.perf_counter() - first_failure, e.retry_after, self._rng
                )
                if delay is None:
                    raise self._give_up(e, items, attempts, tried, t0, why) from None
                # Fail over at once when another healthy endpoint exists; back off otherwise.
                if not self.pool.has_fresh(tried):
                    logger.debug("teacher %s failed (%s); retry %d in %.2fs", ep.shown, e, attempts, delay)
                    await asyncio.sleep(delay)
                continue
            self.pool.mark_ok(ep)
            latency = time.perf_counter() - t0
            self._latencies.append(latency)
            self._counts["sequences"] += len(items)
            return [
                TeacherScores(
                    log_probs=lp, top_log_probs=top, latency_s=latency, attempts=attempts, url=ep.shown,
                    temperature=applied,
                )
                for lp, top, applied in parsed
            ]

    def _give_up(
        self, last: _AttemptFailed, items: list, attempts: int, tried: set[str], t0: float, why: str
    ) -> TeacherError:
        """The error a call ends with: what failed, after how many attempts, and why it stopped there."""
        self._counts["errors"] += 1
        latency = time.perf_counter() - t0
        n = len(items)
        what = "1 sequence" if n == 1 else f"a batch of {n} sequences"
        count = {"attempts": attempts, "latency_s": latency}
        if not why:  # not retryable
            if last.kind == "bad_response":
                return TeacherBadResponse(
                    f"{last} (not retried: a wrong answer means a misconfigured server, not a passing fault)",
                    **count,
                )
            return TeacherRequestRejected(
                f"{last} (scoring {what}; not retried: HTTP {last.status} means the server refused this "
                "request itself, so it would refuse it again)",
                **count,
            )
        shown = sorted(redact_url(u) for u in tried)
        summary = (
            f"scoring {what} failed after {attempts} attempt(s) in {latency:.1f}s over {shown} (stopped: {why}; "
            f"xvocab_retry_budget_s / retry_budget_s sets how long faults are ridden through); last error: {last}"
        )
        if last.kind == "timeout":
            return TeacherTimeout(
                f"{summary}. The teacher did not answer within timeout_s={self.timeout_s}; raise timeout_s, "
                "lower max_concurrency/batch_size, or add teacher replicas.",
                **count,
            )
        if last.status in RETRY_STATUSES or last.status == 503:
            hint = "The teacher is overloaded: add replicas, or lower xvocab_max_concurrency."
        else:
            hint = f"Check that the teacher is up (GET {_base_url(redact_url(sorted(tried)[0]))}/health_generate)."
        return TeacherUnavailable(f"{summary}. {hint}", **count)

    async def _post(self, http: aiohttp.ClientSession, ep: _Endpoint, body: bytes) -> bytes:
        """One HTTP attempt; returns the body of a 200 answer or raises _AttemptFailed."""
        ep.requests += 1
        self._counts["requests"] += 1
        self._counts["bytes_sent"] += len(body)
        try:
            async with http.post(ep.yurl, data=body, **ep.via) as r:
                status = r.status
                content = await r.read()
                retry_after_header = r.headers.get("Retry-After") if status != 200 else None
        except asyncio.TimeoutError as e:  # before _NET_ERRORS: aiohttp's timeouts are ClientErrors too
            raise _AttemptFailed(
                "timeout", f"{ep.shown}: no answer within {self.timeout_s}s ({type(e).__name__})", True
            ) from None
        except _NET_ERRORS as e:
            detail = redact_url(f"{type(e).__name__}: {e or 'connection failed'}")
            raise _AttemptFailed("connection", f"{ep.shown}: {detail}", True) from None
        self._counts["bytes_received"] += len(content)
        if status != 200:
            msg = redact_url(parse_error_message(content))
            retry_after = _retry_after(retry_after_header)
            if status >= 500:
                raise _AttemptFailed("5xx", f"{ep.shown} answered HTTP {status}: {msg}", True, retry_after, status)
            if status in RETRY_STATUSES:
                raise _AttemptFailed("4xx", f"{ep.shown} answered HTTP {status}: {msg}", True, retry_after, status)
            raise _AttemptFailed(
                "4xx", f"{ep.shown} rejected the request with HTTP {status}: {msg}{_hint(status, msg)}", False,
                status=status,
            )
        return content


def _decode_answer(
    content: bytes, items: list[tuple[list[int], int]], top_k: int, shown: str
) -> list[tuple[np.ndarray, Any, float]]:
    """Decode and validate one answer body (pure CPU: run on the loop or in a worker); a body that is not
    JSON or not a valid answer raises ``_AttemptFailed("bad_response")``."""
    with collector_paused():  # the decoded answer is dropped before any collection can see it
        try:
            data = _loads(content)
        except ValueError:
            snippet = content[:200].decode("utf-8", "replace")
            raise _AttemptFailed(
                "bad_response", f"teacher {shown} answered 200 with a body that is not JSON: {snippet!r}", False
            ) from None
        try:
            return parse_answer(data, items, top_k)
        except BadAnswer as e:
            raise _bad(shown, e) from None
        finally:
            del data


async def _close_quietly(session: aiohttp.ClientSession) -> None:
    with contextlib.suppress(Exception):
        await session.close()


def _env_proxy(url: str) -> dict[str, Any]:
    """aiohttp request arguments that send ``url`` through the environment's proxy (``{}``: no proxy).

    Reads ``HTTP_PROXY``/``HTTPS_PROXY`` and ``NO_PROXY`` like urllib. Credentials in the proxy URL become
    ``Proxy-Authorization``: a header of the request itself for an ``http://`` target (the request goes to
    the proxy as is), a header of the ``CONNECT`` for an ``https://`` target.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.hostname and urllib.request.proxy_bypass(parts.hostname):
        return {}
    proxy = urllib.request.getproxies().get(parts.scheme)
    if not proxy:
        return {}
    purl = URL(proxy)
    if purl.user is None:
        return {"proxy": proxy}
    auth = {"Proxy-Authorization": aiohttp.BasicAuth(purl.user, purl.password or "").encode()}
    where = "proxy_headers" if parts.scheme == "https" else "headers"
    return {"proxy": str(purl.with_user(None)), where: auth}


_CONTEXT_WORDS = ("context length", "context_length", "context window", "too long", "longer than", "max_req_input_len")


def _hint(status: int, message: str) -> str:
    """What to do about a refused request, when the status or the server's message tells."""
    if status in (401, 403):
        return " (check api_key / XVOCAB_API_KEY)"
    if any(w in message.lower() for w in _CONTEXT_WORDS):
        return (
            " (the teacher's context is too short for this sequence: set xvocab_max_teacher_tokens, or "
            "max_input_tokens, to the teacher's max_req_input_len so longer teacher views are cut before sending)"
        )
    return ""


def _ssl_option(ca_bundle: str | None, verify_tls: bool) -> Any:
    """The ``ssl=`` argument of the connector: True (system store), False (no verification) or a context."""
    if not verify_tls:
        return False
    if not ca_bundle:
        return True
    import ssl

    try:
        return ssl.create_default_context(cafile=ca_bundle)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(
            f"ca_bundle={ca_bundle!r} cannot be used: {type(e).__name__}: {e} (give a readable PEM file of CA "
            "certificates)"
        ) from None


def _bad(url: str, e: BadAnswer) -> _AttemptFailed:
    where = "the answer" if e.n_items == 1 else f"answer item {e.index}"
    return _AttemptFailed(
        "bad_response",
        f"teacher {url} returned an invalid scoring answer ({where}): {e.what}. "
        "Is this an SGLang /generate endpoint started without --allow-auto-truncate?",
        False,
    )


def _retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait: delay-seconds or an HTTP date (None if unreadable)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    import email.utils

    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


# ---------------------------------------------------------------------- sync wrapper


class SyncTeacherClient:
    """Blocking wrapper: the same surface as :class:`TeacherClient`, for code without an event loop.

    It runs one private event loop in a daemon thread and submits every call to it, so it is safe to use
    from any thread (including from inside a running event loop's thread, which ``asyncio.run`` is not)
    and it keeps the connection pool alive across calls.

    Args:
        urls, **kwargs: as for :class:`TeacherClient`.
    """

    def __init__(self, urls: str | Sequence[str], **kwargs: Any) -> None:
        self.client = TeacherClient(urls, **kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="teacher-client-loop", daemon=True
        )
        self._thread.start()
        self._closed = False

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise RuntimeError("SyncTeacherClient is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def score(self, input_ids: Sequence[int], response_start: int) -> TeacherScores:
        """Blocking :meth:`TeacherClient.score`."""
        return self._run(self.client.score(input_ids, response_start))

    def score_many(self, items: Sequence[tuple[Sequence[int], int]]) -> list[TeacherScores]:
        """Blocking :meth:`TeacherClient.score_many`."""
        return self._run(self.client.score_many(items))

    def health(self) -> dict[str, bool]:
        """Blocking :meth:`TeacherClient.health`."""
        return self._run(self.client.health())

    def model_info(self) -> dict:
        """Blocking :meth:`TeacherClient.model_info`."""
        return self._run(self.client.model_info())

    def server_info(self) -> dict:
        """Blocking :meth:`TeacherClient.server_info`."""
        return self._run(self.client.server_info())

    def stats(self) -> dict[str, float]:
        """:meth:`TeacherClient.stats`."""
        return self.client.stats()

    def endpoint_stats(self) -> dict[str, dict[str, float]]:
        """:meth:`TeacherClient.endpoint_stats`."""
        return self.client.endpoint_stats()

    def reset_stats(self) -> None:
        """:meth:`TeacherClient.reset_stats`."""
        self.client.reset_stats()

    def close(self) -> None:
        """Close the pool and stop the loop thread (idempotent)."""
        if self._closed:
            return
        try:
            asyncio.run_coroutine_threadsafe(self.client.aclose(), self._loop).result(timeout=10)
        finally:
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> SyncTeacherClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # best effort: do not leave a thread behind
        if not getattr(self, "_closed", True):
            try:
                self._loop.call_soon_threadsafe(self._loop.stop)
            except RuntimeError:
                pass
