"""Credit: what each student token is worth to the teacher (slime's ``teacher_log_probs``).

:mod:`~slime_xvocab.alignment` says which bytes correspond; this module turns the teacher's scores of its own
tokens into one value per student token.

slime adds ``-coef * (log pi_s(y_j) - v_j)`` to token ``j``'s advantage. In expectation over the student's
samples that pulls the student toward ``pi(y) ∝ exp(v(y))``, so the student ends at the teacher only if ``v``
over the student's possible next tokens is the teacher's distribution over *student tokens*::

    v_j = log P_teacher( the student's tokenization of the continuation starts with s_j | text so far )

With ``Q(u)`` the teacher's probability that the response starts with bytes ``u`` and ``e_j`` the probability,
given the bytes up to the end of ``s_j``, that the next bytes do not extend ``s_j`` into a longer student token,
``v_j = log Q(b_<=j) e_j - log Q(b_<j) e_(j-1)``. Both factors are read from the teacher's top-k at each of its
positions (``credit_mode: student_token``, the default; :func:`student_token_credit`):

* ``Q`` sums the teacher paths that spell the bytes: the observed teacher tokens, plus every top-k candidate
  at an earlier position that agrees with the text up to the byte in question (a longer teacher token that
  crosses a boundary, e.g. ``" 你"`` where the teacher wrote ``" "`` then ``"你们"``).
* ``e`` removes the paths whose next bytes would make the student write a longer token instead (``" the"``
  followed by ``"re"`` is the student token ``" there"``, not ``" the"``). Whether bytes extend a student token
  is asked of the student tokenizer itself (:class:`StudentExtensions`).
* The end of turn is the teacher's end-of-turn mass given the whole text. A response cut by length, or an end
  of turn left unscored, is charged nothing for "the text ends here": the text did not end.

Values telescope: over a fully aligned response that ends its turn they sum to the teacher's log-prob of the
whole answer. Paths that leave the teacher's observed tokenization are counted up to where they leave it
(first order), and candidates outside the top-k are invisible; ``CreditResult.top_mass`` says how much of
the teacher's distribution the top-k covered.

The two simpler modes need no top-k: ``exact`` gives 1:1 chunks the teacher's log-prob and leaves every other
position at the student's value (slime PR #2032's rule), ``chunk`` passes each chunk's teacher log-mass to its
student tokens with a ``uniform`` or ``proportional`` split. Positions without a teacher value keep the
student's log-prob exactly, so their OPD delta is zero.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .alignment import Alignment, _encode_continuation
from .token_bytes import PerObject, TokenBytes, tokenizer_lock

__all__ = [
    "CREDIT_MODES",
    "CHUNK_SPLITS",
    "DEFAULT_TOP_K",
    "CreditResult",
    "StudentExtensions",
    "assign_credit",
    "student_token_credit",
    "student_extensions",
]

CREDIT_MODES = ("student_token", "chunk", "exact")
CHUNK_SPLITS = ("uniform", "proportional")
#: Teacher top-k per position that ``student_token`` credit asks for by default.
DEFAULT_TOP_K = 20


@dataclass(frozen=True)
class CreditResult:
    """The values of one sample, and what they rest on.

    Attributes:
        values: float32 ``[n_student]``: the teacher's value of each student response token; where ``scored``
            is False, exactly the student's own log-prob.
        scored: bool ``[n_student]``: positions that got a teacher value.
        top_mass: mean over teacher positions of the probability mass the top-k listed (1.0 without top-k
            use); ``1 - top_mass`` is the tail the values cannot see.
        clamped: positions whose value came out above 0 (first-order path accounting) and were set to 0.
    """

    values: np.ndarray
    scored: np.ndarray
    top_mass: float = 1.0
    clamped: int = 0


# --------------------------------------------------------------------------------------------------
# exact / chunk


def assign_credit(
    alignment: Alignment,
    teacher_log_probs: np.ndarray,
    student_log_probs: np.ndarray,
    *,
    mode: str = "chunk",
    split: str = "uniform",
) -> np.ndarray:
    """One teacher value per student position from chunk totals alone (``exact`` and ``chunk`` modes).

    Args:
        alignment: the sample's :class:`~slime_xvocab.alignment.Alignment`.
        teacher_log_probs: float ``[n_teacher]``: the teacher's log-prob of each teacher response token.
        student_log_probs: float ``[n_student]``: the student's log-prob of each response token (slime's
            ``rollout_log_probs``). Unaligned positions return exactly these values (OPD delta 0).
        mode: ``"chunk"`` (every chunk passes on its log-mass) or ``"exact"`` (only 1:1 chunks).
        split: inside a chunk, ``"uniform"``: value_j = s_j + (T - S) / n, every token gets the same share
            of the chunk's delta; ``"proportional"``: value_j = s_j * T / S, the tokens the student found
            harder carry more of it (falls back to uniform where S is 0). Both satisfy
            sum_j (value_j - s_j) = T - S, with T and S the teacher and student chunk log-probs.

    Returns:
        float32 ``[n_student]``.

    Example:
        >>> from slime_xvocab.alignment import align_spans
        >>> a = align_spans(np.array([[0, 1], [1, 2]]), np.array([[0, 2]]))          # 2:1 chunk
        >>> assign_credit(a, np.array([-1.0]), np.array([-0.2, -0.4])).tolist()      # delta -0.4 split evenly
        [-0.4000000059604645, -0.6000000238418579]
    """
    if mode not in ("chunk", "exact"):
        raise ValueError(f"assign_credit: mode must be 'chunk' or 'exact', got {mode!r}")
    if split not in CHUNK_SPLITS:
        raise ValueError(f"chunk split must be one of {CHUNK_SPLITS}, got {split!r}")
    teacher = np.asarray(teacher_log_probs, dtype=np.float64)
    student = np.asarray(student_log_probs, dtype=np.float64)
    if teacher.shape != (alignment.n_teacher,) or student.shape != (alignment.n_student,):
        raise ValueError(
            f"assign_credit: got {teacher.shape[0]} teacher / {student.shape[0]} student log-probs for an "
            f"alignment of {alignment.n_teacher} teacher / {alignment.n_student} student tokens"
        )
    n = alignment.num_chunks
    s_chunk, t_chunk = alignment.student_chunk, alignment.teacher_chunk
    # Shifting chunk ids by one puts unaligned positions (-1) in bin 0, which is then dropped.
    t_sum = np.bincount(t_chunk + 1, weights=teacher, minlength=n + 1)[1:]
    if mode == "exact":
        out = student.copy()
        one = alignment.one_to_one()
        out[one] = t_sum[s_chunk[one]]
        return out.astype(np.float32)
    s_sum = np.bincount(s_chunk + 1, weights=student, minlength=n + 1)[1:]
    s_count, _ = alignment.chunk_sizes()
    # Index -1 reads the appended 0.0, so unaligned positions keep exactly the student's value.
    share = np.append((t_sum - s_sum) / np.maximum(s_count, 1), 0.0)
    out = student + share[s_chunk]
    if split == "proportional":
        safe = s_sum < -1e-12
        ratio = np.append(np.divide(t_sum, s_sum, out=np.ones(n), where=safe), 1.0)
        use = np.append(safe, False)[s_chunk]
        out = np.where(use, student * ratio[s_chunk], out)
    return out.astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Does a student token survive the bytes that follow it?


class StudentExtensions:
    """Answers "does the student tokenizer still end a token here if these bytes follow?".

    A student token ``y`` survives following bytes ``r`` when the student's tokenization of ``bytes(y) + r``
    starts with ``y``. It does not when a longer token swallows it (``" the"`` + ``"re"`` is ``" there"``) or
    when a merge across the junction re-splits it (Llama-3 writes ``" 你"`` + ``"好"`` but ``" "`` + ``"你们"``).
    Either needs a token of the student's tokenization to span the junction, so a table of character classes
    (letter, digit, space, newline, punctuation, other) settles most questions without tokenizing: a junction
    is safe when the student's pre-tokenizer always splits there (probed once) or when no vocabulary token
    spans such a pair of characters at all (read off the vocabulary; then neither BPE nor Unigram can merge
    across it). ``" the"`` followed by ``" cat"`` can never merge. The rest are tokenized (``bytes(y)`` plus as
    much of ``r`` as decodes as UTF-8, encoded as a continuation), in one batch per sample, and cached.

    Only the token itself and the given following bytes are looked at: a tokenizer whose merges reach back
    across an earlier token boundary, or depend on bytes past ``r``, is not modelled.
    """

    def __init__(self, tokenizer: Any, table: TokenBytes, *, cache_size: int = 1 << 20) -> None:
        self.tokenizer = tokenizer
        self.table = table
        self._cache: dict[tuple[int, bytes], bool] = {}
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.last_class = _last_char_classes(table)  # int8 [vocab]
        self._blob, self._offsets = table.blob.tobytes(), table.offsets.tolist()
        # A junction between classes a and b is safe when the pre-tokenizer always splits there, or when no
        # vocabulary token spans such a junction (then neither BPE nor Unigram can merge across it).
        self.junction_splits = _probe_junctions(tokenizer) | ~_vocab_junctions(table)  # bool [7, 7]

    def may_change(self, ids: np.ndarray, following_first_byte: np.ndarray) -> np.ndarray:
        """bool array: the pre-tokenizer could keep token ``ids[k]`` and the byte after it in one piece."""
        ok = (ids >= 0) & (ids < self.table.vocab_size)
        out = np.ones(len(ids), dtype=bool)
        out[ok] = ~self.junction_splits[self.last_class[ids[ok]], _BYTE_CLASS[following_first_byte[ok]]]
        return out

    def extends(self, token_id: int, following: bytes) -> bool:
        """True if the student's tokenization of ``bytes(token_id) + following`` does not start with it."""
        key = (token_id, following)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        result = self._tokenize_check(token_id, following)
        self._store(key, result)
        return result

    def spelled(self, token_id: int) -> bytes:
        """The bytes of one token (a Python slice: per-token numpy calls would cost more than the work)."""
        return self._blob[self._offsets[token_id]:self._offsets[token_id + 1]]

    def extends_many(self, questions: Sequence[tuple[int, bytes]]) -> np.ndarray:
        """:meth:`extends` for many (token id, following bytes) pairs; new ones are tokenized in one batch."""
        out = np.zeros(len(questions), dtype=bool)
        texts, where, owns = [], [], []
        for i, key in enumerate(questions):
            hit = self._cache.get(key)
            if hit is not None:
                out[i] = hit
                continue
            own = self.spelled(key[0])
            text = _junction_text(own, key[1])
            if text is None:
                self._store(key, False)
            elif self.table.adds_dummy_prefix:  # the anchor trick is per text: no batch
                out[i] = self.extends(*key)
            else:
                texts.append(text)
                where.append(i)
                owns.append(own)
        if texts:
            with tokenizer_lock(self.tokenizer):
                encoded = self.tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            for i, own, ids in zip(where, owns, encoded):
                out[i] = not ids or self.spelled(ids[0]) != own
                self._store(questions[i], bool(out[i]))
        return out

    def _store(self, key: tuple[int, bytes], value: bool) -> None:
        with self._lock:
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[key] = value

    def _tokenize_check(self, token_id: int, following: bytes) -> bool:
        own = self.spelled(token_id)
        text = _junction_text(own, following)
        if text is None:
            return False
        with tokenizer_lock(self.tokenizer):
            ids, _ = _encode_continuation(self.tokenizer, self.table, text)
        return not len(ids) or self.spelled(int(ids[0])) != own


def _junction_text(own: bytes, following: bytes) -> str | None:
    """``own + following`` as text, cutting ``following`` back to a character boundary; None when the token
    spells nothing, nothing follows, or no cut decodes (then the token is taken to stay)."""
    if not own or not following:
        return None
    for cut in range(len(following), max(0, len(following) - 4), -1):
        try:
            return (own + following[:cut]).decode("utf-8")
        except UnicodeDecodeError:
            continue
    return None


# Character classes of the junction table. PARTIAL: the token ends inside a character (or a following byte
# continues one), so nothing is known without tokenizing.
_LETTER, _DIGIT, _SPACE, _NEWLINE, _PUNCT, _NONASCII, _PARTIAL = range(7)
_CLASS_SAMPLES = {
    _LETTER: ["a", "Z", "e"],
    _DIGIT: ["1", "7"],
    _SPACE: [" ", "\t"],
    _NEWLINE: ["\n", "\r"],
    _PUNCT: [".", ",", "-", "'", "(", "!", "#", "_", "@", "/", "*", "="],
    _NONASCII: ["é", "你", "🎉", "—", "ß", "٣", "\u00a0", "\u3000", "\u0301"],
}


def _char_class(ch: str) -> int:
    if not ch.isascii():
        return _NONASCII
    if ch.isalpha():
        return _LETTER
    if ch.isdigit():
        return _DIGIT
    if ch in "\r\n":
        return _NEWLINE
    if ch.isspace():
        return _SPACE
    return _PUNCT


_BYTE_CLASS = np.array(
    [_char_class(chr(b)) if b < 0x80 else (_NONASCII if b >= 0xC0 else _PARTIAL) for b in range(256)], dtype=np.int8
)


def _last_char_classes(table: TokenBytes) -> np.ndarray:
    """int8 ``[vocab]``: class of each token's last character (PARTIAL if it ends inside one or spells nothing)."""
    blob, offsets = table.blob.tobytes(), table.offsets
    out = np.full(table.vocab_size, _PARTIAL, dtype=np.int8)
    for token_id in np.flatnonzero(np.diff(offsets) > 0).tolist():
        try:
            text = blob[offsets[token_id]:offsets[token_id + 1]].decode("utf-8")
        except UnicodeDecodeError:
            continue
        out[token_id] = _char_class(text[-1])
    return out


def _vocab_junctions(table: TokenBytes) -> np.ndarray:
    """bool ``[7, 7]``: ``[a, b]`` is True if some token's bytes hold a character of class ``a`` immediately
    followed by one of class ``b`` (PARTIAL rows and columns are always True)."""
    blob = table.blob.astype(np.int64)
    out = np.zeros((7, 7), dtype=bool)
    out[_PARTIAL, :] = out[:, _PARTIAL] = True
    if len(blob) < 2:
        return out
    starts = np.zeros(len(blob), dtype=bool)
    starts[table.offsets[:-1][np.diff(table.offsets) > 0]] = True
    # Character starts that are not token starts: a transition from the previous character inside a token.
    p = np.flatnonzero(((blob < 0x80) | (blob >= 0xC0)) & ~starts)
    p = p[p > 0]
    prev = np.where(blob[p - 1] < 0x80, _BYTE_CLASS[np.minimum(blob[p - 1], 255)], _NONASCII)
    cur = np.where(blob[p] < 0x80, _BYTE_CLASS[np.minimum(blob[p], 255)], _NONASCII)
    out[prev, cur] = True
    return out


def _probe_junctions(tokenizer: Any) -> np.ndarray:
    """bool ``[7, 7]``: ``[a, b]`` is True if the student's pre-tokenizer always splits between a character of
    class ``a`` and one of class ``b`` (probed with several characters of each, in a few contexts). Without a
    pre-tokenizer that can be read, nothing is assumed to split."""
    out = np.zeros((7, 7), dtype=bool)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = getattr(backend, "pre_tokenizer", None) if backend is not None else None
    if pre is None:
        return out
    normalizer = getattr(backend, "normalizer", None)

    def splits(left: str, right: str) -> bool:
        for before, after in (("", ""), ("x ", " y"), ("1", "a"), ("", "\n"), (" ", "."), ("a", "1")):
            text = before + left + right + after
            if normalizer is not None:
                text = normalizer.normalize_str(text)
                if text.replace("\u2581", " ") != (before + left + right + after):
                    return False  # a normaliser that rewrites more than spaces: do not guess
            cut = len(before) + len(left)
            ends = {end for _, (_, end) in pre.pre_tokenize_str(text)}
            if cut not in ends:
                return False
        return True

    for a, lefts in _CLASS_SAMPLES.items():
        for b, rights in _CLASS_SAMPLES.items():
            out[a, b] = all(splits(left, right) for left in lefts for right in rights)
    return out


_EXTENSIONS = PerObject()


def student_extensions(tokenizer: Any, table: TokenBytes) -> StudentExtensions:
    """The :class:`StudentExtensions` of ``tokenizer``, built once per tokenizer object (about a second)."""
    return _EXTENSIONS.get(tokenizer, lambda: StudentExtensions(tokenizer, table))


# --------------------------------------------------------------------------------------------------
# student_token


@dataclass(frozen=True, eq=False)
class _Candidates:
    """Every teacher top-k candidate (plus the observed token where the top-k missed it), flattened."""

    pos: np.ndarray  # int64: teacher position
    ids: np.ndarray
    lp: np.ndarray  # float64 log-prob
    real: np.ndarray  # bool: the token the teacher actually has there
    blob_start: np.ndarray  # int64: where its bytes start in the teacher table's blob
    length: np.ndarray  # int64: its byte length (0 for special tokens and ids outside the table)
    first: np.ndarray  # int64 [n_positions + 1]: candidates of position i are first[i]:first[i + 1]
    top_mass: float


def _candidates(ids: np.ndarray, lps: np.ndarray, top: Sequence | None, table: TokenBytes) -> _Candidates:
    n = len(ids)
    first = None
    if top is None:
        c_pos, c_ids, c_lp = np.arange(n), ids.copy(), lps.copy()
        c_real = np.ones(n, dtype=bool)
        mass = 1.0
    else:
        if len(top) != n:
            raise ValueError(f"top-k has {len(top)} positions, the teacher scored {n}")
        if hasattr(top, "offsets"):  # sglang_wire.TopK: already flat
            offsets = np.asarray(top.offsets, dtype=np.int64)
            counts = np.diff(offsets)
            t_ids, t_lp = np.asarray(top.ids, dtype=np.int64), np.asarray(top.lps, dtype=np.float64)
        else:
            counts = np.fromiter((len(t[0]) for t in top), dtype=np.int64, count=n)
            offsets = np.concatenate([[0], np.cumsum(counts)])
            t_ids = np.concatenate([np.asarray(t[0], dtype=np.int64) for t in top]) if n else np.zeros(0, np.int64)
            t_lp = np.concatenate([np.asarray(t[1], dtype=np.float64) for t in top]) if n else np.zeros(0)
        t_pos = np.repeat(np.arange(n), counts)
        t_real = t_ids == ids[t_pos]
        listed = np.bincount(t_pos[t_real], minlength=n) > 0
        # Where the top-k missed the observed token, append it: it is on every path we count.
        missing = np.flatnonzero(~listed)
        if len(missing):
            c_pos = np.concatenate([t_pos, missing])
            c_ids = np.concatenate([t_ids, ids[missing]])
            c_lp = np.concatenate([t_lp, lps[missing]])
            c_real = np.concatenate([t_real, np.ones(len(missing), dtype=bool)])
            order = np.argsort(c_pos, kind="stable")
            c_pos, c_ids, c_lp, c_real = c_pos[order], c_ids[order], c_lp[order], c_real[order]
        else:  # the usual case: already in position order, and position i's candidates start at offsets[i]
            c_pos, c_ids, c_lp, c_real, first = t_pos, t_ids, t_lp, t_real, offsets
        listed_mass = np.bincount(t_pos, weights=np.exp(t_lp), minlength=n)
        mass = float(np.minimum(listed_mass, 1.0).mean()) if n else 1.0
    if not len(c_ids) or (c_ids.min() >= 0 and c_ids.max() < table.vocab_size):
        start, length = table.offsets[c_ids], table.lengths[c_ids]
    else:  # ids outside the table spell nothing
        valid = (c_ids >= 0) & (c_ids < table.vocab_size)
        safe = np.where(valid, c_ids, 0)
        start = table.offsets[safe]
        length = np.where(valid, table.offsets[safe + 1] - start, 0)
    if first is None:
        first = np.searchsorted(c_pos, np.arange(n + 1))
    return _Candidates(c_pos, c_ids, c_lp, c_real, start, length, first, mass)


def _segment_ranges(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(owner, index) for every index in ``[lo[k], hi[k])``, for all k at once."""
    counts = np.maximum(hi - lo, 0)
    ends = counts.cumsum()
    owner = np.arange(len(lo)).repeat(counts)
    # Index = rank inside its segment + lo = position in the output - where the segment starts there + lo.
    index = np.arange(int(ends[-1]) if len(ends) else 0) + (lo - (ends - counts)).repeat(counts)
    return owner, index


def _match_lengths(c: _Candidates, starts: np.ndarray, text: np.ndarray, blob: np.ndarray) -> np.ndarray:
    """How many leading bytes of each candidate agree with ``text`` from its position's start."""
    out = np.zeros(len(c.length), dtype=np.int64)
    if not len(text):
        return out
    # Most candidates differ at their first byte: settle those before comparing the rest.
    begin = starts[c.pos]
    live = np.flatnonzero((c.length > 0) & (begin < len(text)))
    live = live[blob[c.blob_start[live]] == text[begin[live]]]
    if not len(live):
        return out
    cand_at, text_at, length = c.blob_start[live], begin[live], c.length[live]
    if int(length.sum()) <= _WORDS_ABOVE:
        out[live] = _matched_bytes(cand_at, text_at, length, text, blob)
    else:
        out[live] = _matched_words(cand_at, text_at, length, text, blob)
    return out


#: :func:`_match_lengths` compares byte by byte up to this many candidate bytes in all, eight bytes at a time
#: above (fewer, larger steps: about half the time for a 2k-token response; slower for a short one).
_WORDS_ABOVE = 4096


def _matched_bytes(cand_at: np.ndarray, text_at: np.ndarray, length: np.ndarray, text: np.ndarray,
                   blob: np.ndarray) -> np.ndarray:
    """Leading bytes shared by each candidate (``blob[cand_at:cand_at + length]``, ``length > 0``) and
    ``text[text_at:]``, comparing every byte of every candidate at once."""
    seg_start = np.cumsum(length) - length
    owner = np.repeat(np.arange(len(length)), length)
    k = np.arange(int(seg_start[-1] + length[-1])) - seg_start[owner]  # byte k of its candidate
    at = text_at[owner] + k
    agree = (at < len(text)) & (blob[cand_at[owner] + k] == text[np.minimum(at, len(text) - 1)])
    # First disagreement per candidate: the smallest k that disagrees, else the full length (every segment
    # is non-empty, so one reduceat over the segment starts gives each candidate's minimum).
    return np.minimum.reduceat(np.where(agree, length[owner], k), seg_start)


def _matched_words(cand_at: np.ndarray, text_at: np.ndarray, length: np.ndarray, text: np.ndarray,
                   blob: np.ndarray) -> np.ndarray:
    """:func:`_matched_bytes` eight bytes at a time: one 64-bit word of the candidate against one of the text."""
    blob_words, text_words = _byte_words(blob), _words(text)
    matched = np.zeros(len(length), dtype=np.int64)
    todo = np.arange(len(length))
    while len(todo):
        k = matched[todo]  # bytes of these candidates matched so far (a multiple of 8)
        valid = np.minimum(np.minimum(length[todo] - k, len(text) - (text_at[todo] + k)), 8)
        same = np.minimum(_equal_leading_bytes(blob_words[cand_at[todo] + k] ^ text_words[text_at[todo] + k]), valid)
        matched[todo] = k + same
        todo = todo[(same == 8) & (length[todo] > k + 8) & (len(text) > text_at[todo] + k + 8)]
    return matched


def _words(data: np.ndarray) -> np.ndarray:
    """uint64 ``[len(data)]``: the eight bytes starting at every position as one little-endian word (zeros
    past the end), so a comparison of up to eight bytes is one XOR."""
    padded = np.zeros(len(data) + 8, dtype=np.uint8)
    padded[: len(data)] = data
    windows = np.lib.stride_tricks.sliding_window_view(padded, 8)[: len(data)]
    return np.ascontiguousarray(windows).view("<u8").reshape(-1)


_BLOB_WORDS: dict[int, tuple[Any, np.ndarray]] = {}
_BLOB_WORDS_LOCK = threading.Lock()


def _byte_words(blob: np.ndarray) -> np.ndarray:
    """:func:`_words` of a token table's blob, built once per blob (eight bytes of memory per blob byte)."""
    with _BLOB_WORDS_LOCK:
        hit = _BLOB_WORDS.get(id(blob))
        if hit is not None and hit[0]() is blob:
            return hit[1]
    words = _words(blob)
    with _BLOB_WORDS_LOCK:
        for key in [k for k, (ref, _) in _BLOB_WORDS.items() if ref() is None]:  # blobs gone since
            del _BLOB_WORDS[key]
        _BLOB_WORDS[id(blob)] = (weakref.ref(blob), words)
    return words


def _equal_leading_bytes(diff: np.ndarray) -> np.ndarray:
    """int64: how many low-order bytes of each uint64 are zero (8 for 0): the bytes two little-endian words
    share before their first difference."""
    lowest = diff & (~diff + np.uint64(1))  # the lowest set bit alone (0 stays 0)
    bit = np.frexp(lowest.astype(np.float64))[1] - 1  # its index: powers of two are exact in float64
    return np.where(diff == 0, 8, bit // 8).astype(np.int64)


def _logsumexp_by(values: np.ndarray, groups: np.ndarray, n: int) -> np.ndarray:
    """log(sum(exp(values))) per group; -inf for empty groups."""
    top = np.full(n, -np.inf)
    np.maximum.at(top, groups, values)
    safe_top = np.where(np.isfinite(top), top, 0.0)
    total = np.bincount(groups, weights=np.exp(values - safe_top[groups]), minlength=n)
    with np.errstate(divide="ignore"):
        return np.where(total > 0, safe_top + np.log(np.where(total > 0, total, 1.0)), -np.inf)


class _ExtensionQueries:
    """Batches "does the student token survive?" questions for one (student, teacher) pair.

    Questions are (student token, teacher candidate, byte offset into the candidate): integers, so answers
    are cached in sorted arrays and looked up with one vectorised search; the character-class table settles
    most new ones and only the rest are tokenized (:meth:`StudentExtensions.extends`).
    """

    MAX_ENTRIES = 1 << 22

    def __init__(self, ext: StudentExtensions, teacher_table: TokenBytes) -> None:
        self.ext, self.teacher_table = ext, teacher_table
        self.blob = teacher_table.blob
        self._stride = teacher_table.vocab_size + 1
        # The class of every teacher byte and the student's junction rule as one lookup: entry
        # last_class * 7 + next_class is True where the pre-tokenizer may keep the two characters together.
        self._byte_class = _BYTE_CLASS[self.blob]  # int8, like the sum below (at most 6 * 7 + 6)
        self._last_class = ext.last_class * np.int8(7)
        self._may_join = (~ext.junction_splits).reshape(-1)
        # Answers in two sorted tables (a small one that takes new keys, folded into the main one now and
        # then), each one (keys, values) tuple so a reader never pairs one table's keys with another's values.
        self._main = self._new = _answer_table(np.zeros(0, np.int64), np.zeros(0, bool))
        self._lock = threading.Lock()

    def __call__(self, student_ids: np.ndarray, cand_ids: np.ndarray, offset: np.ndarray,
                 rem_start: np.ndarray, rem_len: np.ndarray) -> np.ndarray:
        """bool per question: the student token is extended (or re-split) by the candidate's remaining bytes."""
        out = np.zeros(len(student_ids), dtype=bool)
        live = np.flatnonzero((student_ids >= 0) & (rem_len > 0))
        if not len(live):
            return out
        live = live[self._may_change(student_ids[live], rem_start[live])]
        if not len(live):
            return out
        keys = (student_ids[live] * self._stride + cand_ids[live]) * 256 + np.minimum(offset[live], 255)
        known, value = self._lookup(keys)
        out[live] = value
        todo = live[~known]
        if len(todo):
            uniq, first = np.unique(keys[~known], return_index=True)
            blob = self.blob
            answers = self.ext.extends_many([
                (int(student_ids[k]), blob[rem_start[k]:rem_start[k] + rem_len[k]].tobytes())
                for k in todo[first].tolist()
            ])
            out[todo] = answers[np.searchsorted(uniq, keys[~known])]
            self._remember(uniq[offset[todo[first]] < 255], answers[offset[todo[first]] < 255])
        return out

    def _may_change(self, student_ids: np.ndarray, rem_start: np.ndarray) -> np.ndarray:
        """:meth:`StudentExtensions.may_change` of the tokens and the teacher bytes at ``rem_start``, from the
        precomputed class tables (ids outside the student vocabulary take the general path)."""
        if student_ids.max() >= len(self._last_class):
            return self.ext.may_change(student_ids, self.blob[rem_start].astype(np.int64))
        return self._may_join[self._last_class[student_ids] + self._byte_class[rem_start]]

    def _lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(known, value) per key: found in either table, and its answer there (False where unknown)."""
        found = []
        order = np.argsort(keys) if len(keys) > _SORT_KEYS_ABOVE else None
        for table_keys, table_vals in (self._main, self._new):
            if len(table_keys) > 1:  # more than the sentinel
                at = _search(table_keys, keys, order)  # the sentinel keeps ``at`` in range
                hit = table_keys[at] == keys
                found.append((hit, table_vals[at] & hit))
        if not found:
            return np.zeros(len(keys), dtype=bool), np.zeros(len(keys), dtype=bool)
        if len(found) == 1:
            return found[0]
        return found[0][0] | found[1][0], found[0][1] | found[1][1]

    def _remember(self, keys: np.ndarray, vals: np.ndarray) -> None:
        with self._lock:
            main_keys, main_vals = self._main[0][:-1], self._main[1][:-1]
            new_keys = np.concatenate([self._new[0][:-1], keys])
            order = np.argsort(new_keys, kind="stable")
            new_keys, new_vals = new_keys[order], np.concatenate([self._new[1][:-1], vals])[order]
            if len(new_keys) > max(4096, len(main_keys) // 8):  # fold into the main table, amortised
                if len(main_keys) + len(new_keys) > self.MAX_ENTRIES:
                    main_keys, main_vals = np.zeros(0, np.int64), np.zeros(0, bool)
                merged = np.concatenate([main_keys, new_keys])
                order = np.argsort(merged, kind="stable")
                self._main = _answer_table(merged[order], np.concatenate([main_vals, new_vals])[order])
                self._new = _answer_table(np.zeros(0, np.int64), np.zeros(0, bool))
            else:
                self._new = _answer_table(new_keys, new_vals)


#: Above this many keys, :meth:`_ExtensionQueries._lookup` searches them in sorted order: a binary search for
#: ascending keys stays in cache (3-4x faster for 10k keys in a 200k table), and sorting 10k keys costs less.
_SORT_KEYS_ABOVE = 1024


def _search(table: np.ndarray, keys: np.ndarray, order: np.ndarray | None) -> np.ndarray:
    """``np.searchsorted(table, keys)``, searching the keys in ``order`` (an argsort of them) when given."""
    if order is None:
        return np.searchsorted(table, keys)
    at = np.empty(len(keys), dtype=np.intp)
    at[order] = np.searchsorted(table, keys[order])
    return at


def _answer_table(keys: np.ndarray, vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted keys and their answers, closed by a sentinel key above every real key (answer False), so a
    search never runs off the end."""
    return np.append(keys, np.iinfo(np.int64).max), np.append(vals, False)


_QUERIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_QUERIES_LOCK = threading.Lock()


def _extension_queries(ext: StudentExtensions, teacher_table: TokenBytes) -> _ExtensionQueries:
    with _QUERIES_LOCK:
        per_teacher = _QUERIES.setdefault(ext, {})
        queries = per_teacher.get(id(teacher_table))
        if queries is None or queries.teacher_table is not teacher_table:
            queries = per_teacher[id(teacher_table)] = _ExtensionQueries(ext, teacher_table)
        return queries


def student_token_credit(
    view: Any,
    teacher_log_probs: np.ndarray,
    teacher_top: Sequence | None,
    student_log_probs: np.ndarray,
    extensions: StudentExtensions,
    teacher_table: TokenBytes,
) -> CreditResult:
    """The teacher's probability of each student token, from its top-k (``credit_mode: student_token``).

    Args:
        view: the sample's :class:`~slime_xvocab.teacher_view.TeacherView` (``alignment``, ``student_ids``,
            ``student_spans``, ``response_bytes``, ``response_ids``, ``eot_ids``, ``probe_ids``, ``exact_bytes``).
        teacher_log_probs: float ``[n_teacher]``: the teacher's log-prob of each id in ``view.response_ids``.
        teacher_top: per teacher position ``(ids, log_probs)`` of its top-k, or None (then only the observed
            tokens are counted and no extension is seen).
        student_log_probs: float ``[n_student]``; unscored positions return exactly these.
        extensions: :func:`student_extensions` of the student tokenizer.
        teacher_table: the teacher's :class:`~slime_xvocab.token_bytes.TokenBytes`.

    Returns:
        :class:`CreditResult`; every value is finite and <= 0 where ``scored``.

    Chunks whose teacher bytes differ from the student's (a teacher normaliser rewrote them, e.g. NFC) get
    the chunk's student-token mass split evenly (``uniform``), measured at the chunk's edges.
    """
    alignment: Alignment = view.alignment
    student = np.asarray(student_log_probs, dtype=np.float64)
    teacher = np.asarray(teacher_log_probs, dtype=np.float64)
    t_ids = np.asarray(view.response_ids, dtype=np.int64)
    n, m_all = alignment.n_student, alignment.n_teacher
    if student.shape != (n,) or teacher.shape != (m_all,) or len(t_ids) != m_all:
        raise ValueError(
            f"student_token_credit: {len(student)} student / {len(teacher)} teacher log-probs for a view of "
            f"{n} student / {m_all} teacher tokens"
        )
    out = student.copy()
    scored = np.zeros(n, dtype=bool)
    if not alignment.num_chunks:
        return CreditResult(out.astype(np.float32), scored)

    # Teacher text positions come first; the end-of-turn ids or one probe id follow them.
    m = m_all - len(view.eot_ids) - len(getattr(view, "probe_ids", ()))
    blob = teacher_table.blob
    text = np.frombuffer(teacher_table.bytes_of(t_ids[:m]), dtype=np.uint8)  # what the teacher read
    t_len = teacher_table.lengths_of(t_ids[:m])
    t_end = np.cumsum(t_len)
    t_start = t_end - t_len
    cands = _candidates(t_ids, teacher, teacher_top, teacher_table)
    starts = np.concatenate([t_start, np.full(m_all - m, len(text), dtype=np.int64)])
    match = _match_lengths(cands, starts, text, blob)
    path_before = np.concatenate([[0.0], np.cumsum(teacher)])  # log P(observed teacher tokens before i)

    s_ids = np.asarray(view.student_ids, dtype=np.int64)
    s_spans = np.asarray(view.student_spans, dtype=np.int64)
    s_text = s_spans[:, 1] > s_spans[:, 0]
    aligned = alignment.student_chunk >= 0
    # The previous text token of every position: the one whose "not extended" event holds at its start (the
    # running maximum of the text positions seen so far, shifted by one).
    prev_text = np.concatenate([[-1], np.maximum.accumulate(np.where(s_text, np.arange(n), -1))[:-1]])

    plan = _plan(view, alignment, s_spans, s_text & aligned, t_start, t_end, text, prev_text, s_ids, m)
    ask = _extension_queries(extensions, teacher_table) if isinstance(extensions, StudentExtensions) else extensions
    log_g = _prefix_mass(plan.queries, plan.query_ext, cands, match, t_start, t_end, path_before, m, ask)
    queries = np.append(0, plan.queries)  # G(0) = 1: nothing of the response yet
    log_g = np.append(0.0, log_g)

    def at(y):
        return log_g[np.searchsorted(queries, y)]

    for positions, y0, y1 in plan.direct:
        out[positions] = at(y1) - at(y0)
        scored[positions] = True
    chunks = plan.uniform
    if len(chunks):  # each rewritten chunk's mass, split evenly over its student tokens (all chunks at once)
        owner, positions = chunks.owner(), chunks.positions
        total = at(chunks.y1) - at(chunks.y0)
        share = (total - np.bincount(owner, weights=student[positions], minlength=len(chunks))) / chunks.sizes()
        out[positions] = student[positions] + share[owner]
        scored[positions] = True
    for position, teacher_positions in plan.end_of_turn:
        out[position] = path_before[m] + teacher[teacher_positions].sum() - at(len(text))
        scored[position] = True
    clamp = scored & (out > 0)
    out[clamp] = 0.0
    return CreditResult(out.astype(np.float32), scored, cands.top_mass, int(clamp.sum()))


@dataclass
class _Chunks:
    """Rewritten chunks, held flat: chunk ``k`` is student positions ``positions[offsets[k]:offsets[k + 1]]``
    (at least one), read from byte ``y0[k]`` to ``y1[k]`` of the text the teacher read."""

    positions: np.ndarray
    offsets: np.ndarray
    y0: np.ndarray
    y1: np.ndarray

    @classmethod
    def empty(cls) -> _Chunks:
        none = np.zeros(0, dtype=np.int64)
        return cls(none, np.zeros(1, dtype=np.int64), none, none)

    def __len__(self) -> int:
        return len(self.y0)

    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def owner(self) -> np.ndarray:
        """The chunk of every entry of ``positions``."""
        return np.arange(len(self)).repeat(self.sizes())


@dataclass
class _Plan:
    """Where the prefix masses G are read (byte positions in the text the teacher read) and by whom."""

    queries: np.ndarray  # sorted unique positions > 0
    query_ext: np.ndarray  # the student token that must not grow at each position (-1: none)
    direct: list  # (student positions, from, to): value = G(to) - G(from)
    uniform: _Chunks  # rewritten chunks: each one's mass split evenly over its student tokens
    end_of_turn: list  # (student position, teacher positions of the end of turn)


def _plan(view, alignment, s_spans, text_aligned, t_start, t_end, text, prev_text, s_ids, m) -> _Plan:
    s_chunk, t_chunk = alignment.student_chunk, alignment.teacher_chunk
    ext_before = np.where(prev_text >= 0, s_ids[np.maximum(prev_text, 0)], -1)
    direct: list = []
    uniform = _Chunks.empty()
    # reads: (positions, the student token that must not grow at each), in the order the queries are
    # first met (the first read of a position names its token).
    if view.exact_bytes:
        tok = np.flatnonzero(text_aligned)
        if len(tok):
            direct.append((tok, s_spans[tok, 0], s_spans[tok, 1]))
        reads = [(np.concatenate([y0, y1]), np.concatenate([ext_before[p], s_ids[p]])) for p, y0, y1 in direct]
    else:
        direct, uniform, direct_reads = _plan_rewritten(
            view.response_bytes, alignment, s_spans, text_aligned, t_start, t_end, text, m, ext_before, s_ids
        )
        reads = [direct_reads]
    if len(uniform):  # a rewritten chunk reads its two edges: its first token's start, its last token's end
        first, last = uniform.positions[uniform.offsets[:-1]], uniform.positions[uniform.offsets[1:] - 1]
        reads.append((np.stack([uniform.y0, uniform.y1], axis=1).ravel(),
                      np.stack([ext_before[first], s_ids[last]], axis=1).ravel()))
    end_of_turn = []
    for j in np.flatnonzero((s_chunk >= 0) & (s_spans[:, 1] == s_spans[:, 0])).tolist():
        t_pos = np.flatnonzero(t_chunk == s_chunk[j])
        if len(t_pos) and (t_pos >= m).all():
            end_of_turn.append((j, t_pos))
            reads.append((np.array([len(text)]), ext_before[j:j + 1]))
    pos = np.concatenate([a for a, _ in reads]).astype(np.int64) if reads else np.zeros(0, np.int64)
    ext = np.concatenate([b for _, b in reads]) if reads else np.zeros(0, np.int64)
    keep = pos > 0
    queries, first = np.unique(pos[keep], return_index=True)
    return _Plan(queries, ext[keep][first].astype(np.int64), direct, uniform, end_of_turn)


def _plan_rewritten(data, alignment, s_spans, text_aligned, t_start, t_end, text, m, ext_before, s_ids):
    """A teacher normaliser rewrote some text: chunks whose bytes still match map byte for byte (one ``direct``
    entry for all of them), the others are valued at their edges and split evenly (``uniform``, held flat as
    :class:`_Chunks`). Also returns the direct chunks' reads for :func:`_plan`, chunk by chunk: a chunk's token starts,
    then its token ends."""
    s_chunk = np.where(text_aligned, alignment.student_chunk, -1)
    t_chunk = np.where(np.arange(alignment.n_teacher) < m, alignment.teacher_chunk, -1)
    n_chunks = alignment.num_chunks
    s_order, t_order = np.argsort(s_chunk, kind="stable"), np.argsort(t_chunk, kind="stable")
    s_bounds = np.searchsorted(s_chunk[s_order], np.arange(n_chunks + 1))
    t_bounds = np.searchsorted(t_chunk[t_order], np.arange(n_chunks + 1))
    both = np.flatnonzero((s_bounds[1:] > s_bounds[:-1]) & (t_bounds[1:] > t_bounds[:-1]))
    s_lo, s_hi = s_bounds[both], s_bounds[both + 1]
    ya, yb = t_start[t_order[t_bounds[both]]], t_end[t_order[t_bounds[both + 1] - 1]]
    xa, xb = s_spans[s_order[s_lo], 0], s_spans[s_order[s_hi - 1], 1]
    same = _same_ranges(np.frombuffer(data, dtype=np.uint8), xa, xb, text, ya, yb)
    direct = []
    owner, at = _segment_ranges(s_lo[same], s_hi[same])
    toks = s_order[at]
    shift = (ya - xa)[same][owner]
    y0, y1 = s_spans[toks, 0] + shift, s_spans[toks, 1] + shift
    if len(toks):
        direct.append((toks, y0, y1))
    lo, hi = s_lo[~same], s_hi[~same]
    uniform = _Chunks(s_order[_segment_ranges(lo, hi)[1]], np.concatenate([[0], np.cumsum(hi - lo)]),
                      ya[~same], yb[~same])
    # Reads in chunk order, and inside a chunk the starts before the ends (a stable sort keeps token order).
    order = np.argsort(np.concatenate([owner * 2, owner * 2 + 1]), kind="stable")
    reads = (np.concatenate([y0, y1])[order], np.concatenate([ext_before[toks], s_ids[toks]])[order])
    return direct, uniform, reads


def _same_ranges(x: np.ndarray, x_lo: np.ndarray, x_hi: np.ndarray, y: np.ndarray, y_lo: np.ndarray,
                 y_hi: np.ndarray) -> np.ndarray:
    """bool per range pair: ``x[x_lo:x_hi]`` and ``y[y_lo:y_hi]`` hold the same bytes (all pairs compared at once)."""
    same = (x_hi - x_lo) == (y_hi - y_lo)
    idx = np.flatnonzero(same & (x_hi > x_lo))
    if len(idx):
        owner, k = _segment_ranges(np.zeros(len(idx), dtype=np.int64), (x_hi - x_lo)[idx])
        differs = x[x_lo[idx][owner] + k] != y[y_lo[idx][owner] + k]
        same[idx[np.unique(owner[differs])]] = False
    return same


def _prefix_mass(queries, query_ext, cands, match, t_start, t_end, path_before, m, ask) -> np.ndarray:
    """log G(y) for every query position y: the teacher's probability that the response starts with
    ``text[:y]`` and the student token ending at y (``query_ext``) is not extended by what follows."""
    n_q = len(queries)
    if not n_q:
        return np.zeros(0)
    # Next-token distribution at a teacher boundary: the share of it that does not grow the student token.
    i = np.searchsorted(t_end, queries, side="right") - 1
    boundary = (i >= 0) & (t_end[np.maximum(i, 0)] == queries) & (i + 1 < len(cands.first) - 1)
    qb = np.flatnonzero(boundary)
    nxt = i[qb] + 1
    b_owner, b_k = _segment_ranges(cands.first[nxt], cands.first[nxt + 1])
    # Paths through y: candidates at positions starting before y that agree with the text up to y (one that
    # agrees with none of it reaches no y; most candidates differ at their first byte).
    text_cand = np.flatnonzero((cands.pos < m) & (match > 0))
    start = t_start[cands.pos[text_cand]]
    lo = np.searchsorted(queries, start, side="right")
    hi = np.searchsorted(queries, start + match[text_cand], side="right")
    owner, q = _segment_ranges(lo, hi)
    k = text_cand[owner]
    offset = queries[q] - start[owner]
    rest = cands.length[k] - offset
    g = np.flatnonzero((rest > 0) & ~cands.real[k])
    # Both kinds of question go to the student tokenizer in one call: at a boundary, does the next teacher
    # token grow the student token (offset 0); inside a candidate, do its remaining bytes grow it.
    nb = len(b_k)
    answers = ask(
        np.concatenate([query_ext[qb][b_owner], query_ext[q[g]]]),
        np.concatenate([cands.ids[b_k], cands.ids[k[g]]]),
        np.concatenate([np.zeros(nb, dtype=np.int64), offset[g]]),
        np.concatenate([cands.blob_start[b_k], cands.blob_start[k[g]] + offset[g]]),
        np.concatenate([cands.length[b_k], rest[g]]),
    )
    log_keep = np.zeros(n_q)
    if len(qb):
        grows = ~cands.real[b_k] & answers[:nb]
        p = np.exp(cands.lp[b_k])
        grown = np.bincount(b_owner, weights=np.where(grows, p, 0.0), minlength=len(qb))
        kept = np.bincount(b_owner, weights=np.where(grows, 0.0, p), minlength=len(qb))
        with np.errstate(divide="ignore"):
            log_keep[qb] = np.where(grown > 0, np.log(np.maximum(1.0 - grown, kept)), 0.0)
    keep = np.ones(len(k), dtype=bool)
    keep[g] = ~answers[nb:]
    log_ne = np.where(rest > 0, 0.0, log_keep[q])
    terms = path_before[cands.pos[k]] + cands.lp[k] + log_ne
    return _logsumexp_by(terms[keep], q[keep], n_q)
