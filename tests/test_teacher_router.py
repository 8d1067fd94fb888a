"""The real sglang-router in front of two reference teacher servers: spreading load and surviving a crash."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("sglang_router")
torch = pytest.importorskip("torch")

from test_teacher_server import make_tiny_llama, token_log_probs  # noqa: E402

from slime_xvocab.teacher_client import TeacherClient  # noqa: E402
from slime_xvocab.teacher_server import free_port, start_teacher_server  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("router_llama")
    make_tiny_llama(path, 512, seed=3)
    return path


def start_router(worker_urls: list[str], timeout_s: float = 60.0):
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="router-", suffix=".log", delete=False)
    cmd = [
        sys.executable,
        "-m",
        "sglang_router.launch_router",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--worker-urls",
        *worker_urls,
        "--policy",
        "round_robin",
        "--health-check-interval-secs",
        "1",
    ]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "NO_PROXY": "*"})
    log.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("router exited:\n" + Path(log.name).read_text()[-3000:])
        try:
            r = httpx.get(url + "/readiness", timeout=2, trust_env=False)
            if r.status_code == 200 and r.json().get("healthy_workers") == len(worker_urls):
                return proc, url, log.name
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("router not ready:\n" + Path(log.name).read_text()[-3000:])


def generate_count(url: str) -> int:
    return int(httpx.get(url + "/server_info", timeout=10, trust_env=False).json()["num_generate_requests"])


def test_router_spreads_load_and_survives_a_worker_crash(model_dir):
    from transformers import AutoModelForCausalLM

    ref_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    items = [
        (rng.integers(0, 512, size=int(n)).tolist(), int(rs))
        for n, rs in zip(rng.integers(8, 40, size=60), rng.integers(1, 8, size=60), strict=True)
    ]
    refs = [token_log_probs(ref_model, ids)[rs:] for ids, rs in items]

    with start_teacher_server(model_dir) as s1, start_teacher_server(model_dir) as s2:
        proc, router_url, log_path = start_router([s1.url, s2.url])
        try:
            client = TeacherClient(
                router_url, timeout_s=30, max_retries=4, backoff_s=0.2, max_concurrency=4, trust_env=False
            )

            async def phase1():
                return await client.score_many(items[:20])

            out1 = asyncio.run(phase1())
            c1, c2 = generate_count(s1.url), generate_count(s2.url)
            assert c1 + c2 == 20 and c1 >= 5 and c2 >= 5, (c1, c2)  # round robin spread both ways

            async def phase2():
                task = asyncio.ensure_future(client.score_many(items[20:]))
                while generate_count(s2.url) < c2 + 5:  # kill s2 while requests are flowing
                    await asyncio.sleep(0.02)
                s2.kill()
                return await task

            out2 = asyncio.run(phase2())
            for o, ref in zip(out1 + out2, refs, strict=True):  # no sample lost, every one correct
                np.testing.assert_allclose(o.log_probs, ref, atol=1e-5)
            assert not s2.alive() and generate_count(s1.url) > c1
            st = client.stats()
            print("client stats after the crash:", st)
            assert st["sequences"] == 60 and st["errors"] == 0
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_router_takes_a_scalar_start_and_drops_input_logprob_temperature(model_dir):
    """What the router's typed request allows: a batch only with one ``logprob_start_len`` (a list gets 422),
    and no ``input_logprob_temperature`` (dropped, so the answer says T = 1 and the hooks warn)."""
    from transformers import AutoModelForCausalLM

    from slime_xvocab.errors import TeacherRequestRejected
    from slime_xvocab.teacher_client import SyncTeacherClient

    ref_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    same_start = [([3, 14, 15, 92, 65, 35], 3), ([8, 9, 7, 9, 3, 2, 3, 8], 3)]
    with start_teacher_server(model_dir) as worker:
        proc, router_url, _ = start_router([worker.url])
        try:
            with SyncTeacherClient(router_url, batch_size=2, max_retries=0, trust_env=False) as c:
                for o, (ids, rs) in zip(c.score_many(same_start), same_start, strict=True):
                    np.testing.assert_allclose(o.log_probs, token_log_probs(ref_model, ids)[rs:], atol=1e-5)
                with pytest.raises(TeacherRequestRejected, match="422"):
                    c.score_many([same_start[0], (same_start[1][0], 4)])
            with SyncTeacherClient(router_url, temperature=2.0, trust_env=False) as c:
                assert c.score(*same_start[0]).temperature == 1.0  # the router dropped the option
            with SyncTeacherClient(worker.url, temperature=2.0, trust_env=False) as c:
                assert c.score(*same_start[0]).temperature == 2.0  # the worker itself applies it
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
