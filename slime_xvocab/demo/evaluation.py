"""Held-out evaluation for the demo: teacher-scored metrics of whole student answers, plus task accuracy.

The teacher's judgement of an answer is read through the plugin's own public pieces: the hooks'
:class:`~slime_xvocab.teacher_view.TeacherViewBuilder` (:func:`slime_xvocab.hooks.teacher_view_builder`)
re-renders the conversation with the teacher's chat template and re-tokenizes the answer text (end of turn
mapped), and a :class:`~slime_xvocab.teacher_client.TeacherClient` scores it on the teacher server. Sums over
whole answers do not depend on how log-probs are split between tokens, so these metrics compare every
alignment mode (and the naive one) on equal terms.
"""

from __future__ import annotations

import asyncio
from argparse import Namespace
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from slime_xvocab.demo.models import ChatLM
from slime_xvocab.demo.sample import Sample, make_samples, response_ids


@dataclass(frozen=True)
class AnswerScore:
    """The teacher's view of one student answer.

    Attributes:
        teacher_lp: teacher log-prob of the answer text (its own tokenization), end of turn included if the
            student ended its turn.
        naive_teacher_lp: teacher log-prob of the student's ids sent unchanged (slime's stock OPD request).
        student_lp: the student's log-prob of its answer (sum of the rollout log-probs).
        n_tokens: student response tokens (end of turn included).
        n_bytes: UTF-8 bytes of the answer, +1 for an end of turn.
        ended: the answer ends with the student's end-of-turn token.
        coverage: share of student response tokens aligned to teacher tokens.
    """

    teacher_lp: float
    naive_teacher_lp: float
    student_lp: float
    n_tokens: int
    n_bytes: int
    ended: bool
    coverage: float


def score_answers(args: Namespace, samples: Sequence[Sample], loop: asyncio.AbstractEventLoop) -> list[AnswerScore]:
    """Score every sample's answer twice on the teacher server: through the teacher's view, and naively."""
    from slime_xvocab.hooks import teacher_view_builder
    from slime_xvocab.teacher_client import TeacherClient

    builder = teacher_view_builder(args)
    views = [builder.build(s.metadata[args.xvocab_messages_key], response_ids(s), sample_id=s.index)
             for s in samples]
    items = [(v.input_ids, v.response_start) for v in views]
    naive_items = [(list(s.tokens), len(s.tokens) - s.response_length) for s in samples]

    async def _score():
        async with TeacherClient(args.xvocab_teacher_urls, max_retries=2) as client:
            return await client.score_many(items + naive_items)

    scores = loop.run_until_complete(_score())
    out = []
    for s, v, t, nv in zip(samples, views, scores[: len(samples)], scores[len(samples):]):
        ended = bool(s.response_length) and int(s.tokens[-1]) in builder.student_end_ids
        out.append(AnswerScore(
            teacher_lp=float(np.sum(t.log_probs)), naive_teacher_lp=float(np.sum(nv.log_probs)),
            student_lp=float(np.sum(s.rollout_log_probs)), n_tokens=s.response_length,
            n_bytes=len(v.response_bytes) + int(ended), ended=ended,
            coverage=float(np.mean(v.alignment.student_chunk >= 0)) if s.response_length else 1.0,
        ))
    return out


def teacher_metrics(scores: Sequence[AnswerScore]) -> dict[str, float]:
    """Token- and byte-normalised teacher metrics over a set of answers (sums over answers, then divided)."""
    tok = max(1, sum(a.n_tokens for a in scores))
    byte = max(1, sum(a.n_bytes for a in scores))
    t = sum(a.teacher_lp for a in scores)
    s = sum(a.student_lp for a in scores)
    return {
        "teacher_lp_per_token": t / tok,
        "teacher_lp_per_byte": t / byte,
        "student_lp_per_token": s / tok,
        "reverse_kl_per_token": (s - t) / tok,
        "reverse_kl_per_byte": (s - t) / byte,
        "naive_teacher_lp_per_token": sum(a.naive_teacher_lp for a in scores) / tok,
        "sampled_eot_share": float(np.mean([a.ended for a in scores])),
        "sampled_len_tokens": tok / len(scores),
        "bytes_per_token": byte / tok,
        "eval_coverage": float(np.mean([a.coverage for a in scores])),
    }


def evaluate_task(
    student: ChatLM, problems: Sequence, args: Namespace, loop: asyncio.AbstractEventLoop, gen: torch.Generator,
    max_new: int,
) -> tuple[dict[str, float], list[dict]]:
    """Default scenario: greedy accuracy, plus teacher-scored metrics of temperature-1 samples.

    ``teacher_lp_per_token`` is the teacher's log-prob of the student's answer text divided by the student's
    token count; ``reverse_kl_per_token`` = (student log-prob - teacher log-prob of the same text) / student
    tokens; ``naive_teacher_lp_per_token`` scores the *same* samples the naive way (student ids unchanged).
    """
    from slime_xvocab.demo.task import is_correct

    prompts = [student.prompt_ids(p.messages()) for p in problems]
    greedy, _, g_fin = student.sample(prompts, max_new, temperature=0.0)
    samples = make_samples(student, problems, max_new, gen, args.xvocab_messages_key)
    scores = score_answers(args, samples, loop)
    metrics = {
        "accuracy": float(np.mean([is_correct(p, student.decode_response(r)) for p, r in zip(problems, greedy)])),
        "sampled_accuracy": float(np.mean([is_correct(p, s.response) for p, s in zip(problems, samples)])),
        **teacher_metrics(scores),
        "eot_share": float(np.mean(g_fin)),
        "answer_len_tokens": float(np.mean([len(r) for r in greedy])),
    }
    examples = [
        {"prompt": p.messages()[-1]["content"], "answer": s.response, "correct": is_correct(p, s.response),
         "student_tokens": s.response_length, "teacher_lp": a.teacher_lp, "naive_teacher_lp": a.naive_teacher_lp}
        for p, s, a in zip(problems[:8], samples[:8], scores[:8])
    ]
    return metrics, examples


def evaluate_chat(
    student: ChatLM, prompts: Sequence, args: Namespace, loop: asyncio.AbstractEventLoop, gen: torch.Generator,
    max_new: int,
) -> tuple[dict[str, float], list[dict]]:
    """``--real`` scenario: teacher-scored metrics of temperature-1 answers to open chat prompts (no right answer).

    Besides the teacher's log-prob per token and per byte, it reports what gives a collapse away: bytes per
    token (a student drifting to short tokens), the share of answers that end their turn, their length.
    """

    samples = make_samples(student, prompts, max_new, gen, args.xvocab_messages_key)
    scores = score_answers(args, samples, loop)
    metrics = teacher_metrics(scores)
    metrics["eot_share"] = metrics["sampled_eot_share"]
    metrics["answer_len_tokens"] = metrics["sampled_len_tokens"]
    examples = [
        {"prompt": p.messages()[-1]["content"], "answer": s.response, "ended": a.ended,
         "student_tokens": s.response_length, "teacher_lp_per_byte": a.teacher_lp / max(1, a.n_bytes),
         "naive_teacher_lp": a.naive_teacher_lp}
        for p, s, a in zip(prompts[:4], samples[:4], scores[:4])
    ]
    return metrics, examples
