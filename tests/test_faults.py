"""Fault suite: the hooks behind a fault-injecting proxy in front of the real reference teacher server.

The proxy (aiohttp on 127.0.0.1, in a thread) forwards ``/generate``, ``/health*`` and ``/server_info`` to a
reference teacher server subprocess and injects one fault per scenario: 5xx bursts, an outage, 429 with
Retry-After, connection resets, slow answers, malformed or wrong answers, a 400 about the context length.
It counts what it saw. For every scenario:

* every sample ends either with the fault-free teacher values (correct) or as a counted fallback;
* the rollout metrics equal the proxy's counts: ``teacher_requests`` = requests seen,
  ``teacher_retries`` = requests - samples sent, ``teacher_attempt_failures/<kind>`` = faults injected of
  that kind, ``failures/<reason>`` + ``fallback_samples`` = samples that fell back.

Bounded: 8 samples per scenario, retry budgets of a few seconds, one teacher subprocess for the module
(stopped by its handle). ``SLIME_XVOCAB_FAULT_TABLE=path`` writes the markdown table of docs/troubleshooting.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from loopback import LoopbackApp
from slime_standin import Sample
from test_hooks import logged, rollout, run_rollout, teacher, teacher_dir, xargs  # noqa: F401 (fixtures)

from slime_xvocab import hooks

N_SAMPLES = 8


class FaultProxy:
    """Forwards to ``upstream``; ``plan[i]`` is the fault of the i-th ``/generate`` request (then "ok")."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.plan: list[str] = []
        self.outage_until = 0.0
        self.requests = 0
        self.injected: Counter = Counter()  # attempt-failure kind -> faults injected
        self._app = LoopbackApp(self._routes, client_max_size=64 * 1024 * 1024)
        self.url = self._app.url

    def reset(self, plan: list[str] | None = None, outage_s: float = 0.0) -> None:
        self.plan = list(plan or [])
        self.outage_until = time.monotonic() + outage_s if outage_s else 0.0
        self.requests = 0
        self.injected = Counter()

    def _routes(self, app: web.Application) -> None:
        app.router.add_post("/generate", self._generate)
        app.router.add_get("/{tail:.*}", self._forward_get)

    def close(self) -> None:
        self._app.close()

    async def _upstream(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        async with aiohttp.ClientSession() as http:
            headers = {"Content-Type": "application/json"} if body is not None else None
            async with http.request(method, self.upstream + path, data=body, headers=headers) as r:
                return r.status, await r.read()

    async def _forward_get(self, request: web.Request) -> web.Response:
        status, content = await self._upstream("GET", request.path)
        return web.Response(status=status, body=content, content_type="application/json")

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests += 1
        fault = self.plan.pop(0) if self.plan else "ok"
        if time.monotonic() < self.outage_until:
            fault = "503"
        if fault in ("500", "503"):
            self.injected["5xx"] += 1
            return web.json_response({"error": {"message": "injected"}}, status=int(fault))
        if fault == "429":
            self.injected["4xx"] += 1
            return web.json_response({"error": "slow down"}, status=429, headers={"Retry-After": "0.2"})
        if fault == "400_context":
            self.injected["4xx"] += 1
            msg = "The input (9000 tokens) is longer than the model's context length (8192 tokens)."
            return web.json_response({"object": "error", "message": msg, "code": 400}, status=400)
        if fault == "reset":
            self.injected["connection"] += 1
            request.transport.abort()
            return web.Response(status=200)
        if fault == "html":
            self.injected["bad_response"] += 1
            return web.Response(status=200, text="<html>502 Bad Gateway</html>", content_type="text/html")
        if fault == "slow":
            self.injected["timeout"] += 1
            await asyncio.sleep(3.0)
        status, content = await self._upstream("POST", "/generate", body)
        if fault in ("truncated", "wrong_ids", "positive", "null"):
            self.injected["bad_response"] += 1
            content = json.dumps(_corrupt(json.loads(content), fault)).encode()
        return web.Response(status=status, body=content, content_type="application/json")


def _corrupt(answer: dict, fault: str) -> dict:
    itl = answer["meta_info"]["input_token_logprobs"]
    if fault == "truncated":
        del itl[-1]
    elif fault == "wrong_ids":
        itl[-1][1] += 1
    elif fault == "positive":
        itl[-1][0] = 0.5
    elif fault == "null":
        itl[-1][0] = None
    return answer


@dataclass
class Scenario:
    name: str
    plan: list[str] = field(default_factory=list)
    outage_s: float = 0.0
    overrides: dict = field(default_factory=dict)
    bad_samples: int = 0  # samples given rollout_log_probs=None (an input fault, not a transport one)
    expect_failed: int = 0
    expect_reason: str | None = None
    what: str = ""


SCENARIOS = [
    Scenario("no fault", what="scored"),
    Scenario("500 burst (first 6 requests)", plan=["500"] * 6, what="retried, all scored"),
    Scenario("503 outage of 4 s (the blip that stopped training)", outage_s=4.0,
             what="ridden through within xvocab_retry_budget_s"),
    Scenario(
        "teacher down for good (503)", outage_s=60.0, overrides={"xvocab_retry_budget_s": 1.0},
        expect_failed=N_SAMPLES, expect_reason="teacher_unavailable",
        what="retried for the budget, then fallback; retries counted",
    ),
    Scenario("429 + Retry-After: 0.2 (4 requests)", plan=["429"] * 4, what="waits Retry-After, retried"),
    Scenario("connection reset (4 requests)", plan=["reset"] * 4, what="retried"),
    Scenario(
        "slow answer > timeout (2 requests)", plan=["slow"] * 2, overrides={"xvocab_timeout_s": 1.0},
        what="timed out, retried",
    ),
    Scenario(
        "HTML body with 200 (2 requests)", plan=["html"] * 2, expect_failed=2,
        expect_reason="teacher_bad_response", what="not retried, fallback",
    ),
    Scenario(
        "truncated / wrong ids / positive / null log-prob", plan=["truncated", "wrong_ids", "positive", "null"],
        expect_failed=4, expect_reason="teacher_bad_response", what="not retried, fallback",
    ),
    Scenario(
        "400 context length (2 requests)", plan=["400_context"] * 2, expect_failed=2,
        expect_reason="teacher_rejected", what="not retried, fallback; error names xvocab_max_teacher_tokens",
    ),
    Scenario(
        "rollout_log_probs None (1 sample)", bad_samples=1, expect_failed=1, expect_reason="invalid_sample",
        what="not sent, fallback",
    ),
]
RESULTS: list[dict] = []


@pytest.fixture(scope="module")
def proxy(teacher):  # noqa: F811 (the fixture imported from test_hooks)
    p = FaultProxy(teacher.url)
    yield p
    p.close()


@pytest.fixture(scope="module")
def baseline(teacher):  # noqa: F811
    """The fault-free teacher values of every sample, straight from the server."""
    hooks.reset()
    samples = run_rollout(xargs(teacher.url), rollout(Sample, N_SAMPLES))
    hooks.reset()
    return [s.teacher_log_probs.numpy().copy() for s in samples]


def fault_args(url: str, **overrides):
    values = {
        "xvocab_max_retries": None,  # the budget alone bounds retries
        "xvocab_retry_budget_s": 10.0,
        "xvocab_max_failed_fraction": 1.0,
        "xvocab_timeout_s": 10.0,
        **overrides,
    }
    return xargs(url, **values)


@pytest.mark.parametrize("sc", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_fault(sc: Scenario, proxy, baseline, caplog):
    caplog.set_level(logging.INFO, logger="slime_xvocab.hooks")
    hooks.reset()
    args = fault_args(proxy.url, **sc.overrides)
    samples = rollout(Sample, N_SAMPLES)
    for s in samples[: sc.bad_samples]:
        s.rollout_log_probs = None
    proxy.reset(sc.plan, sc.outage_s)
    t0 = time.monotonic()
    samples = run_rollout(args, samples)
    took = time.monotonic() - t0
    hooks.log_rollout_data(0, args, samples, None, 0.0)
    metrics = {k.removeprefix("rollout/xvocab/"): v for k, v in logged(caplog, "rollout").items()}
    hooks.post_process_rewards(args, samples)
    post = {k.removeprefix("rollout/xvocab/"): v for k, v in logged(caplog, "post-process").items()}

    failed = [s for s in samples if s.metadata["xvocab"]["failed"]]
    for s, expected in zip(samples, baseline, strict=True):  # every sample: correct or counted
        assert len(s.teacher_log_probs) == s.response_length
        if not s.metadata["xvocab"]["failed"]:
            np.testing.assert_allclose(s.teacher_log_probs.numpy(), expected, rtol=0, atol=1e-6)
    assert len(failed) == sc.expect_failed
    assert post["fallback_samples"] == metrics["teacher_failures"] == sc.expect_failed
    if sc.expect_reason:
        assert metrics[f"failures/{sc.expect_reason}"] == sc.expect_failed
    sent = N_SAMPLES - sc.bad_samples  # samples that reached the teacher (one call each)
    assert metrics["teacher_requests"] == proxy.requests
    assert metrics["teacher_retries"] == proxy.requests - sent
    for kind in ("5xx", "4xx", "connection", "timeout", "bad_response"):
        assert metrics[f"teacher_attempt_failures/{kind}"] == proxy.injected[kind], kind
    if sc.expect_reason == "teacher_rejected":
        assert all("xvocab_max_teacher_tokens" in s.metadata["xvocab"]["error"] for s in failed)
    assert took < 30

    RESULTS.append(
        {
            "fault": sc.name,
            "requests": proxy.requests,
            "injected": sum(proxy.injected.values()),
            "retries": int(metrics["teacher_retries"]),
            "scored": N_SAMPLES - len(failed),
            "fell back": len(failed),
            "reason": sc.expect_reason or "—",
            "what the plugin does": sc.what,
        }
    )
    if len(RESULTS) == len(SCENARIOS):
        table = fault_table(RESULTS)
        print("\n" + table)
        if os.environ.get("SLIME_XVOCAB_FAULT_TABLE"):
            with open(os.environ["SLIME_XVOCAB_FAULT_TABLE"], "w") as f:
                f.write(table)


def fault_table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


@pytest.mark.slow
def test_replica_killed_behind_sglang_router(teacher_dir, baseline, caplog):  # noqa: F811
    """proxy -> sglang-router -> two reference teachers; one replica is SIGKILLed mid-rollout."""
    pytest.importorskip("sglang_router")
    import subprocess

    from test_teacher_router import generate_count, start_router

    from slime_xvocab.teacher_server import start_teacher_server

    caplog.set_level(logging.INFO, logger="slime_xvocab.hooks")
    with start_teacher_server(teacher_dir) as s1, start_teacher_server(teacher_dir) as s2:
        proc, router_url, _ = start_router([s1.url, s2.url])
        proxy = FaultProxy(router_url)
        try:
            hooks.reset()
            args = fault_args(proxy.url)
            samples = rollout(Sample, N_SAMPLES) + rollout(Sample, N_SAMPLES)  # the same 8 twice: 16 requests
            for k, s in enumerate(samples):
                s.index = k

            def killer():
                deadline = time.monotonic() + 60
                while generate_count(s2.url) < 2 and time.monotonic() < deadline:
                    time.sleep(0.01)
                s2.kill()

            thread = threading.Thread(target=killer, daemon=True)
            thread.start()
            samples = run_rollout(args, samples)
            thread.join(60)
            hooks.log_rollout_data(0, args, samples, None, 0.0)
            metrics = {k.removeprefix("rollout/xvocab/"): v for k, v in logged(caplog, "rollout").items()}
        finally:
            proxy.close()
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    assert not s2.alive()
    for s, expected in zip(samples, baseline + baseline, strict=True):
        if not s.metadata["xvocab"]["failed"]:
            np.testing.assert_allclose(s.teacher_log_probs.numpy(), expected, rtol=0, atol=1e-6)
    failed = sum(s.metadata["xvocab"]["failed"] for s in samples)
    errors = Counter(s.metadata["xvocab"]["error"][:300] for s in samples if s.metadata["xvocab"]["failed"])
    assert metrics["teacher_failures"] == failed == 0, errors  # the router and the retry budget ride through
    assert metrics["teacher_requests"] == proxy.requests and metrics["teacher_retries"] == proxy.requests - 16
    print(f"\nreplica kill behind sglang-router: {proxy.requests} requests, {int(metrics['teacher_retries'])} "
          f"retries, 16 scored, {failed} fell back")
