"""slime's stock OPD hooks, reproduced: the student's ids go to the teacher as if vocabularies matched.

This is the failure the plugin fixes. The request is valid (the ids are in range for a teacher with a larger
vocabulary, or map to the demo teacher's "other" slot), so nothing errors, but the teacher reads a different
text than the student wrote.
"""

from __future__ import annotations

import asyncio
from argparse import Namespace
from collections.abc import Sequence
from typing import Any

import numpy as np

from slime_xvocab.teacher_client import TeacherClient

# One client (connection pool) per event loop, as slime's rollout keeps its HTTP session open: a fresh
# connection per request would make this mode slower than the others, which is not what the comparison is about.
_CLIENTS: dict[int, TeacherClient] = {}


async def reward_func(args: Namespace, sample: Any, **kwargs: Any) -> dict:
    """Score ``sample.tokens`` unchanged; the reward is the teacher's log-probs (like slime's raw JSON)."""
    loop_id = id(asyncio.get_running_loop())
    client = _CLIENTS.get(loop_id)
    if client is None:
        client = _CLIENTS[loop_id] = TeacherClient(args.rm_url)
    if sample.response_length == 0:
        return {"teacher_lps": []}
    scores = await client.score(list(sample.tokens), len(sample.tokens) - sample.response_length)
    return {"teacher_lps": scores.log_probs.tolist()}


def close(loop: asyncio.AbstractEventLoop) -> None:
    """Close the client opened on ``loop`` (call before closing the loop)."""
    client = _CLIENTS.pop(id(loop), None)
    if client is not None:
        loop.run_until_complete(client.aclose())


def post_process_rewards(args: Namespace, samples: Sequence[Any], **kwargs: Any) -> tuple[list, list]:
    """The log-probs become ``teacher_log_probs`` (one per response token); rewards are zero (pure OPD)."""
    for s in samples:
        s.teacher_log_probs = np.asarray(s.reward["teacher_lps"], dtype=np.float32)
        s.metadata["xvocab"] = {"coverage": 1.0}
        s.reward = 0.0
    zeros = [0.0] * len(samples)
    return zeros, list(zeros)
