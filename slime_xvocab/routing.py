"""Several teachers: which teacher(s) score a sample, and how their values mix.

A *route* is a tuple of ``(teacher name, weight)`` pairs with weights > 0 summing to 1. The configuration maps
values of one metadata field (``xvocab_teacher_route_key``, e.g. the dataset's ``source``) to routes
(``xvocab_teacher_routes``); samples without a matching value take ``xvocab_default_teacher``.

Several teachers on one sample form the *token-level mixture teacher*: the teacher whose probability of the
student's next token is ``q(s_j | s_<j) = sum_k w_k p_k(s_j | s_<j)``, each ``p_k`` being teacher ``k``'s
probability of that student token (its own tokenizer's alignment and ``student_token`` credit). In log space::

    v_j = logsumexp_k(log w_k + v_kj)        (weights renormalised over the teachers that scored position j)

computed with the max subtracted first, so values near ``-inf`` or near 0 lose nothing. A position no teacher
scored keeps the student's own log-prob (OPD delta 0), as with one teacher. Renormalising means a teacher
with no value at a position (past its context limit, a special token it cannot align, or a failed call)
abstains there instead of counting as probability 0.

Example:
    >>> import numpy as np
    >>> v, ok = mix_log_probs([np.log([0.5, 0.2]), np.log([0.1, 0.4])], [np.array([True, True])] * 2,
    ...                       [0.75, 0.25], np.zeros(2))
    >>> [round(float(x), 3) for x in np.exp(v)], ok.tolist()
    ([0.4, 0.25], [True, True])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .teacher_view import get_path

__all__ = ["Route", "normalise_route", "route_of", "mix_log_probs"]

Route = tuple[tuple[str, float], ...]


def normalise_route(value: Any, teachers: Sequence[str]) -> Route:
    """A route from its configured form: a teacher name, or a mapping ``{teacher name: weight}``.

    Args:
        value: ``"math"`` or ``{"math": 3, "chat": 1}``.
        teachers: the configured teacher names.

    Returns:
        ``(("math", 0.75), ("chat", 0.25))``: configured order, weights divided by their sum.

    Raises:
        ValueError: an unknown teacher name, a weight that is not a finite number > 0, an empty mapping.
    """
    if isinstance(value, str):
        value = {value: 1.0}
    if not isinstance(value, Mapping) or not value:
        raise ValueError(
            f"must be a teacher name or a non-empty mapping {{teacher name: weight}}, got {type(value).__name__}"
        )
    pairs = []
    for name, weight in value.items():
        if name not in teachers:
            raise ValueError(f"{name!r} is not a configured teacher (teachers: {', '.join(teachers)})")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"the weight of teacher {name!r} must be a finite number > 0, got {weight!r}")
        pairs.append((str(name), float(weight)))
    total = sum(w for _, w in pairs)
    return tuple((name, w / total) for name, w in pairs)


def route_of(
    metadata: Mapping[str, Any] | None,
    route_key: str | None,
    routes: Mapping[str, Route],
    default: Route,
) -> tuple[Route, bool]:
    """The route of one sample.

    Args:
        metadata: ``sample.metadata`` (None counts as empty).
        route_key: the metadata field that names the route (``xvocab_teacher_route_key``; a dotted path
            ``a.b`` reads a nested value, as ``xvocab_messages_key`` does), or None.
        routes: route of each field value (compared as strings, so YAML's ``1`` and ``"1"`` agree).
        default: the route of samples whose value is missing or has no route.

    Returns:
        ``(route, matched)``: ``matched`` is False when a route key is configured but the sample's value
        (missing included) had no route of its own (counted in ``rollout/xvocab/unrouted_samples``).
    """
    if not route_key:
        return default, True
    value = get_path(metadata or {}, route_key)
    route = routes.get(str(value)) if value is not None else None
    return (default, False) if route is None else (route, True)


def mix_log_probs(
    values: Sequence[np.ndarray],
    scored: Sequence[np.ndarray],
    weights: Sequence[float],
    own: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """The token-level mixture of several teachers' values of the same student tokens.

    Args:
        values: per teacher, float ``[n]`` log-probs of the student's tokens (finite where scored).
        scored: per teacher, bool ``[n]``: where that teacher gave a value.
        weights: per teacher, > 0 (normalised here, per position, over the teachers that scored it).
        own: float ``[n]``: the student's own log-probs, kept where no teacher scored.

    Returns:
        ``(mixed, any_scored)``: float32 ``[n]`` and bool ``[n]``.
    """
    own = np.asarray(own, dtype=np.float64)
    if not values:
        return own.astype(np.float32), np.zeros(len(own), dtype=bool)
    v = np.stack([np.asarray(x, dtype=np.float64) for x in values])  # [K, n]
    ok = np.stack([np.asarray(x, dtype=bool) for x in scored])
    log_w = np.log(np.asarray(weights, dtype=np.float64))[:, None]
    terms = np.where(ok, log_w + np.where(ok, v, 0.0), -np.inf)
    norm = np.where(ok, log_w, -np.inf)
    any_ok = ok.any(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mixed = _logsumexp(terms) - _logsumexp(norm)
    return np.where(any_ok, mixed, own).astype(np.float32), any_ok


def _logsumexp(x: np.ndarray) -> np.ndarray:
    """Column-wise ``log sum exp`` with the max subtracted; ``-inf`` for a column of ``-inf``."""
    top = x.max(axis=0)
    safe = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return safe + np.log(np.exp(x - safe).sum(axis=0))
