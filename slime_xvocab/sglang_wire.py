"""SGLang's prefill-only ``/generate`` wire format, as pure functions: request in, parsed arrays out.

No I/O and no state: :func:`build_request` makes the body that scores a batch of ``(input_ids,
response_start)`` items, :func:`parse_answer` validates a decoded answer and returns the response log-probs
(raising :class:`BadAnswer` for anything that does not fit), :func:`parse_error_message` reads an error body.
:class:`~slime_xvocab.teacher_client.TeacherClient` composes them with the HTTP transport, the retry policy
and the endpoint pool; ``docs/teacher-server.md`` documents the protocol.

An answer is accepted only if:

* it is JSON of the right shape (an object per sequence; an array of them for a batch);
* ``meta_info.prompt_tokens == len(input_ids)`` (catches a server that truncates, ``--allow-auto-truncate``);
* ``len(input_token_logprobs) == prompt_tokens - logprob_start_len`` and the leading entry's logprob is null;
* the echoed token ids equal the ids sent;
* every log-prob is finite and ``<= 0`` (up to :data:`LOGPROB_EPS` of rounding).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import numpy as np

try:  # orjson is 3-10x faster on the log-prob lists; it comes with sglang-router. json is the fallback.
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None

__all__ = [
    "LOGPROB_EPS", "TEMPERATURE_KEY", "BadAnswer", "build_request", "parse_answer", "parse_error_message", "dumps",
    "loads", "collector_paused",
    "TopK",
]

#: Largest log-prob accepted as "<= 0": float32 log-softmax of a near-certain token can round above 0.
LOGPROB_EPS = 1e-4
#: SGLang's request option (and ``meta_info`` echo) for temperature-scaled input log-probs (sglang#36213).
TEMPERATURE_KEY = "input_logprob_temperature"


class BadAnswer(ValueError):
    """An answer that fails validation. ``index`` is the batch item at fault (0 for a single request)."""

    def __init__(self, index: int, n_items: int, what: str) -> None:
        super().__init__(what)
        self.index = index
        self.n_items = n_items
        self.what = what


def dumps(obj: Any) -> bytes:
    """JSON bytes (orjson when installed)."""
    if _orjson is not None:
        return _orjson.dumps(obj)
    return json.dumps(obj, separators=(",", ":")).encode()


_GC_LOCK = threading.Lock()
_GC_PAUSES = 0  # decodes in flight that paused the collector


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Pause the garbage collector for the block (nested and concurrent pauses end with the last one).

    A decoded answer is thousands of small lists (tens of thousands with a top-k). A collection while they
    are alive costs more than the decode, and each one they survive brings the next full collection closer
    (a full collection walks the whole process: 150-250 ms with torch imported). Decoding, validating and
    dropping an answer inside one pause keeps them from every collection; none of them forms a cycle.
    """
    global _GC_PAUSES
    with _GC_LOCK:
        paused = gc.isenabled() or _GC_PAUSES > 0
        if paused:
            _GC_PAUSES += 1
            gc.disable()
    try:
        yield
    finally:
        if paused:
            with _GC_LOCK:
                _GC_PAUSES -= 1
                if _GC_PAUSES == 0:
                    gc.enable()


def loads(data: bytes) -> Any:
    """Decode JSON bytes (orjson when installed), the collector paused (:func:`collector_paused`); raises
    ValueError."""
    with collector_paused():
        return _orjson.loads(data) if _orjson is not None else json.loads(data)


@dataclass(frozen=True, eq=False)
class TopK(Sequence):
    """The teacher's top-k at every response position, held flat: position ``j``'s candidates are
    ``ids[offsets[j]:offsets[j + 1]]`` with log-probs ``lps[...]`` (best first, as the server listed them).

    It reads like a list of ``(ids int64[<=k], lps float32[<=k])`` pairs, one per position; code that wants all
    candidates at once uses the flat arrays.
    """

    ids: np.ndarray
    lps: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, j):
        if isinstance(j, slice):
            return [self[i] for i in range(*j.indices(len(self)))]
        if j < 0:
            j += len(self)
        if not 0 <= j < len(self):
            raise IndexError(j)
        lo, hi = self.offsets[j], self.offsets[j + 1]
        return self.ids[lo:hi], self.lps[lo:hi]


def parse_error_message(body: bytes | str | Any) -> str:
    """Extract the human-readable message from an SGLang (or router/proxy) error body.

    Understands the three envelopes SGLang uses: ``{"error": {"message": s}}``, ``{"error": s}`` and
    ``{"object": "error", "message": s, ...}``; also a bare ``{"message": s}`` / ``{"detail": s}``. Anything
    else (plain text, HTML from a proxy) is returned as text, trimmed to 500 characters.

    Args:
        body: the raw response body (bytes or str) or an already-decoded JSON value.

    Returns:
        The message (never empty: ``"<empty body>"`` for an empty body).

    Example:
        >>> parse_error_message(b'{"error": {"message": "input_ids cannot be empty."}}')
        'input_ids cannot be empty.'
    """
    obj = body
    if isinstance(body, (bytes, bytearray, str)):
        text = body.decode("utf-8", "replace") if isinstance(body, (bytes, bytearray)) else body
        if not text.strip():
            return "<empty body>"
        try:
            obj = json.loads(text)
        except ValueError:
            return text.strip()[:500]
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict) and err.get("message") is not None:
            return str(err["message"])
        if isinstance(err, str) and err:
            return err
        for key in ("message", "detail"):
            if obj.get(key) is not None:
                return str(obj[key])
    return json.dumps(obj)[:500] if not isinstance(obj, str) else obj[:500]


def build_request(
    items: Sequence[tuple[Sequence[int], int]], top_logprobs: int = 0, temperature: float = 1.0
) -> dict[str, Any]:
    """Build the ``/generate`` body that scores ``items``.

    Args:
        items: ``(input_ids, response_start)`` pairs, already validated (ids as Python ints).
            One item gives a single request; several give SGLang's batch form (list of lists). A batch whose
            items share one start sends ``logprob_start_len`` as one number: sglang-router's typed request
            rejects a list (422), so only a batch with different starts needs a worker URL.
        top_logprobs: k > 0 adds ``top_logprobs_num``.
        temperature: T != 1 adds ``input_logprob_temperature`` (sglang#36213); T = 1 sends the stock body.

    Returns:
        The JSON-ready dict.
    """
    params = {"max_new_tokens": 0, "temperature": 1.0, "skip_special_tokens": False}
    if len(items) == 1:
        ids, start = items[0]
        body: dict[str, Any] = {"input_ids": ids, "logprob_start_len": start - 1}
    else:
        starts = [s - 1 for _, s in items]
        body = {"input_ids": [ids for ids, _ in items], "logprob_start_len": starts}
        if len(set(starts)) == 1:
            body["logprob_start_len"] = starts[0]
    body["sampling_params"] = params
    body["return_logprob"] = True
    if top_logprobs > 0:
        body["top_logprobs_num"] = top_logprobs
    if temperature != 1.0:
        body[TEMPERATURE_KEY] = float(temperature)
    return body


def parse_answer(
    data: Any, items: Sequence[tuple[Sequence[int], int]], top_k: int = 0
) -> list[tuple[np.ndarray, list | None, float]]:
    """Validate a decoded ``/generate`` answer for ``items`` and extract the response log-probs.

    Args:
        data: the decoded JSON answer (an object, or an array of them for a batch).
        items: the ``(input_ids, response_start)`` pairs that were sent (ids as Python ints).
        top_k: the ``top_logprobs_num`` that was sent (0: none).

    Returns:
        Per item ``(log_probs float32[len(ids) - response_start], top, temperature)``; ``top`` is None unless
        ``top_k > 0``, then one ``(ids int64[<=k], lps float32[<=k])`` per response position; ``temperature`` is
        the input-logprob temperature the server says it applied (1.0 when it says nothing).

    Raises:
        BadAnswer: the answer does not have the documented shape and values (see the module doc).
    """
    n = len(items)
    if n == 1:
        if isinstance(data, list) and len(data) == 1:
            data = data[0]
        objs = [data]
    else:
        if not isinstance(data, list):
            raise BadAnswer(0, n, f"expected a JSON array of {n} objects for a batch, got {type(data).__name__}")
        if len(data) != n:
            raise BadAnswer(0, n, f"batch answer has {len(data)} items, {n} sequences were sent")
        objs = data
    out = []
    for i, (obj, (ids, rs)) in enumerate(zip(objs, items, strict=True)):
        try:
            out.append(_parse_item(obj, list(ids), int(rs), top_k))
        except _ItemError as e:
            raise BadAnswer(i, n, str(e)) from None
        except (TypeError, ValueError, KeyError, IndexError) as e:
            raise BadAnswer(i, n, f"malformed entry ({type(e).__name__}: {e})") from None
    return out


class _ItemError(Exception):
    pass


# An SGLang log-prob entry is ``[logprob, token_id, text_or_null]``; mapping these over the entries runs in C,
# twice as fast as a generator expression over tens of thousands of them.
_LOGPROB, _TOKEN_ID = itemgetter(0), itemgetter(1)


def _parse_top(entries: list, top_k: int) -> TopK:
    """Every position's top-k list, checked and flattened in a few vectorised passes."""
    counts = np.fromiter(
        (len(e) if isinstance(e, list) else -1 for e in entries), dtype=np.int64, count=len(entries)
    )
    bad = np.flatnonzero((counts < 1) | (counts > top_k))
    if len(bad):
        raise _ItemError(f"input_top_logprobs at response offset {int(bad[0])} should list 1..{top_k} entries")
    flat = list(itertools.chain.from_iterable(entries))
    try:
        lps = np.fromiter(map(_LOGPROB, flat), dtype=np.float64, count=len(flat))
        ids = np.fromiter(map(_TOKEN_ID, flat), dtype=np.int64, count=len(flat))
    except (TypeError, ValueError, IndexError, KeyError):
        lps, ids = None, None
    offsets = np.concatenate([[0], np.cumsum(counts)])
    if lps is None or not (np.isfinite(lps) & (lps <= LOGPROB_EPS)).all():
        for j, entry in enumerate(entries):  # find the first bad entry for the message
            raw = [e[0] if isinstance(e, list) and e else None for e in entry]
            try:
                _check_lps(np.array(raw, dtype=np.float64), raw, f"top-k logprob at response offset {j}, rank")
                np.array([e[1] for e in entry], dtype=np.int64)
            except (TypeError, ValueError, IndexError) as exc:
                raise _ItemError(f"input_top_logprobs at response offset {j}: malformed entry ({exc})") from None
        raise _ItemError("input_top_logprobs: malformed entries")
    return TopK(ids, lps.astype(np.float32), offsets)


def _check_lps(lps: np.ndarray, raw: list, what: str) -> None:
    """Every value finite and <= 0. ``np.array([None], float)`` is nan, so nulls are caught here too."""
    bad = ~np.isfinite(lps) | (lps > LOGPROB_EPS)
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        got = "null" if raw[j] is None else repr(raw[j])
        raise _ItemError(f"{what} {j} is {got}; log-probs must be finite numbers <= 0")


def _parse_item(obj: Any, ids: list[int], rs: int, top_k: int) -> tuple[np.ndarray, list | None, float]:
    if not isinstance(obj, dict) or not isinstance(obj.get("meta_info"), dict):
        raise _ItemError(f"expected an object with 'meta_info', got {str(obj)[:120]!r}")
    meta = obj["meta_info"]
    applied = meta.get(TEMPERATURE_KEY, 1.0)
    if isinstance(applied, bool) or not isinstance(applied, (int, float)) or not applied > 0:
        raise _ItemError(f"meta_info.{TEMPERATURE_KEY}={applied!r} is not a positive number")
    L = len(ids)
    start = rs - 1
    pt = meta.get("prompt_tokens")
    if pt != L:
        raise _ItemError(
            f"meta_info.prompt_tokens={pt!r} but {L} input ids were sent (the server truncated or changed "
            "the input; never run a teacher with --allow-auto-truncate)"
        )
    itl = meta.get("input_token_logprobs")
    if not isinstance(itl, list):
        raise _ItemError("meta_info.input_token_logprobs is missing (was return_logprob ignored?)")
    if len(itl) != L - start:
        raise _ItemError(
            f"len(input_token_logprobs)={len(itl)} but prompt_tokens - logprob_start_len = "
            f"{L} - {start} = {L - start}"
        )
    if itl[0][0] is not None:
        raise _ItemError(
            f"the leading input_token_logprobs entry should have a null logprob, got {itl[0][0]!r}"
        )
    echoed = list(map(_TOKEN_ID, itl))
    if echoed != ids[start:]:
        j = next(
            (k for k, (a, b) in enumerate(zip(echoed, ids[start:], strict=False)) if a != b),
            min(len(echoed), L - start),
        )
        got = echoed[j] if j < len(echoed) else None
        raise _ItemError(f"echoed token id at position {start + j} is {got!r}, sent {ids[start + j]}")
    vals = list(map(_LOGPROB, itertools.islice(itl, 1, None)))
    try:
        lps = np.array(vals, dtype=np.float64)
    except (TypeError, ValueError):
        j = next(k for k, v in enumerate(vals) if not isinstance(v, (int, float)) or isinstance(v, bool))
        raise _ItemError(f"logprob at response offset {j} is {vals[j]!r}, expected a number") from None
    _check_lps(lps, vals, "logprob at response offset")
    top = None
    if top_k > 0:
        itop = meta.get("input_top_logprobs")
        if not isinstance(itop, list) or len(itop) != len(itl):
            got = len(itop) if isinstance(itop, list) else type(itop).__name__
            raise _ItemError(
                f"input_top_logprobs has {got} entries, expected {len(itl)} (top_logprobs_num={top_k})"
            )
        top = _parse_top(itop[1:], top_k)
    return lps.astype(np.float32), top, float(applied)
