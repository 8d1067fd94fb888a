"""slime's stock OPD hooks, reproduced: the student's ids go to the teacher as if vocabularies matched.

This is the failure the plugin fixes. The teacher server maps ids it does not know to its "other" slot, so the
request runs, but the teacher reads a different text than the student wrote.
"""

from __future__ import annotations

import asyncio
from argparse import Namespace
from collections.abc import Sequence
from typing import Any

import numpy as np

from slime_xvocab.demo.fallback import score_ids

# One connection pool per event loop (slime's rollout keeps its HTTP session open too); a fresh connection per
# request made this mode several times slower than the others, which is not what the comparison is about.
_CLIENTS: dict[int, Any] = {}


async def reward_func(args: Namespace, sample: Any, **kwargs: Any) -> dict:
    """Score ``sample.tokens`` unchanged; the reward is the teacher's log-probs (like slime's raw JSON)."""
    client = None
    if not args.rm_url.startswith("inproc://"):
        import httpx

        loop_id = id(asyncio.get_running_loop())
        client = _CLIENTS.get(loop_id)
        if client is None:
            client = _CLIENTS[loop_id] = httpx.AsyncClient(timeout=60.0, trust_env=False)
    lps = await score_ids(args.rm_url, list(sample.tokens), sample.response_length, client)
    return {"teacher_lps": lps}


def close(loop: asyncio.AbstractEventLoop) -> None:
    """Close the connection pool opened on ``loop`` (call before closing the loop)."""
    client = _CLIENTS.pop(id(loop), None)
    if client is not None:
        loop.run_until_complete(client.aclose())


def post_process_rewards(args: Namespace, samples: Sequence[Any], **kwargs: Any) -> tuple[list, list]:
    """Trailing ``response_length`` log-probs become ``teacher_log_probs``; rewards are zero (pure OPD)."""
    for s in samples:
        s.teacher_log_probs = np.asarray(s.reward["teacher_lps"], dtype=np.float32)[-s.response_length :]
        s.metadata["xvocab"] = {"coverage": 1.0}
        s.reward = 0.0
    zeros = [0.0] * len(samples)
    return zeros, list(zeros)
