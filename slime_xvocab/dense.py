"""Dense targets: the teacher's distribution over the student's next token, from the teacher's top-k.

At every student response position ``j`` (the student is about to write ``s_j`` after the bytes ``x[:y]``,
``y`` = where ``s_j`` starts) the target is::

    q_j(t) = P_teacher( the student's canonical tokenization of the continuation starts with t | x[:y],
                        the student ended its previous token at y )

read from the teacher's top-k with the rule :mod:`~slime_xvocab.credit` uses for one token, applied to every
candidate:

* **Paths through y.** The teacher position that starts at ``y`` (when a teacher token boundary falls there)
  contributes every top-k candidate, weighted by the observed teacher path up to it; top-k candidates at
  earlier positions that agree with the text up to ``y`` and run past it (``"26"`` when the student is
  between ``"2"`` and ``"6"``, or an alternative teacher token crossing a boundary) contribute what is left of
  their bytes, weighted by the path up to them.
* **Projection.** A candidate's continuation bytes go to the student token that the student's canonical
  tokenization of those bytes starts with (:class:`StudentProjection`, tokenizer-checked, cached); the
  realized continuation goes to the token the student actually wrote; a teacher end of turn goes to the
  student's end of turn.
* **Conditioning.** Continuations that would have made the student write a longer token before ``y``
  (``" the"`` followed by ``"re"`` is ``" there"``) are not paths of this student prefix and are dropped
  (:class:`~slime_xvocab.credit.StudentExtensions`).
* **Tail.** Mass the top-k does not list at the position starting at ``y``, candidates whose bytes end
  exactly at ``y`` off the observed path (what follows them is unknown), continuations that start inside a
  character or spell no student token, and student tokens beyond the ``top_k`` most likely: one bucket.

The listed probabilities and the tail sum to 1 at every valid position. First order, as the credit: a
candidate whose bytes could still be extended by what would follow it is assigned to the token its own bytes
start with, and candidates outside the top-k are invisible (they are in the tail where the position starts
at ``y``, and missing from the normaliser where they would cross ``y``).

Positions get no target (``valid`` False) when the teacher does not see them: a normaliser rewrote the text
(``exact_bytes`` False), the teacher's context ended before them, a zero-width token other than the final end
of turn, or a sample the teacher could not score.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .alignment import _encode_continuation
from .credit import (
    StudentExtensions,
    _candidates,
    _extension_queries,
    _logsumexp_by,
    _match_lengths,
    _segment_ranges,
)
from .token_bytes import PerObject, TokenBytes, tokenizer_lock

__all__ = [
    "DEFAULT_DENSE_TOP_K",
    "DIVERGENCES",
    "DenseTargets",
    "StudentProjection",
    "dense_targets",
    "identity_dense_targets",
    "student_projection",
]

#: Divergences the dense loss offers (:func:`~slime_xvocab.dense_loss.bucket_divergence`).
DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")
#: Student tokens kept per position by default (the rest of the projected mass joins the tail).
DEFAULT_DENSE_TOP_K = 20


@dataclass(frozen=True, eq=False)
class DenseTargets:
    """One sample's dense targets, compact: ``K`` student ids per response position plus a tail bucket.

    Attributes:
        ids: int32 ``[n, K]``: student token ids, most likely first; ``-1`` pads positions with fewer.
        log_probs: float32 ``[n, K]``: the teacher's log-probability of each id (0.0 where ``ids`` is -1).
        tail: float32 ``[n]``: probability mass of everything not listed (0 <= tail <= 1).
        valid: bool ``[n]``: positions that have a target; elsewhere ids are -1 and tail is 1.

    Every value is finite; at a valid position ``exp(log_probs[ids >= 0]).sum() + tail == 1`` (float32).
    Plain numpy arrays, so samples pickle across Ray actors.
    """

    ids: np.ndarray
    log_probs: np.ndarray
    tail: np.ndarray
    valid: np.ndarray

    @property
    def n(self) -> int:
        return int(self.ids.shape[0])

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays (what travels to the training side per sample)."""
        return int(self.ids.nbytes + self.log_probs.nbytes + self.tail.nbytes + self.valid.nbytes)

    @classmethod
    def empty(cls, n: int, k: int) -> DenseTargets:
        """No target anywhere (a sample the teacher could not score)."""
        return cls(
            np.full((n, k), -1, dtype=np.int32), np.zeros((n, k), dtype=np.float32),
            np.ones(n, dtype=np.float32), np.zeros(n, dtype=bool),
        )

    def check(self, n: int | None = None) -> None:
        """Raise ValueError unless the arrays have the documented shapes, dtypes and finite values."""
        ids, lps, tail, valid = self.ids, self.log_probs, self.tail, self.valid
        if ids.ndim != 2 or lps.shape != ids.shape or tail.shape != (ids.shape[0],) or valid.shape != tail.shape:
            raise ValueError(f"dense targets: inconsistent shapes {ids.shape}, {lps.shape}, {tail.shape}, "
                             f"{valid.shape}")
        if n is not None and ids.shape[0] != n:
            raise ValueError(f"dense targets cover {ids.shape[0]} positions, the sample has {n}")
        if not (np.isfinite(lps).all() and np.isfinite(tail).all()):
            raise ValueError("dense targets hold non-finite values")
        if (lps > 1e-6).any() or (tail < 0).any() or (tail > 1 + 1e-6).any():
            raise ValueError("dense targets: log-probs must be <= 0 and the tail in [0, 1]")

    def stats(self) -> dict[str, float]:
        """Per-sample sums for metrics: positions, valid positions, listed (top-k) mass and tail mass."""
        v = self.valid
        return {
            "positions": float(self.n),
            "valid": float(v.sum()),
            "tail_sum": float(self.tail[v].sum()),
            "ids_sum": float((self.ids[v] >= 0).sum()),
        }


# --------------------------------------------------------------------------------------------------
# Bytes -> the student token they start with


class StudentProjection:
    """Which student token does the student's canonical tokenization of some bytes start with?

    Answered by the student tokenizer (the bytes trimmed to whole characters, encoded as a continuation)
    and cached; -1 when no student token starts there or the bytes spell nothing.
    """

    def __init__(self, tokenizer: Any, student_table: TokenBytes, *, cache_size: int = 1 << 20) -> None:
        self.tokenizer, self.student_table = tokenizer, student_table
        self._cache: dict[tuple[bytes, bytes], int] = {}
        self._by_table: dict[int, tuple[Any, np.ndarray]] = {}
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def of_tokens(self, teacher_table: TokenBytes, teacher_ids: np.ndarray) -> np.ndarray:
        """int64 student id per whole teacher token (no lead): ``self([(b"", bytes(t))])``, cached in an array."""
        with self._lock:
            held = self._by_table.get(id(teacher_table))
            if held is None or held[0]() is not teacher_table:
                held = (weakref.ref(teacher_table), np.full(teacher_table.vocab_size, -2, dtype=np.int64))
                self._by_table[id(teacher_table)] = held
        table = held[1]
        out = table[teacher_ids]
        unknown = np.unique(teacher_ids[out == -2])
        if len(unknown):
            table[unknown] = self([(b"", teacher_table.bytes_of([int(t)])) for t in unknown.tolist()])
            out = table[teacher_ids]
        return out

    def __call__(self, pieces: Sequence[tuple[bytes, bytes]]) -> np.ndarray:
        """int64 student id per ``(lead, piece)``, -1 where none.

        ``piece`` is what follows the point in question; ``lead`` the bytes of the character that point
        falls inside, before it (empty on a character boundary). The answer is the token of the student's
        canonical tokenization of ``lead + piece`` that starts right after ``lead``.
        """
        out = np.full(len(pieces), -1, dtype=np.int64)
        cache = self._cache
        for k, key in enumerate(pieces):
            hit = cache.get(key)
            if hit is None:
                hit = self._project(*key)
                with self._lock:
                    if len(cache) >= self._cache_size:
                        cache.clear()
                    cache[key] = hit
            out[k] = hit
        return out

    def _project(self, lead: bytes, piece: bytes) -> int:
        whole = lead + piece
        if not piece or (whole[0] & 0xC0) == 0x80:  # nothing, or no character start to tokenize from
            return -1
        for cut in range(len(whole), max(len(lead), len(whole) - 4), -1):
            try:
                return self._token_at(whole[:cut].decode("utf-8"), len(lead), piece, len(whole))
            except UnicodeDecodeError:
                continue
        for filler in (b"\x80", b"\x90", b"\xa0"):
            try:
                text = (whole + filler * 3).decode("utf-8", errors="ignore")
            except UnicodeDecodeError:  # pragma: no cover - errors="ignore" never raises
                continue
            if len(text.encode()) > len(whole):
                token = self._token_at(text, len(lead), piece, len(whole) - 1)
                # A byte-fallback piece stands for a character the tokenizer does not know, which the filler
                # may be and the real character need not: no answer.
                return -1 if token >= 0 and self._byte_fallback(token) else token
        return -1

    def _byte_fallback(self, token: int) -> bool:
        name = self.tokenizer.convert_ids_to_tokens(token)
        return isinstance(name, str) and len(name) == 6 and name.startswith("<0x") and name.endswith(">")

    def _token_at(self, text: str, at: int, piece: bytes, known: int) -> int:
        """The token of ``text``'s canonical tokenization that starts at byte ``at``, if it ends by ``known``
        and spells a prefix of ``piece``; else -1."""
        with tokenizer_lock(self.tokenizer):
            ids, _ = _encode_continuation(self.tokenizer, self.student_table, text)
        lengths = self.student_table.lengths_of(ids)
        starts = np.cumsum(lengths) - lengths
        if int(lengths.sum()) != len(text.encode()):  # the tokenizer rewrote the text: no answer
            return -1
        hit = np.flatnonzero((starts == at) & (lengths > 0))
        if not len(hit) or starts[hit[0]] + lengths[hit[0]] > known:
            return -1
        token = int(ids[hit[0]])
        return token if piece.startswith(self.student_table.bytes_of([token])) else -1


_PROJECTIONS = PerObject()


def student_projection(tokenizer: Any, student_table: TokenBytes) -> StudentProjection:
    """The :class:`StudentProjection` of a student tokenizer, built once per tokenizer object."""
    return _PROJECTIONS.get(tokenizer, lambda: StudentProjection(tokenizer, student_table))


class TokenPrefixes:
    """How many tokens of a vocabulary start with given bytes (one sorted table per tokenizer; answers cached).

    Args:
        table: the tokenizer's :class:`~slime_xvocab.token_bytes.TokenBytes`.
    """

    CACHE_SIZE = 1 << 20

    def __init__(self, table: TokenBytes) -> None:
        self._counts: dict[bytes, int] = {}
        lengths = table.lengths
        spelled = np.flatnonzero(lengths > 0)
        blob = table.blob.tobytes()
        tokens = sorted({blob[a:a + n] for a, n in zip(table.offsets[spelled].tolist(), lengths[spelled].tolist())})
        self._sorted = np.empty(len(tokens), dtype=object)
        self._sorted[:] = tokens
        # The longest token per first byte and per first two bytes: a cheap test that rules out most prefixes
        # before the exact count.
        firsts = np.frombuffer(b"".join(t[:2].ljust(2, b"\0") for t in tokens), dtype=np.uint8).reshape(-1, 2)
        n_bytes = np.fromiter((len(t) for t in tokens), dtype=np.int64, count=len(tokens))
        self._longest1 = np.zeros(256, dtype=np.int64)
        np.maximum.at(self._longest1, firsts[:, 0], n_bytes)
        two = n_bytes >= 2
        self._longest2 = np.zeros(1 << 16, dtype=np.int64)
        np.maximum.at(self._longest2, firsts[two, 0].astype(np.int64) * 256 + firsts[two, 1], n_bytes[two])

    def reach(self, text: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """int64: for each start, the longest prefix of ``text[start:]`` that some token could start with, by
        the token's first two bytes (an upper bound; :meth:`count` is exact). ``text`` is uint8, starts inside."""
        first = text[starts].astype(np.int64)
        second = text[np.minimum(starts + 1, len(text) - 1)].astype(np.int64)
        two = np.where(starts + 1 < len(text), self._longest2[first * 256 + second], 0)
        return np.maximum(np.minimum(self._longest1[first], 1), two)

    def count(self, prefixes: Sequence[bytes]) -> np.ndarray:
        """int64 ``[len(prefixes)]``: distinct tokens that start with each prefix (the prefix itself included)."""
        # Answers are read into a local dict first: another thread may clear the shared cache meanwhile.
        got = {p: self._counts.get(p) for p in set(prefixes)}
        missing = [p for p, n in got.items() if n is None]
        if missing:
            keys = np.empty(len(missing), dtype=object)
            keys[:] = missing
            ends = [_successor(p) for p in missing]
            # The tokens that start with p sort from p itself up to (not including) p's successor.
            lo = np.searchsorted(self._sorted, keys, side="left")
            hi = np.full(len(missing), len(self._sorted), dtype=np.int64)
            bounded = np.flatnonzero([e is not None for e in ends])
            if len(bounded):
                upper = np.empty(len(bounded), dtype=object)
                upper[:] = [ends[r] for r in bounded.tolist()]
                hi[bounded] = np.searchsorted(self._sorted, upper, side="left")
            new = dict(zip(missing, np.maximum(hi - lo, 0).tolist()))
            got.update(new)
            if len(self._counts) + len(new) > self.CACHE_SIZE:
                self._counts.clear()
            self._counts.update(new)
        return np.fromiter((got[p] for p in prefixes), dtype=np.int64, count=len(prefixes))


def _successor(prefix: bytes) -> bytes | None:
    """The smallest byte string above every string that starts with ``prefix`` (None: there is none)."""
    stem = prefix.rstrip(b"\xff")
    return stem[:-1] + bytes([stem[-1] + 1]) if stem else None


_PREFIXES = PerObject()


def token_prefixes(table: TokenBytes) -> TokenPrefixes:
    """The :class:`TokenPrefixes` of a tokenizer's byte table, built once per table."""
    return _PREFIXES.get(table, lambda: TokenPrefixes(table))


def _least_listed(top: Sequence) -> np.ndarray:
    """Per position, the log-prob of the least likely top-k candidate (0.0 where none is listed)."""
    if hasattr(top, "offsets"):  # sglang_wire.TopK: already flat
        offsets, lps = np.asarray(top.offsets, dtype=np.int64), np.asarray(top.lps, dtype=np.float64)
    else:
        counts = np.fromiter((len(t[1]) for t in top), dtype=np.int64, count=len(top))
        offsets = np.concatenate([[0], np.cumsum(counts)])
        lps = np.concatenate([np.asarray(t[1], dtype=np.float64) for t in top]) if len(top) else np.zeros(0)
    out = np.zeros(len(offsets) - 1)
    has = np.diff(offsets) > 0
    if has.any():  # empty positions are skipped, so each reduced segment is one position's candidates
        out[has] = np.minimum.reduceat(lps, offsets[:-1][has])
    return out


def _unlisted_mass_through(ys: np.ndarray, t_start: np.ndarray, text: bytes, listed: np.ndarray,
                          top: Sequence | None, path_before: np.ndarray, table: TokenBytes) -> np.ndarray:
    """log of an upper bound of the teacher's mass on tokens its top-k does not list that agree with the text
    through ``y``, for every ``y`` in ``ys`` (sorted; -inf where there is none).

    A text position ``i`` that starts before ``y`` contributes ``P(observed path before i) x min(u_i, n_i x
    least_i)``: ``u_i`` its unlisted mass (1 - listed - the observed token where the top-k missed it), ``n_i``
    the number of teacher tokens that start with ``text[start_i:y]``, ``least_i`` its least likely listed
    candidate (no unlisted token is more likely). Read alone, the listed paths would make a prefix the teacher
    rarely takes look certain: its own top-k rarely shows the paths that carry most of that prefix's mass.
    """
    out = np.full(len(ys), -np.inf)
    if top is None or not len(ys) or not len(t_start):
        return out
    m = len(t_start)
    unlisted = 1.0 - listed[:m]
    prefixes = token_prefixes(table)
    # Pairs (position i, y) with start_i < y <= start_i + the longest token that could start there (ys sorted).
    pos = np.flatnonzero((unlisted > 1e-9) & (t_start < len(text)))
    reach = t_start[pos] + prefixes.reach(np.frombuffer(text, dtype=np.uint8), t_start[pos])
    at, owner = _segment_ranges(np.searchsorted(ys, t_start[pos], side="right"),
                                np.searchsorted(ys, reach, side="right"))
    i = pos[at]
    if not len(owner):
        return out
    n = prefixes.count([text[a:b] for a, b in zip(t_start[i].tolist(), ys[owner].tolist())])
    hit = n > 0
    owner, i, n = owner[hit], i[hit], n[hit]
    bound = np.minimum(np.log(unlisted[i]), np.log(n) + _least_listed(top)[i])
    out[:] = _logsumexp_by(path_before[i] + bound, owner, len(ys))
    return out


# --------------------------------------------------------------------------------------------------
# The targets of one sample


def dense_targets(
    view: Any,
    teacher_log_probs: np.ndarray,
    teacher_top: Sequence | None,
    projection: StudentProjection,
    extensions: StudentExtensions | Any,
    teacher_table: TokenBytes,
    *,
    top_k: int = DEFAULT_DENSE_TOP_K,
    teacher_end_ids: Iterable[int] = (),
    student_end_id: int | None = None,
) -> DenseTargets:
    """The teacher's distribution over the student's next token at every response position.

    Args:
        view: the sample's :class:`~slime_xvocab.teacher_view.TeacherView` (``alignment``, ``student_ids``,
            ``student_spans``, ``response_ids``, ``eot_ids``, ``probe_ids``, ``exact_bytes``).
        teacher_log_probs: float ``[n_teacher]``: the teacher's log-prob of each id in ``view.response_ids``.
        teacher_top: per teacher position ``(ids, log_probs)`` of its top-k (None: no targets).
        projection: :func:`student_projection` of the student tokenizer.
        extensions: :func:`~slime_xvocab.credit.student_extensions` of the student tokenizer.
        teacher_table: the teacher's :class:`~slime_xvocab.token_bytes.TokenBytes`.
        top_k: student tokens kept per position; the rest of the projected mass joins the tail.
        teacher_end_ids: teacher ids that end the turn (besides ``view.eot_ids``).
        student_end_id: the student's end-of-turn id for responses that do not end with one (a response that
            does uses its own); without one, teacher end-of-turn mass at a text position is tail.

    Returns:
        :class:`DenseTargets` with ``n = len(view.student_ids)`` positions.
    """
    s_ids = np.asarray(view.student_ids, dtype=np.int64)
    n = len(s_ids)
    empty = DenseTargets.empty(n, top_k)
    alignment = view.alignment
    if teacher_top is None or not view.exact_bytes or not n or not alignment.num_chunks:
        return empty
    teacher = np.asarray(teacher_log_probs, dtype=np.float64)
    t_ids = np.asarray(view.response_ids, dtype=np.int64)
    m_all = len(t_ids)
    if teacher.shape != (m_all,) or len(teacher_top) != m_all:
        raise ValueError(f"dense_targets: {len(teacher)} log-probs / {len(teacher_top)} top-k lists for "
                         f"{m_all} teacher positions")
    m = m_all - len(view.eot_ids) - len(getattr(view, "probe_ids", ()))
    if m <= 0:
        return empty
    blob = teacher_table.blob
    data = teacher_table.bytes_of(t_ids[:m])
    text = np.frombuffer(data, dtype=np.uint8)
    t_len = teacher_table.lengths_of(t_ids[:m])
    t_end = np.cumsum(t_len)
    t_start = t_end - t_len
    # The probe's id and log-prob mean nothing (only its top-k does): no candidate there is the real one.
    scored_ids = t_ids.copy()
    scored_ids[m + len(view.eot_ids):] = -1
    c = _candidates(scored_ids, teacher, teacher_top, teacher_table)
    starts = np.concatenate([t_start, np.full(m_all - m, len(data), dtype=np.int64)])
    match = _match_lengths(c, starts, text, blob)
    path_before = np.concatenate([[0.0], np.cumsum(teacher)])
    live_cand = c.ids >= 0
    listed = np.bincount(c.pos[live_cand], weights=np.exp(c.lp[live_cand]), minlength=m_all)
    log_unlisted = np.log(np.maximum(1.0 - listed, 1e-300))
    has_unlisted = listed < 1.0 - 1e-9
    # Branch positions: text positions, then the one position right after the text (end of turn or probe).
    branch_start = np.where(np.arange(m_all) <= m, starts, np.iinfo(np.int64).max)

    # Student queries: where each position starts, where its token ends, its previous text token.
    s_spans = np.asarray(view.student_spans, dtype=np.int64)
    width = s_spans[:, 1] - s_spans[:, 0]
    end_id = int(s_ids[-1]) if width[-1] == 0 and view.eot_ids else student_end_id
    y_all = s_spans[:, 0]
    is_eot = (width == 0) & (np.arange(n) == n - 1) & (y_all == len(data)) & (len(view.eot_ids) > 0)
    covered = (width > 0) & (y_all < len(data)) & (alignment.student_chunk >= 0)
    query = np.flatnonzero(covered | is_eot)
    if not len(query):
        return empty
    qy = y_all[query]
    q_tok = s_ids[query]
    q_eot = is_eot[query]
    text_pos = np.flatnonzero(width > 0)
    k_prev = np.searchsorted(text_pos, query, side="left") - 1
    prev = np.where(k_prev >= 0, s_ids[text_pos[np.maximum(k_prev, 0)]], -1)
    # B: the first teacher boundary at or after the end of the student token (the text's end at most).
    q_b = np.minimum(s_spans[query, 1], len(data))
    ib = np.searchsorted(t_end, q_b, side="left")
    q_big = np.where(ib < m, t_end[np.minimum(ib, m - 1)], len(data))

    # The bytes of the character each query falls inside, before it (the projection tokenizes from there).
    continuation = np.append((text & 0xC0) == 0x80, False)
    has_lead = continuation[qy]
    lead = [b""] * len(qy)
    for r in np.flatnonzero(has_lead).tolist():
        yy = cs = int(qy[r])
        while cs > 0 and yy - cs < 3 and continuation[cs]:
            cs -= 1
        lead[r] = data[cs:yy]
    rows: dict[str, list] = {"q": [], "w": [], "target": [], "ask_k": [], "ask_off": []}

    def add(q, w, target, ask_k=None, ask_off=None):
        rows["q"].append(q)
        rows["w"].append(w)
        rows["target"].append(target)
        size = len(q)
        rows["ask_k"].append(ask_k if ask_k is not None else np.full(size, -1, dtype=np.int64))
        rows["ask_off"].append(ask_off if ask_off is not None else np.zeros(size, dtype=np.int64))

    def project(rows_at, pieces) -> None:
        if rows_at:
            target[np.asarray(rows_at, dtype=np.int64)] = projection(pieces)

    # 1. The observed path from y: it branches at every teacher position starting in [y, B].
    lo = np.searchsorted(branch_start, qy, side="left")
    hi = np.searchsorted(branch_start, q_big, side="right")
    bq, bi = _segment_ranges(lo, hi)
    last = hi[bq] - 1 == bi
    # Unlisted mass at a branch position: unknown tokens.
    u = has_unlisted[bi]
    add(bq[u], path_before[bi[u]] + log_unlisted[bi[u]], np.full(int(u.sum()), -1, dtype=np.int64))
    owner, k = _segment_ranges(c.first[bi], c.first[bi + 1])
    q, i, is_last = bq[owner], bi[owner], last[owner]
    keep = live_cand[k] & (~c.real[k] | is_last)
    q, i, k, is_last = q[keep], i[keep], k[keep], is_last[keep]
    w = path_before[i] + c.lp[k]
    z = branch_start[i]
    real = c.real[k]
    target = np.full(len(q), -1, dtype=np.int64)
    target[real] = np.where(q_eot[q[real]], end_id if end_id is not None else -1, q_tok[q[real]])
    zero = ~real & (c.length[k] == 0)
    ends = zero & np.isin(c.ids[k], np.asarray(sorted({*map(int, teacher_end_ids), *map(int, view.eot_ids)}),
                                               dtype=np.int64))
    at_y = z == qy[q]
    if end_id is not None:
        target[ends & at_y] = end_id
    spelled = ~real & (c.length[k] > 0)
    # A whole teacher token right at a character boundary: one cached answer per teacher id.
    simple = spelled & at_y & ~has_lead[q]
    target[simple] = projection.of_tokens(teacher_table, c.ids[k[simple]])
    # Past the end of the student's token the bytes are the ones it was written before: its own token, unless
    # (right at its end) the candidate would grow it, which the student tokenizer is asked (cached).
    s_end = s_spans[query, 1][q]
    after = (spelled | ends) & (z > s_end)
    target[after] = q_tok[q[after]]
    at_end = np.flatnonzero((spelled | ends) & (z == s_end) & ~at_y)
    if len(at_end):
        ask_end = _extension_queries(extensions, teacher_table) if isinstance(extensions, StudentExtensions) \
            else extensions
        kk = k[at_end]
        grown = ask_end(q_tok[q[at_end]], c.ids[kk], np.zeros(len(kk), dtype=np.int64), c.blob_start[kk],
                        c.length[kk])
        target[at_end[~grown]] = q_tok[q[at_end[~grown]]]
        at_end = at_end[grown]
    rows_at, pieces = [], []
    inside = (z < s_end) & ~at_y
    for r in np.flatnonzero(ends & inside).tolist():  # the text ends after the observed bytes x[y:z]
        rows_at.append(r)
        pieces.append((lead[q[r]], data[qy[q[r]]:z[r]]))
    for r in sorted(np.flatnonzero(spelled & ~simple & ~at_y & inside).tolist() + at_end.tolist()
                    + np.flatnonzero(spelled & at_y & has_lead[q]).tolist()):
        bs = int(c.blob_start[k[r]])
        rows_at.append(r)
        pieces.append((lead[q[r]], data[qy[q[r]]:z[r]] + blob[bs:bs + int(c.length[k[r]])].tobytes()))
    project(rows_at, pieces)
    ask_k = np.where(~real & at_y & (c.length[k] > 0), k, -1)
    add(q, w, target, ask_k, np.zeros(len(q), dtype=np.int64))
    # A path that runs past the last teacher position before B: the student's own token.
    none = np.flatnonzero(hi <= lo)
    if len(none):
        i_c = np.searchsorted(t_end, qy[none], side="right")
        add(none, path_before[np.minimum(i_c + 1, m)], np.where(q_eot[none], -1, q_tok[none]))

    # 2. Alternative teacher tokens that start before y, agree with the text up to y and run past it.
    order = np.argsort(qy, kind="stable")
    sorted_y = qy[order]
    text_cand = np.flatnonzero((c.pos < m) & ~c.real & live_cand)
    c_start = t_start[c.pos[text_cand]]
    reach = c_start + np.minimum(match[text_cand], c.length[text_cand])
    owner, idx = _segment_ranges(np.searchsorted(sorted_y, c_start, side="right"),
                                 np.searchsorted(sorted_y, reach, side="right"))
    if len(owner):
        k = text_cand[owner]
        q = order[idx]
        off = qy[q] - c_start[owner]
        rest = c.length[k] - off
        target = np.full(len(q), -1, dtype=np.int64)
        rows_at, pieces = [], []
        for r in np.flatnonzero(rest > 0).tolist():
            bs = int(c.blob_start[k[r]]) + int(off[r])
            rows_at.append(r)
            pieces.append((lead[q[r]], blob[bs:bs + int(rest[r])].tobytes()))
        project(rows_at, pieces)
        # Ending exactly at y, another path arrives there: what follows it is unknown (tail).
        add(q, path_before[c.pos[k]] + c.lp[k], target, np.where(rest > 0, k, -1), off)

    # 3. Tokens the top-k does not list, at positions starting before y, may run through y as well (a prefix
    #    the student rarely takes, "4" then "3", is mostly such paths: "4" + end of turn, "45", ...). An upper
    #    bound of their mass joins the tail, so the listed mass stays a lower bound of the teacher's instead
    #    of being read as certain.
    log_b = _unlisted_mass_through(qy, t_start, data, listed[:m], teacher_top, path_before, teacher_table)
    bounded = np.flatnonzero(np.isfinite(log_b))
    add(bounded, log_b[bounded], np.full(len(bounded), -1, dtype=np.int64))

    cq = np.concatenate(rows["q"]).astype(np.int64)
    cw = np.concatenate(rows["w"])
    target = np.concatenate(rows["target"]).astype(np.int64)
    ask_k = np.concatenate(rows["ask_k"])
    ask_off = np.concatenate(rows["ask_off"])
    # Conditioning: drop continuations that would have grown the previous student token.
    asked = np.flatnonzero((ask_k >= 0) & (prev[cq] >= 0))
    if len(asked):
        ask = _extension_queries(extensions, teacher_table) if isinstance(extensions, StudentExtensions) else extensions
        kk = ask_k[asked]
        grows = ask(prev[cq[asked]], c.ids[kk], ask_off[asked], c.blob_start[kk] + ask_off[asked],
                    c.length[kk] - ask_off[asked])
        keep = np.ones(len(cq), dtype=bool)
        keep[asked[grows]] = False
        cq, cw, target = cq[keep], cw[keep], target[keep]
    return _assemble(n, top_k, query, cq, cw, target)


def identity_dense_targets(teacher_top: Sequence | None, n: int, *, top_k: int = DEFAULT_DENSE_TOP_K,
                           scored: int | None = None) -> DenseTargets:
    """Dense targets when student and teacher share a tokenizer: position ``j``'s top-k as it is.

    Args:
        teacher_top: per teacher response position ``(ids, log_probs)`` (the teacher scored the student's own
            response tokens; position ``j`` is the distribution over response token ``j``).
        n: the sample's response length.
        top_k: ids kept per position.
        scored: positions the teacher scored (default ``len(teacher_top)``); later ones get no target.
    """
    if teacher_top is None:
        return DenseTargets.empty(n, top_k)
    m = min(n, len(teacher_top) if scored is None else scored)
    q, t, w = [], [], []
    for j in range(m):
        ids, lps = teacher_top[j]
        q.append(np.full(len(ids), j, dtype=np.int64))
        t.append(np.asarray(ids, dtype=np.int64))
        w.append(np.asarray(lps, dtype=np.float64))
    if not m:
        return DenseTargets.empty(n, top_k)
    cq, target, cw = np.concatenate(q), np.concatenate(t), np.concatenate(w)
    listed = np.bincount(cq, weights=np.exp(cw), minlength=m)
    rest = listed < 1.0 - 1e-9
    # The unlisted mass is one more (unnamed) outcome, so normalising over everything is the identity.
    cq = np.concatenate([cq, np.flatnonzero(rest)])
    target = np.concatenate([target, np.full(int(rest.sum()), -1, dtype=np.int64)])
    cw = np.concatenate([cw, np.log(np.maximum(1.0 - listed[rest], 1e-300))])
    return _assemble(n, top_k, np.arange(m), cq, cw, target)


def _assemble(n: int, top_k: int, query: np.ndarray, cq: np.ndarray, cw: np.ndarray,
              target: np.ndarray) -> DenseTargets:
    """Normalise per query, sum per (query, student token), keep the ``top_k`` most likely."""
    nq = len(query)
    log_z = _logsumexp_by(cw, cq, nq)
    ok = np.isfinite(log_z)
    named = (target >= 0) & ok[cq]
    stride = int(target.max(initial=0)) + 1
    uniq, inverse = np.unique(cq[named] * stride + target[named], return_inverse=True)
    log_pair = _logsumexp_by(cw[named], inverse.reshape(-1), len(uniq))
    pq, pid = uniq // stride, uniq % stride
    lp_pair = np.minimum(log_pair - log_z[pq], 0.0)
    order = np.lexsort((-lp_pair, pq))
    pq, pid, lp_pair = pq[order], pid[order], lp_pair[order]
    first = np.searchsorted(pq, np.arange(nq + 1))
    rank = np.arange(len(pq)) - first[pq]
    kept = rank < top_k
    ids = np.full((n, top_k), -1, dtype=np.int32)
    lps = np.zeros((n, top_k), dtype=np.float32)
    rows = query[pq[kept]]
    ids[rows, rank[kept]] = pid[kept]
    lps[rows, rank[kept]] = lp_pair[kept]
    listed_mass = np.bincount(pq[kept], weights=np.exp(lp_pair[kept]), minlength=nq)
    tail = np.ones(n, dtype=np.float32)
    tail[query] = np.clip(1.0 - listed_mass, 0.0, 1.0)
    valid = np.zeros(n, dtype=bool)
    valid[query] = ok & (listed_mass > 0)
    ids[~valid] = -1
    lps[~valid] = 0.0
    tail[~valid] = 1.0
    return DenseTargets(ids, lps, tail, valid)
