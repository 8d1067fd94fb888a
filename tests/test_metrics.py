"""Metric aggregation: token-weighted fractions, sums, percentiles, and the docs listing every key."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from slime_xvocab.alignment import Alignment, Unaligned, align_spans
from slime_xvocab.metrics import (
    DENSE_METRICS,
    METRICS,
    compute_post_process_metrics,
    compute_rollout_metrics,
    sample_stats,
)

ROOT = Path(__file__).resolve().parent.parent


def stats_of(alignment: Alignment, **kw) -> dict[str, float]:
    return sample_stats(alignment.stats().as_dict(), **kw)


def test_aggregates_two_samples_token_weighted():
    # "347" as 3 student tokens vs 1 teacher token, then a 1:1 chunk: 4 tokens, 1 one-to-one, widths 3 and 1.
    a = align_spans(np.array([[0, 1], [1, 2], [2, 3], [3, 5]]), np.array([[0, 3], [3, 5]]))
    # 2 tokens, the second past the teacher's context.
    b = align_spans(np.array([[0, 2], [2, 4]]), np.array([[0, 2]]))
    m = compute_rollout_metrics(
        [stats_of(a, latency_s=0.2, attempts=1, eot_mapped=True), stats_of(b, latency_s=0.4, attempts=3)],
        {"requests": 5},
    )
    assert m["samples"] == 2 and m["teacher_requests"] == 5
    assert m["covered_fraction"] == pytest.approx(5 / 6)
    assert m["one_to_one_fraction"] == pytest.approx(2 / 6)
    assert m["mean_chunk_width"] == pytest.approx((3 + 1 + 1) / 3)
    assert m["max_chunk_width"] == 3 and m["unaligned_tokens"] == 1
    assert m["unaligned/teacher_context"] == 1
    assert m["eot_mapped_fraction"] == 0.5 and m["exact_bytes_fraction"] == 1.0
    assert m["teacher_student_token_ratio"] == pytest.approx(3 / 6)
    assert m["teacher_latency_p50_s"] == pytest.approx(0.3) and m["teacher_retries"] == 2
    assert m["teacher_failures"] == 0


def test_failed_samples_count_and_leave_latency_out():
    ok = stats_of(align_spans(np.array([[0, 1]]), np.array([[0, 1]])), latency_s=1.0, attempts=1)
    failed = stats_of(Alignment.unaligned(3, Unaligned.TEACHER_FAILED), failed=True)
    m = compute_rollout_metrics([ok, failed])
    assert m["teacher_failures"] == 1 and m["unaligned/teacher_failed"] == 3
    assert m["teacher_latency_p99_s"] == pytest.approx(1.0) and m["covered_fraction"] == 0.25
    assert "teacher_requests" not in m


def test_empty_rollout_and_post_process_metrics():
    assert compute_rollout_metrics([], None) == {"samples": 0.0}
    assert compute_post_process_metrics(0, 0) == {"fallback_samples": 0.0, "failed_fraction": 0.0}
    assert compute_post_process_metrics(8, 2) == {"fallback_samples": 2.0, "failed_fraction": 0.25}


def test_every_key_is_documented_and_flat_floats():
    a = align_spans(np.array([[0, 1], [1, 1]]), np.array([[0, 1]]))
    m = compute_rollout_metrics([stats_of(a, attempts=1)], {"requests": 1})
    m |= compute_post_process_metrics(1, 0)
    for key, value in m.items():
        assert isinstance(value, float)
        patterns = [k.split("<")[0] for k in METRICS if "<" in k]
        assert key in METRICS or any(key.startswith(p) for p in patterns), key
    assert {k for k in METRICS if "<" not in k} - set(DENSE_METRICS) <= set(m)
    assert not set(DENSE_METRICS) & set(m)  # dense keys only when xvocab_dense is on
    reasons = METRICS["unaligned/<reason>"]
    for reason in Unaligned:
        if reason:
            assert reason.name.lower() in reasons


def test_metrics_doc_lists_every_key():
    doc = (ROOT / "docs" / "metrics.md").read_text()
    documented = set(re.findall(r"`rollout/xvocab/([\w/<>]+)`", doc))
    assert set(METRICS) <= documented, set(METRICS) - documented


def test_dense_metrics_weigh_positions_and_target_positions():
    a = align_spans(np.array([[0, 1], [1, 2]]), np.array([[0, 2]]))
    one = stats_of(a, dense={"positions": 4, "valid": 3, "tail_sum": 0.3, "ids_sum": 9})
    two = stats_of(a, dense={"positions": 6, "valid": 1, "tail_sum": 0.5, "ids_sum": 2})
    m = compute_rollout_metrics([one, two])
    assert set(DENSE_METRICS) <= set(m) <= set(METRICS) | {"unaligned/teacher_context"}
    assert m["dense_valid_fraction"] == pytest.approx(4 / 10)
    assert m["dense_tail_mass"] == pytest.approx(0.8 / 4)
    assert m["dense_listed_mass"] == pytest.approx(1 - 0.8 / 4)


def test_failures_by_reason_and_retries_of_failed_samples_count():
    from slime_xvocab.errors import ByteMismatchError, TeacherTimeout, TeacherUnavailable
    from slime_xvocab.metrics import failure_reason

    assert failure_reason(TeacherUnavailable("x")) == "teacher_unavailable"
    assert failure_reason(ByteMismatchError("x")) == "byte_mismatch"
    assert failure_reason(KeyError("x")) == "internal_error"
    a = align_spans(np.array([[0, 1], [1, 1]]), np.array([[0, 1]]))
    ok = stats_of(a, attempts=2)
    dead = sample_stats(a.stats().as_dict(), attempts=5, failed=True, failure=failure_reason(TeacherUnavailable()))
    slow = sample_stats(a.stats().as_dict(), attempts=3, failed=True, failure=failure_reason(TeacherTimeout()))
    m = compute_rollout_metrics([ok, dead, slow], {"requests": 10, "failures_5xx": 4, "failures_timeout": 3})
    assert m["teacher_retries"] == 1 + 4 + 2  # the retries of the two failed samples count too
    assert m["teacher_failures"] == 2 and m["failures/teacher_unavailable"] == 1 and m["failures/teacher_timeout"] == 1
    assert m["teacher_attempt_failures/5xx"] == 4 and m["teacher_attempt_failures/timeout"] == 3
    assert m["teacher_attempt_failures/connection"] == 0


def test_per_teacher_metrics_are_each_teachers_own():
    from slime_xvocab.metrics import compute_teacher_metrics

    a = align_spans(np.array([[0, 1], [1, 2]]), np.array([[0, 2]]))
    ok = stats_of(a, latency_s=0.5, attempts=1)
    failed = stats_of(Alignment.unaligned(2, Unaligned.TEACHER_FAILED), failed=True)
    m = compute_teacher_metrics({"math": [ok], "chat": [failed]}, {"math": {"requests": 1}, "code": {"requests": 0}})
    assert m["teacher/math/samples"] == 1 and m["teacher/math/teacher_latency_p50_s"] == pytest.approx(0.5)
    assert m["teacher/chat/teacher_failures"] == 1 and m["teacher/chat/covered_fraction"] == 0.0
    assert m["teacher/code/samples"] == 0 and m["teacher/code/teacher_requests"] == 0  # configured, unused
    assert "teacher/math/unrouted_samples" not in m
    assert all(isinstance(v, float) for v in m.values())
