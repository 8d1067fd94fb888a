"""A stand-in for the parts of slime the hooks touch, written from the recorded contracts (not copied).

slime cannot be pip-installed here, so the hook tests drive the hooks the way slime does with:

* :class:`Sample`: slime's ``slime.utils.types.Sample`` field names, defaults, ``Status`` enum,
  ``get_reward_value`` and the invariants slime validates (``len(loss_mask) == response_length``,
  ``len(rollout_log_probs) == response_length``), per the slime reference notes (slime.md §3); the package's
  :class:`slime_xvocab.demo.sample.Sample`, which the demo's OPD loop uses too;
* :data:`SIGNATURES`: the parameter names slime calls each hook with (§2.2, §5);
* :func:`load_function`: slime's dotted-path loader (``import_module`` + ``getattr``);
* :func:`make_args`: a Namespace with the slime flags the hooks read, at slime's defaults;
* :func:`apply_opd_kl`: slime's OPD advantage term, ``A = A_base - coef * (student_lp - teacher_lp)``;
* :func:`slime_opd_teacher_log_probs`: what slime's own same-tokenizer OPD post-process derives from a
  teacher answer (``input_token_logprobs[1:]`` of ``sample.tokens`` scored from 0, last response_length);
* :func:`slime_group_normalize`: slime's default reward post-processing (group mean/std).

When the real slime package is importable, :func:`real_sample_class` returns its ``Sample`` so the same
cases run on it too.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

import numpy as np

from slime_xvocab.demo.sample import Sample  # noqa: F401  (re-exported: the hook tests' Sample)

#: Parameter names slime passes to each hook (recorded from slime 624b824a).
SIGNATURES: dict[str, tuple[str, ...]] = {
    "custom_rm_path": ("args", "sample"),  # awaited: `await fn(args, sample, **kwargs)`
    "custom_reward_post_process_path": ("args", "samples"),
    "custom_rollout_log_function_path": (
        "rollout_id", "args", "samples", "rollout_extra_metrics", "rollout_time"
    ),
    "rollout_sample_hook_path": ("args", "sample"),  # + keyword-only rollout_id / evaluation (filtered)
}

#: The keyword arguments slime's sample-hook runner may pass (it filters them by the hook's signature).
SAMPLE_HOOK_KWARGS = ("rollout_id", "evaluation")


def load_function(path: str) -> Any:
    """slime's ``load_function``: ``module.sub.attr`` -> the attribute (no extra error context)."""
    module_path, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module_path), attr)


def real_sample_class() -> type | None:
    """slime's own ``Sample`` if slime is importable here, else None."""
    try:
        from slime.utils.types import Sample as SlimeSample
    except Exception:
        return None
    return SlimeSample


def make_sample(cls: type, *, prompt_ids: list[int], response_ids: list[int], rollout_log_probs: list[float],
                **fields: Any) -> Any:
    """A finished rollout sample as slime's default generate leaves it (status COMPLETED, loss mask ones)."""
    sample = cls(
        tokens=list(prompt_ids) + list(response_ids),
        response_length=len(response_ids),
        rollout_log_probs=list(rollout_log_probs),
        loss_mask=[1] * len(response_ids),
        **fields,
    )
    sample.status = cls.Status.COMPLETED
    return sample


def make_args(**overrides: Any) -> argparse.Namespace:
    """The slime flags the hooks read, at slime's defaults (plus the OPD launch flags)."""
    values: dict[str, Any] = {
        "hf_checkpoint": None,
        "rm_url": None,
        "rm_type": None,
        "reward_key": None,
        "custom_rm_path": "slime_xvocab.hooks.reward_func",
        "custom_reward_post_process_path": "slime_xvocab.hooks.post_process_rewards",
        "custom_rollout_log_function_path": "slime_xvocab.hooks.log_rollout_data",
        "rollout_sample_hook_path": ["slime_xvocab.hooks.mark_evaluation"],
        "group_rm": False,
        "use_opd": True,
        "opd_type": "sglang",
        "opd_kl_coef": 1.0,
        "rollout_temperature": 1.0,
        "advantage_estimator": "grpo",
        "rewards_normalization": True,
        "grpo_std_normalization": True,
        "n_samples_per_prompt": 1,
        "rollout_batch_size": 1,
        "global_batch_size": 1,
        "wandb_always_use_train_step": False,
    }
    values.update(overrides)
    return argparse.Namespace(**values)


def apply_opd_kl(
    args: Any, samples: list, base_advantages: list[np.ndarray] | None = None
) -> list[np.ndarray]:
    """slime's ``apply_opd_kl_to_advantages``: ``A_t = A_base_t - opd_kl_coef * (student_t - teacher_t)``.

    The student log-probs here are the rollout log-probs (slime with ``--use-rollout-logprobs``).
    """
    out = []
    for i, s in enumerate(samples):
        teacher = np.asarray(s.teacher_log_probs, dtype=np.float32)
        student = np.asarray(s.rollout_log_probs, dtype=np.float32)
        base = np.zeros_like(student) if base_advantages is None else base_advantages[i]
        out.append(base - args.opd_kl_coef * (student - teacher))
    return out


def slime_opd_teacher_log_probs(answer: dict, response_length: int) -> np.ndarray:
    """slime's same-tokenizer OPD: drop the first (null) input log-prob, keep the last response_length."""
    lps = [item[0] for item in answer["meta_info"]["input_token_logprobs"][1:]]
    return np.asarray(lps, dtype=np.float32)[len(lps) - response_length:]


def slime_opd_request(sample: Any) -> dict:
    """The body slime's own OPD reward function POSTs to the teacher (``args.rollout_temperature`` = 1)."""
    return {
        "input_ids": list(sample.tokens),
        "sampling_params": {"temperature": 1.0, "max_new_tokens": 0, "skip_special_tokens": False},
        "return_logprob": True,
        "logprob_start_len": 0,
    }


def slime_group_normalize(args: Any, raw_rewards: list[float]) -> list[float]:
    """slime's default ``_post_process_rewards`` normalisation (torch float32, unbiased std)."""
    import torch

    if not (args.advantage_estimator in ("grpo", "gspo", "cispo", "reinforce_plus_plus_baseline")
            and args.rewards_normalization):
        return list(raw_rewards)
    rewards = torch.tensor(raw_rewards, dtype=torch.float)
    if rewards.shape[-1] == args.n_samples_per_prompt * args.rollout_batch_size:
        rewards = rewards.reshape(-1, args.n_samples_per_prompt)
    else:
        rewards = rewards.view(-1, rewards.shape[-1])
    rewards = rewards - rewards.mean(dim=-1, keepdim=True)
    if args.advantage_estimator in ("grpo", "gspo", "cispo") and args.grpo_std_normalization:
        rewards = rewards / (rewards.std(dim=-1, keepdim=True) + 1e-6)
    return rewards.flatten().tolist()
