"""Teacher scoring for the demo's OPD loop, through slime's two reward hooks loaded by dotted path.

:func:`score_samples` does what slime does after a rollout: ``await reward_func(args, sample)`` for every sample
concurrently on one event loop, then ``raw, rewards = post_process_rewards(args, samples)`` on the batch, both
loaded by dotted path with importlib. The hooks set ``sample.teacher_log_probs`` (one float per response token,
student positions).

Modes:
    * ``chunk`` / ``student_token`` / ``exact``: the plugin's cross-vocabulary hooks (``slime_xvocab.hooks``); credit
      mode in ``args.xvocab_credit_mode``, chunk split in ``args.xvocab_chunk_split``.
    * ``naive``: what slime's stock OPD hooks do (:mod:`slime_xvocab.demo.naive`): the student's ids are sent
      to the teacher as if both shared one vocabulary.
"""

from __future__ import annotations

import asyncio
import importlib
from argparse import Namespace
from collections.abc import Callable, Sequence
from typing import Any

PLUGIN_RM = "slime_xvocab.hooks.reward_func"
PLUGIN_POST = "slime_xvocab.hooks.post_process_rewards"
NAIVE_RM = "slime_xvocab.demo.naive.reward_func"
NAIVE_POST = "slime_xvocab.demo.naive.post_process_rewards"


def load_function(path: str) -> Callable:
    """``"pkg.mod.fn"`` -> the function, as slime's ``load_function`` does."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def hook_paths(mode: str) -> tuple[str, str]:
    """(reward_func path, post_process path) for an alignment ``mode``."""
    return (NAIVE_RM, NAIVE_POST) if mode == "naive" else (PLUGIN_RM, PLUGIN_POST)


async def _reward_all(rm: Callable, args: Namespace, samples: Sequence[Any]) -> None:
    rewards = await asyncio.gather(*(rm(args, s) for s in samples))
    for s, r in zip(samples, rewards):
        s.reward = r


def score_samples(
    args: Namespace, samples: Sequence[Any], loop: asyncio.AbstractEventLoop
) -> tuple[list[float], list[float]]:
    """Run slime's reward stage on ``samples`` with the hooks named in ``args``.

    Args:
        args: slime-style namespace; ``custom_rm_path`` and ``custom_reward_post_process_path`` name the hooks.
        samples: slime-shaped samples (``tokens``, ``response_length``, ``metadata["messages"]``, ...).
        loop: the event loop the async reward hooks run on (one per demo run, like slime's rollout loop).

    Returns:
        ``(raw_rewards, rewards)`` from the post-process hook; ``sample.teacher_log_probs`` is set in place.
    """
    rm = load_function(args.custom_rm_path)
    post = load_function(args.custom_reward_post_process_path)
    loop.run_until_complete(_reward_all(rm, args, samples))
    return post(args, samples)
