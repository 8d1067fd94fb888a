"""The start-up probe against a real HTTP server on loopback (the scripted SGLang look-alike)."""

from __future__ import annotations

import asyncio
import time

import pytest
from test_teacher_client import FaultServer

from slime_xvocab.errors import ConfigError, TeacherUnavailable
from slime_xvocab.probe import check_server_info, probe_teacher
from slime_xvocab.teacher_client import TeacherClient


@pytest.fixture
def server():
    s = FaultServer()
    yield s
    s.close()


def run_probe(url: str, **kw) -> dict:
    async def main():
        async with TeacherClient(url, timeout_s=2.0, trust_env=False) as client:
            return await probe_teacher(client, **kw)

    return asyncio.run(main())


def test_check_server_info_compares_vocab_and_context():
    info = {"max_req_input_len": 4096, "context_length": 4097, "vocab_size": 1000, "model_path": "/m/teacher"}
    assert check_server_info(info, teacher_vocab_size=1000, max_teacher_tokens=4096) == ([], [])
    problems, _ = check_server_info(info, teacher_vocab_size=1001, max_teacher_tokens=4096)
    assert "1001 tokens but the teacher server's model (/m/teacher) has a vocabulary of 1000" in problems[0]
    problems, _ = check_server_info(info, teacher_vocab_size=10, max_teacher_tokens=8192)
    assert "xvocab_max_teacher_tokens=8192 is more than the teacher accepts" in problems[0]
    problems, advice = check_server_info(info, teacher_vocab_size=10, max_teacher_tokens=None)
    assert problems == [] and "set xvocab_max_teacher_tokens: 4096" in advice[0]
    assert check_server_info({"model_path": "router"}, teacher_vocab_size=10, max_teacher_tokens=9) == ([], [])


def test_probe_passes_a_healthy_teacher_and_reads_its_limits(server):
    result = run_probe(server.url, teacher_vocab_size=10, max_teacher_tokens=57, wait_s=1.0)
    assert result["healthy"] == [server.url + "/generate"] and result["server_info"]["max_req_input_len"] == 57
    with pytest.raises(ConfigError, match="xvocab_max_teacher_tokens=58 is more than the teacher accepts"):
        run_probe(server.url, teacher_vocab_size=10, max_teacher_tokens=58, wait_s=1.0)
    assert server.requests == 0  # the probe never sends a /generate


def test_probe_fails_fast_when_the_teacher_stays_down(server):
    server.default = "down"  # /health_generate answers 503
    t0 = time.monotonic()
    with pytest.raises(TeacherUnavailable, match=r"start-up probe: no teacher endpoint answered /health_generate"):
        run_probe(server.url, teacher_vocab_size=10, max_teacher_tokens=None, wait_s=0.5, poll_s=0.1)
    assert 0.5 <= time.monotonic() - t0 < 3


def test_probe_waits_for_a_teacher_that_comes_up(server):
    server.default = "down"

    async def main():
        async with TeacherClient(server.url, timeout_s=2.0, trust_env=False) as client:
            asyncio.get_running_loop().call_later(0.4, setattr, server, "default", "ok")
            return await probe_teacher(client, teacher_vocab_size=10, max_teacher_tokens=None, wait_s=5, poll_s=0.1)

    assert asyncio.run(main())["healthy"]
