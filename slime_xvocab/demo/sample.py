"""A stand-in for slime's ``Sample`` with the field names the plugin's hooks read and write.

slime's own class (``slime.utils.types.Sample``) has many more fields; the demo only fills the ones OPD uses.
Field meanings follow slime: ``tokens`` = prompt ids + response ids, ``response_length`` = number of trailing
response ids, ``rollout_log_probs`` and ``loss_mask`` have length ``response_length``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch


class Status(Enum):
    """Mirror of ``Sample.Status``."""

    PENDING = "pending"
    COMPLETED = "completed"
    TRUNCATED = "truncated"
    ABORTED = "aborted"
    FAILED = "failed"


@dataclass
class Sample:
    """slime-shaped rollout sample (subset of ``slime.utils.types.Sample``)."""

    group_index: int | None = None
    index: int | None = None
    prompt: str | list[dict[str, str]] = ""
    tokens: list[int] = field(default_factory=list)
    response: str = ""
    response_length: int = 0
    label: str | None = None
    reward: float | dict | None = None
    loss_mask: list[int] | None = None
    rollout_log_probs: list[float] | None = None
    teacher_log_probs: Any = None
    status: Status = Status.PENDING
    metadata: dict = field(default_factory=dict)
    custom_rm_path: str | None = None

    Status = Status  # slime code refers to ``Sample.Status.COMPLETED``

    @property
    def response_tokens(self) -> list[int]:
        """The trailing ``response_length`` ids of ``tokens``."""
        return self.tokens[len(self.tokens) - self.response_length :]

    @property
    def prompt_tokens(self) -> list[int]:
        """The leading prompt ids of ``tokens``."""
        return self.tokens[: len(self.tokens) - self.response_length]

    def get_reward_value(self, args: Any) -> Any:
        """Same contract as slime: the whole reward, or ``reward[args.reward_key]``."""
        key = getattr(args, "reward_key", None)
        return self.reward if not key else self.reward[key]


def make_samples(
    student, problems: Sequence, max_new: int, gen: torch.Generator, messages_key: str,
    temperature: float = 1.0, start_index: int = 0,
) -> list[Sample]:
    """Sample one response per problem and wrap it as a slime-shaped :class:`Sample`.

    Args:
        student: a :class:`~slime_xvocab.demo.models.ChatLM`.
        problems: objects with ``messages()`` (the chat prompt, kept in ``metadata[messages_key]`` as a
            slime data source would) and ``answer`` (the label; ``""`` for open prompts).
        gen: torch RNG of the sampler; ``start_index`` numbers the samples (``index``/``group_index``).
    """
    prompts = [student.prompt_ids(p.messages()) for p in problems]
    resp, lps, finished = student.sample(prompts, max_new, temperature=temperature, generator=gen)
    out = []
    for i, (p, pr, r, lp, fin) in enumerate(zip(problems, prompts, resp, lps, finished)):
        out.append(Sample(
            group_index=start_index + i, index=start_index + i, prompt=student.tokenizer.decode(pr),
            tokens=pr + r, response=student.decode_response(r), response_length=len(r), label=p.answer,
            rollout_log_probs=lp, status=Status.COMPLETED if fin else Status.TRUNCATED,
            metadata={messages_key: p.messages()}, loss_mask=[1] * len(r),
        ))
    return out
