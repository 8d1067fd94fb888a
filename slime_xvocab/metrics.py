"""Per-rollout metrics of cross-vocabulary OPD: pure aggregation, no logging.

The reward hook records one flat dict of numbers per sample (:func:`sample_stats`, kept in
``sample.metadata["xvocab"]["stats"]``); :func:`compute_rollout_metrics` turns a rollout's worth of them
into the flat dict that :func:`slime_xvocab.hooks.log_rollout_data` logs under ``rollout/xvocab/<key>``.
:data:`METRICS` documents every key (``docs/metrics.md`` is checked against it).

Token-weighted fractions (``covered_fraction``, ``one_to_one_fraction``) count student response tokens over
the whole rollout, so long responses weigh more, exactly like the loss does.

Example:
    >>> s = sample_stats({"student_tokens": 4, "teacher_tokens": 3, "chunks": 2, "one_to_one_fraction": 0.25,
    ...                   "covered_fraction": 1.0, "mean_chunk_width": 2.0, "max_chunk_width": 3,
    ...                   "unaligned_tokens": 0}, latency_s=0.2, attempts=1)
    >>> compute_rollout_metrics([s])["covered_fraction"]
    1.0
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .errors import (
    ByteMismatchError,
    NonFiniteCreditError,
    SampleError,
    TeacherBadResponse,
    TeacherRequestRejected,
    TeacherTimeout,
    TeacherUnavailable,
    TokenizerError,
)

__all__ = [
    "DENSE_METRICS",
    "METRICS",
    "FAILURE_REASONS",
    "ATTEMPT_FAILURE_KINDS",
    "failure_reason",
    "sample_stats",
    "compute_rollout_metrics",
    "compute_post_process_metrics",
    "compute_teacher_metrics",
]

#: Why a sample could not be scored, most specific class first (``failures/<reason>``).
FAILURE_REASONS: tuple[tuple[type, str], ...] = (
    (TeacherUnavailable, "teacher_unavailable"),
    (TeacherTimeout, "teacher_timeout"),
    (TeacherRequestRejected, "teacher_rejected"),
    (TeacherBadResponse, "teacher_bad_response"),
    (ByteMismatchError, "byte_mismatch"),
    (NonFiniteCreditError, "non_finite"),
    (SampleError, "invalid_sample"),
    (TokenizerError, "tokenizer"),
)
#: Kinds of failed HTTP attempts the teacher client counts (``teacher_attempt_failures/<kind>``).
ATTEMPT_FAILURE_KINDS = ("timeout", "connection", "5xx", "4xx", "bad_response")

#: Keys only reported when ``xvocab_dense`` is on.
DENSE_METRICS = ("dense_valid_fraction", "dense_listed_mass", "dense_tail_mass")
#: Every key :func:`compute_rollout_metrics` / :func:`compute_post_process_metrics` can return, with its
#: meaning. ``unaligned/<reason>`` stands for one key per :class:`~slime_xvocab.alignment.Unaligned` reason.
METRICS: dict[str, str] = {
    "samples": "training samples scored in this rollout (evaluation samples are not counted)",
    "covered_fraction": "share of student response tokens that received a teacher signal (token-weighted)",
    "one_to_one_fraction": "share of student response tokens in 1:1 chunks (one student token = one teacher "
    "token, same bytes); 1.0 when both sides share a tokenizer",
    "signal_fraction": "share of student response tokens that get a teacher value under the credit mode "
    "(covered tokens in student_token and chunk mode, 1:1 tokens in exact mode)",
    "mean_chunk_width": "mean width of aligned chunks, a chunk's width being its longer side in tokens",
    "max_chunk_width": "widest chunk of the rollout",
    "unaligned_tokens": "student response tokens with no teacher signal (they keep their own log-prob: "
    "OPD delta 0)",
    "unaligned/<reason>": "unaligned tokens by reason: special, teacher_context, invalid_utf8, "
    "no_teacher_tokens, byte_mismatch, teacher_failed, invalid_sample, non_finite",
    "top_k_mass": "mean probability mass the teacher's top-k listed per position (credit_mode=student_token); "
    "1 - top_k_mass is the tail the values cannot see: raise xvocab_top_k when it is low",
    "clamped_tokens": "student tokens whose student_token value came out above 0 (paths the first-order count "
    "misses) and was set to 0",
    "eot_mapped_fraction": "share of samples whose final end-of-turn token was paired with the teacher's "
    "end-of-turn token (samples cut by the length limit have none to pair)",
    "teacher_student_token_ratio": "teacher response tokens / student response tokens over the rollout",
    "teacher_truncated_tokens": "teacher tokens cut by xvocab_max_teacher_tokens over the rollout",
    "exact_bytes_fraction": "share of samples whose teacher tokens spell exactly the student's bytes "
    "(below 1.0 the teacher's tokenizer normalised some text; spans then come from offsets)",
    "teacher_latency_p50_s": "median teacher call latency per sample, retries included (seconds)",
    "teacher_latency_p99_s": "99th-percentile teacher call latency per sample (seconds)",
    "teacher_retries": "HTTP retries spent on this rollout's samples, those that finally fell back included",
    "teacher_failures": "samples whose teacher call or view failed (they fall back or stop training)",
    "failures/<reason>": "failed samples by reason: teacher_unavailable, teacher_timeout, teacher_rejected, "
    "teacher_bad_response, byte_mismatch, non_finite, invalid_sample, tokenizer, internal_error (only reasons that "
    "occurred)",
    "teacher_attempt_failures/<kind>": "failed HTTP /generate attempts since the previous rollout log, by kind: "
    "timeout, connection, 5xx, 4xx, bad_response (those of samples that finally failed included)",
    "teacher_requests": "HTTP /generate requests sent since the previous rollout log (retries included)",
    "fallback_samples": "samples given the student's own log-probs (delta 0): they could not be scored",
    "dense_valid_fraction": "xvocab_dense: share of student response tokens with a dense target (token-weighted)",
    "dense_listed_mass": "xvocab_dense: mean teacher probability the listed student tokens hold per target "
    "position (the top-k mass covered after projection and the xvocab_dense_top_k cut)",
    "dense_tail_mass": "xvocab_dense: mean teacher probability in the tail bucket per target position "
    "(1 - dense_listed_mass): raise xvocab_top_k / xvocab_dense_top_k when it is high",
    "failed_fraction": "fallback_samples / samples; training stops above xvocab_max_failed_fraction",
    "unrouted_samples": "samples whose xvocab_teacher_route_key value (or its absence) matched no route: they went "
    "to xvocab_default_teacher",
    "teacher/<teacher>/<key>": "with several teachers (xvocab_teachers), every key above for one teacher over the "
    "samples routed to it (its share of a mixture included): its own alignment, coverage, latency and failures, "
    "its own client's requests and attempt failures; teacher/<teacher>/fallback_samples and failed_fraction count "
    "the samples that teacher failed to score (training stops above its max_failed_fraction)",
}


def sample_stats(
    alignment_stats: Mapping[str, float],
    *,
    latency_s: float = 0.0,
    attempts: int = 0,
    eot_mapped: bool = False,
    exact_bytes: bool = True,
    teacher_truncated_tokens: int = 0,
    failed: bool = False,
    signal_tokens: int | None = None,
    top_k_mass: float = 1.0,
    clamped_tokens: int = 0,
    dense: Mapping[str, float] | None = None,
    failure: str | None = None,
) -> dict[str, float]:
    """Flatten one sample's numbers into the dict kept on the sample (plain floats: pickles anywhere).

    Args:
        alignment_stats: :meth:`AlignmentStats.as_dict` of the sample's alignment.
        latency_s: teacher call latency, retries included (0 when no call was made).
        attempts: HTTP attempts (0 when no call was made).
        eot_mapped: the response's end-of-turn token was paired with the teacher's.
        exact_bytes: the teacher's tokens spell exactly the student's bytes.
        teacher_truncated_tokens: teacher tokens cut by the context limit.
        failed: the sample could not be scored (its values come from the fallback).
        signal_tokens: student tokens that get a teacher value under the credit mode (default: the
            covered tokens, as in chunk mode; exact mode passes the 1:1 tokens).
        top_k_mass: mean mass the teacher's top-k covered per position (1.0 without top-k).
        clamped_tokens: student_token values clamped to 0.
        dense: :meth:`DenseTargets.stats <slime_xvocab.dense.DenseTargets.stats>` of the sample (xvocab_dense),
            kept as ``dense_<key>``.
        failure: why a failed sample failed (:func:`failure_reason`); kept as ``failed/<reason>`` = 1.0.

    Returns:
        A flat ``dict[str, float]``; alignment keys keep their names, ``unaligned/<reason>`` included.
    """
    out = {k: float(v) for k, v in alignment_stats.items()}
    out.update(
        latency_s=float(latency_s),
        attempts=float(attempts),
        eot_mapped=float(bool(eot_mapped)),
        exact_bytes=float(bool(exact_bytes)),
        teacher_truncated_tokens=float(teacher_truncated_tokens),
        failed=float(bool(failed)),
        top_k_mass=float(top_k_mass),
        clamped_tokens=float(clamped_tokens),
    )
    out.update({f"dense_{k}": float(v) for k, v in (dense or {}).items()})
    covered = out.get("student_tokens", 0.0) - out.get("unaligned_tokens", 0.0)
    out["signal_tokens"] = float(covered if signal_tokens is None else signal_tokens)
    if failure:
        out[f"failed/{failure}"] = 1.0
    return out


def failure_reason(exc: BaseException) -> str:
    """The ``failures/<reason>`` name of the exception a sample failed with (``internal_error`` if unknown)."""
    for cls, reason in FAILURE_REASONS:
        if isinstance(exc, cls):
            return reason
    return "internal_error"


def compute_rollout_metrics(
    per_sample_stats: Sequence[Mapping[str, float]],
    client_stats: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Aggregate a rollout's per-sample stats (and the teacher client's counters) into flat metrics.

    Args:
        per_sample_stats: one :func:`sample_stats` dict per training sample that went through the reward
            hook. Missing keys count as 0.
        client_stats: :meth:`TeacherClient.stats` since the previous rollout, or None.

    Returns:
        ``dict[str, float]`` with the keys of :data:`METRICS` (``unaligned/<reason>`` only for reasons that
        occurred). Empty input gives ``{"samples": 0.0}`` (+ client keys).
    """
    out: dict[str, float] = {"samples": float(len(per_sample_stats))}
    if client_stats is not None:
        out["teacher_requests"] = float(client_stats.get("requests", 0.0))
        for kind in ATTEMPT_FAILURE_KINDS:
            out[f"teacher_attempt_failures/{kind}"] = float(client_stats.get(f"failures_{kind}", 0.0))
    if not per_sample_stats:
        return out

    def col(key: str) -> np.ndarray:
        return np.array([float(s.get(key, 0.0)) for s in per_sample_stats], dtype=np.float64)

    student, teacher = col("student_tokens"), col("teacher_tokens")
    covered = student - col("unaligned_tokens")
    one_to_one = col("one_to_one_fraction") * student
    chunks = col("chunks")
    n_student = student.sum()
    out["covered_fraction"] = float(covered.sum() / n_student) if n_student else 1.0
    out["one_to_one_fraction"] = float(one_to_one.sum() / n_student) if n_student else 1.0
    out["signal_fraction"] = float(col("signal_tokens").sum() / n_student) if n_student else 1.0
    out["mean_chunk_width"] = (
        float((col("mean_chunk_width") * chunks).sum() / chunks.sum()) if chunks.sum() else 0.0
    )
    out["max_chunk_width"] = float(col("max_chunk_width").max())
    out["unaligned_tokens"] = float(col("unaligned_tokens").sum())
    reasons = sorted({k for s in per_sample_stats for k in s if k.startswith("unaligned/")})
    for key in reasons:
        out[key] = float(col(key).sum())
    out["eot_mapped_fraction"] = float(col("eot_mapped").mean())
    out["teacher_student_token_ratio"] = float(teacher.sum() / n_student) if n_student else 0.0
    out["teacher_truncated_tokens"] = float(col("teacher_truncated_tokens").sum())
    out["exact_bytes_fraction"] = float(col("exact_bytes").mean())
    attempts = col("attempts")
    called = attempts > 0
    latency = col("latency_s")[called & (col("failed") == 0)]
    p50, p99 = np.percentile(latency, [50.0, 99.0]) if len(latency) else (0.0, 0.0)
    out["teacher_latency_p50_s"] = float(p50)
    out["teacher_latency_p99_s"] = float(p99)
    out["teacher_retries"] = float(np.maximum(attempts - 1, 0).sum())
    out["teacher_failures"] = float(col("failed").sum())
    scored = col("failed") == 0  # token-weighted over the samples the teacher scored
    mass = col("top_k_mass")[scored]
    out["top_k_mass"] = float(np.average(mass, weights=student[scored] + 1e-12)) if scored.any() else 1.0
    out["clamped_tokens"] = float(col("clamped_tokens").sum())
    out["unrouted_samples"] = float(col("unrouted").sum())
    for key in sorted({k for s in per_sample_stats for k in s if k.startswith("failed/")}):
        out["failures/" + key[len("failed/") :]] = float(col(key).sum())
    if any("dense_positions" in s for s in per_sample_stats):
        positions, valid = col("dense_positions").sum(), col("dense_valid").sum()
        tail = float(col("dense_tail_sum").sum() / valid) if valid else 1.0
        out["dense_valid_fraction"] = float(valid / positions) if positions else 0.0
        out["dense_tail_mass"] = tail
        out["dense_listed_mass"] = 1.0 - tail
    return out


def compute_post_process_metrics(n_samples: int, n_fallback: int) -> dict[str, float]:
    """What only the post-process knows: how many samples were given the fallback.

    Args:
        n_samples: training samples in the batch.
        n_fallback: samples whose ``teacher_log_probs`` are the student's own log-probs.

    Returns:
        ``{"fallback_samples": n_fallback, "failed_fraction": n_fallback / n_samples}`` (0.0 when empty).
    """
    return {
        "fallback_samples": float(n_fallback),
        "failed_fraction": float(n_fallback / n_samples) if n_samples else 0.0,
    }


def compute_teacher_metrics(
    per_teacher_stats: Mapping[str, Sequence[Mapping[str, float]]],
    client_stats: Mapping[str, Mapping[str, float] | None],
) -> dict[str, float]:
    """:func:`compute_rollout_metrics` for each teacher, keyed ``teacher/<name>/<key>``.

    Args:
        per_teacher_stats: per teacher name, the :func:`sample_stats` of its part of each sample routed to it.
        client_stats: per teacher name, its client's counters since the previous rollout (or None).

    Returns:
        The flat dict; a teacher with no samples still reports ``samples`` = 0 and its client's counters.
    """
    out: dict[str, float] = {}
    for name in dict.fromkeys([*per_teacher_stats, *client_stats]):
        metrics = compute_rollout_metrics(per_teacher_stats.get(name, ()), client_stats.get(name))
        metrics.pop("unrouted_samples", None)  # routing is per sample, not per teacher
        out.update({f"teacher/{name}/{key}": value for key, value in metrics.items()})
    return out
