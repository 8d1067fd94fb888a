"""A stand-in for slime's ``Sample`` (written from slime's recorded field list, not copied), and the demo's rollout.

slime cannot be installed on a CPU machine, so the demo's OPD loop and the hook tests both use this class.
Field meanings follow slime: ``tokens`` = prompt ids + response ids, ``response_length`` = number of trailing
response ids, ``rollout_log_probs`` and ``loss_mask`` have length ``response_length``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch


@dataclass
class Sample:
    """slime's ``Sample`` fields (same names, order and defaults) and the behaviour the hooks rely on.

    Nothing more: the hook tests run on this class, so an attribute slime's own ``Sample`` lacks would hide
    a hook that depends on it. Use :func:`prompt_ids` / :func:`response_ids` for the two halves of ``tokens``.
    """

    group_index: int | None = None
    index: int | None = None
    rollout_id: int | None = None
    prompt: str | list[dict[str, str]] = ""
    tokens: list[int] = field(default_factory=list)
    multimodal_inputs: dict | None = None
    multimodal_train_inputs: dict | None = None
    multimodal_train_input_id: str | None = None
    apply_chat_template_kwargs: dict = field(default_factory=dict)
    response: str = ""
    response_length: int = 0
    label: str | None = None
    reward: float | dict | None = None
    loss_mask: list[int] | None = None
    weight_versions: list[str] = field(default_factory=list)
    rollout_log_probs: list[float] | None = None
    rollout_top_p_token_ids: Any = None
    rollout_top_p_token_offsets: Any = None
    rollout_routed_experts: Any = None
    remove_sample: bool = False
    teacher_log_probs: list[float] | None = None

    class Status(Enum):
        PENDING = "pending"
        COMPLETED = "completed"
        TRUNCATED = "truncated"
        ABORTED = "aborted"
        FAILED = "failed"

    status: Status = Status.PENDING
    metadata: dict = field(default_factory=dict)
    generate_function_path: str | None = None
    custom_rm_path: str | None = None
    train_metadata: dict | None = None
    session_id: str | None = None
    non_generation_time: float = 0.0

    @dataclass
    class SpecInfo:
        """slime's speculative-decoding counters (summed over the sample's generate calls)."""

        spec_accept_token_num: int = 0
        spec_draft_token_num: int = 0
        spec_verify_ct: int = 0
        completion_token_num: int = 0

    spec_info: SpecInfo = field(default_factory=SpecInfo)

    @dataclass
    class PrefixCacheInfo:
        """slime's prefix-cache counters (cached and total prompt tokens)."""

        cached_tokens: int = 0
        total_prompt_tokens: int = 0

    prefix_cache_info: PrefixCacheInfo = field(default_factory=PrefixCacheInfo)

    def get_reward_value(self, args: Any) -> Any:
        return self.reward if not args.reward_key else self.reward[args.reward_key]

    @property
    def effective_response_length(self) -> int:
        return sum(self.loss_mask) if self.loss_mask is not None else self.response_length

    def validate(self) -> None:
        """The invariants slime checks after every append (``_validate_response_metadata_lengths``)."""
        if self.loss_mask is not None and len(self.loss_mask) != self.response_length:
            raise ValueError(
                f"loss_mask length {len(self.loss_mask)} != response_length {self.response_length}"
            )
        if self.rollout_log_probs is not None and len(self.rollout_log_probs) != self.response_length:
            raise ValueError(
                f"rollout_log_probs length {len(self.rollout_log_probs)} "
                f"!= response_length {self.response_length}"
            )


def response_ids(sample: Sample) -> list[int]:
    """The trailing ``response_length`` ids of ``sample.tokens``."""
    return list(sample.tokens[len(sample.tokens) - sample.response_length :])


def prompt_ids(sample: Sample) -> list[int]:
    """The leading prompt ids of ``sample.tokens``."""
    return list(sample.tokens[: len(sample.tokens) - sample.response_length])


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
            rollout_log_probs=lp, status=Sample.Status.COMPLETED if fin else Sample.Status.TRUNCATED,
            metadata={messages_key: p.messages()}, loss_mask=[1] * len(r),
        ))
    return out
