"""Start-up probe: is the teacher there, and does it fit the tokenizer and the context limit?

The reward hook runs :func:`probe_teacher` once per process, on its first call (``xvocab_startup_probe``), so a
teacher that is down, serves another model, or has a shorter context than ``xvocab_max_teacher_tokens``
stops the run with one clear error instead of a rollout of fallbacks:

* every endpoint is polled on ``/health_generate`` (``/health`` where that answers 404) until one is healthy
  or ``wait_s`` has passed: :class:`~slime_xvocab.errors.TeacherUnavailable` otherwise;
* where ``/server_info`` (``/get_server_info``) tells them, the teacher's ``vocab_size`` must hold every
  token of the teacher tokenizer and ``max_req_input_len`` (else ``context_length``) must be at least
  ``xvocab_max_teacher_tokens``: :class:`~slime_xvocab.errors.ConfigError` otherwise. A server that tells
  neither (a router answering with its own info) passes; the check is then done by the requests themselves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from .errors import ConfigError, TeacherError, TeacherUnavailable
from .urls import redact_url

__all__ = ["probe_teacher", "check_server_info"]

logger = logging.getLogger(__name__)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def check_server_info(
    info: Mapping[str, Any], *, teacher_vocab_size: int, max_teacher_tokens: int | None
) -> tuple[list[str], list[str]]:
    """Compare what the teacher server says about itself with the plugin's settings (pure).

    Args:
        info: the server's ``/server_info`` answer.
        teacher_vocab_size: ``len(teacher_tokenizer)`` (added tokens included).
        max_teacher_tokens: ``xvocab_max_teacher_tokens`` (None: no limit set).

    Returns:
        ``(problems, advice)``: problems stop the run; advice is logged as a warning.
    """
    problems, advice = [], []
    limit = _int(info.get("max_req_input_len")) or _int(info.get("context_length"))
    vocab = _int(info.get("vocab_size"))
    model = info.get("model_path") or info.get("served_model_name") or "?"
    if vocab is not None and teacher_vocab_size > vocab:
        problems.append(
            f"the teacher tokenizer has {teacher_vocab_size} tokens but the teacher server's model ({model}) has a "
            f"vocabulary of {vocab}: xvocab_teacher_tokenizer must be the tokenizer the teacher server runs"
        )
    if limit is not None and max_teacher_tokens is not None and max_teacher_tokens > limit:
        problems.append(
            f"xvocab_max_teacher_tokens={max_teacher_tokens} is more than the teacher accepts "
            f"(max_req_input_len/context_length {limit} from /server_info): set xvocab_max_teacher_tokens: {limit} "
            "or start the teacher with a longer --context-length"
        )
    if limit is not None and max_teacher_tokens is None:
        advice.append(
            f"the teacher accepts at most {limit} input tokens and xvocab_max_teacher_tokens is not set: a longer "
            f"teacher view is rejected (the sample falls back); set xvocab_max_teacher_tokens: {limit} to cut it "
            "instead"
        )
    return problems, advice


async def probe_teacher(
    client: Any,
    *,
    teacher_vocab_size: int,
    max_teacher_tokens: int | None,
    wait_s: float,
    poll_s: float = 1.0,
) -> dict[str, Any]:
    """Check the teacher once before the first sample is scored.

    Args:
        client: the hooks' :class:`~slime_xvocab.teacher_client.TeacherClient`.
        teacher_vocab_size: ``len(teacher_tokenizer)``.
        max_teacher_tokens: ``xvocab_max_teacher_tokens``.
        wait_s: how long to wait for a healthy endpoint (the retry budget: a teacher restarting right now
            is waited for, as a request would be).
        poll_s: seconds between health polls.

    Returns:
        What was learnt: ``healthy`` (redacted URLs), ``server_info`` (dict or None), ``advice``.

    Raises:
        TeacherUnavailable: no endpoint became healthy within ``wait_s``.
        ConfigError: the server's vocabulary or context does not fit the settings.
    """
    deadline = time.monotonic() + wait_s
    while True:
        health = await client.health()
        healthy = [redact_url(u) for u, ok in health.items() if ok]
        if healthy or time.monotonic() >= deadline:
            break
        await asyncio.sleep(max(0.0, min(poll_s, deadline - time.monotonic())))
    if not healthy:
        urls = ", ".join(redact_url(u) for u in health)
        raise TeacherUnavailable(
            f"start-up probe: no teacher endpoint answered {client.health_path} (or /health) within {wait_s:g}s "
            f"(xvocab_retry_budget_s): {urls}. Start the teacher (scripts/launch_teacher.sh), fix "
            "xvocab_teacher_urls, or set xvocab_startup_probe: false to score anyway."
        )
    try:
        info = await client.server_info()
    except TeacherError as exc:  # a router without /server_info: the requests will tell
        logger.info("slime-xvocab start-up probe: no server info (%s)", exc)
        info = None
    problems, advice = ([], []) if info is None else check_server_info(
        info, teacher_vocab_size=teacher_vocab_size, max_teacher_tokens=max_teacher_tokens
    )
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"slime-xvocab start-up probe of the teacher failed:\n{lines}")
    for line in advice:
        logger.warning("slime-xvocab: %s", line)
    return {"healthy": healthy, "server_info": info, "advice": advice}
