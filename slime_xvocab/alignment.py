"""Byte-exact alignment of teacher tokens to student tokens, and credit assignment.

The student's response tokens spell some bytes. The teacher scores the same bytes in its own tokens.
Both tokenizations are cut into the *finest chunks whose boundaries both sides share*: a chunk ends at a
byte position where a student token and a teacher token both end (and no token of either side straddles
it). Units are bytes of the student's response, so split multi-byte characters, SentencePiece ``▁`` and
an extra or merged token at the start cannot shift anything.

::

    bytes    |  3  4  7     |  +     |  8  5     |
    student  | "3"|"4"|"7"  | " +"   | " 8"|"5"  |     Qwen3 splits digits
    teacher  |   "347"      | " +"   |  " 85"    |     Llama-3 groups up to three
    chunks   |    3:1       |  1:1   |    2:1    |

What each student position is worth to the teacher (``teacher_log_probs`` in slime's terms) is
:mod:`slime_xvocab.credit`'s business. Positions that cannot be aligned keep the student's log-prob and are
counted, with a reason (:class:`Unaligned`).
"""

from __future__ import annotations

import functools
import unicodedata
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from .errors import ByteMismatchError, SampleError
from .token_bytes import TokenBytes, tokenizer_lock


class Unaligned(IntEnum):
    """Why a student position received no teacher signal (0 means it did)."""

    ALIGNED = 0
    SPECIAL = 1  # a control token (e.g. a role marker) with no byte content and no mapped counterpart
    TEACHER_CONTEXT = 2  # past the teacher's context limit: the teacher never saw these bytes
    INVALID_UTF8 = 3  # bytes that are not valid UTF-8 (e.g. a character cut by truncation)
    NO_TEACHER_TOKENS = 4  # the teacher's encoding dropped these bytes (normalisation)
    TEACHER_FAILED = 5  # the teacher could not score the sample (set by the hooks' fallback)
    BYTE_MISMATCH = 6  # student and teacher text disagree here (a teacher normaliser rewrote it)
    INVALID_SAMPLE = 7  # the sample's input could not become a teacher view (messages, template, length)
    NON_FINITE = 8  # the credit came out NaN/inf (a bug or a broken teacher answer): the sample fell back


_REASON_NAMES = [r.name.lower() for r in Unaligned]


@dataclass(frozen=True, eq=False)
class Alignment:
    """Which student positions and teacher positions form each chunk.

    Attributes:
        student_chunk: int64 ``[n_student]``: chunk index of each student position, -1 if unaligned.
        teacher_chunk: int64 ``[n_teacher]``: chunk index of each teacher position, -1 if it belongs to no
            chunk (its log-prob is ignored).
        reason: int8 ``[n_student]``: :class:`Unaligned` code per student position (0 where aligned).
        num_chunks: number of chunks; every chunk has at least one position on each side.
    """

    student_chunk: np.ndarray
    teacher_chunk: np.ndarray
    reason: np.ndarray
    num_chunks: int

    @property
    def n_student(self) -> int:
        return len(self.student_chunk)

    @property
    def n_teacher(self) -> int:
        return len(self.teacher_chunk)

    def chunk_sizes(self) -> tuple[np.ndarray, np.ndarray]:
        """(student tokens per chunk, teacher tokens per chunk), each int64 ``[num_chunks]``."""
        return self._chunk_sizes

    def one_to_one(self) -> np.ndarray:
        """bool ``[n_student]``: positions whose chunk is one student token and one teacher token."""
        return self._one_to_one

    @functools.cached_property
    def _chunk_sizes(self) -> tuple[np.ndarray, np.ndarray]:
        # Chunk -1 (unaligned) is counted in slot 0 after the shift, then dropped.
        s = np.bincount(self.student_chunk + 1, minlength=self.num_chunks + 1)[1:]
        t = np.bincount(self.teacher_chunk + 1, minlength=self.num_chunks + 1)[1:]
        return s, t

    @functools.cached_property
    def _one_to_one(self) -> np.ndarray:
        s, t = self._chunk_sizes
        single = np.append((s == 1) & (t == 1), False)  # index -1 (unaligned) reads the False
        return single[self.student_chunk]

    def with_pair(self, student_positions: Sequence[int], teacher_positions: Sequence[int]) -> Alignment:
        """Return a copy with one extra chunk joining the given positions (e.g. the end-of-turn tokens).

        The positions must be unaligned so far. Used to pair the student's end-of-turn token with the
        teacher's end-of-turn token(s), which spell no bytes and so never meet in the byte alignment.
        """
        student_chunk, teacher_chunk = self.student_chunk.copy(), self.teacher_chunk.copy()
        reason = self.reason.copy()
        s_pos, t_pos = np.asarray(student_positions, dtype=np.int64), np.asarray(teacher_positions, dtype=np.int64)
        if not len(s_pos) or not len(t_pos):
            return self
        if (student_chunk[s_pos] >= 0).any() or (teacher_chunk[t_pos] >= 0).any():
            raise ValueError("with_pair: positions are already part of a chunk")
        student_chunk[s_pos] = self.num_chunks
        teacher_chunk[t_pos] = self.num_chunks
        reason[s_pos] = Unaligned.ALIGNED
        return Alignment(student_chunk, teacher_chunk, reason, self.num_chunks + 1)

    def stats(self) -> AlignmentStats:
        """Per-sample statistics; see :class:`AlignmentStats`."""
        s, t = self.chunk_sizes()
        widths = np.maximum(s, t)
        counts = np.bincount(self.reason.astype(np.int64), minlength=len(Unaligned))[: len(Unaligned)].tolist()
        return AlignmentStats(
            student_tokens=self.n_student,
            teacher_tokens=self.n_teacher,
            chunks=self.num_chunks,
            one_to_one_tokens=int(np.count_nonzero(self.one_to_one())),
            covered_tokens=int(np.count_nonzero(self.student_chunk >= 0)),
            mean_chunk_width=float(widths.mean()) if self.num_chunks else 0.0,
            max_chunk_width=int(widths.max()) if self.num_chunks else 0,
            # Names from a list, not the enum: nine enum attribute reads cost more than the counting.
            unaligned_by_reason={_REASON_NAMES[r]: c for r, c in enumerate(counts) if r and c},
        )

    @classmethod
    def unaligned(cls, n_student: int, reason: Unaligned, n_teacher: int = 0) -> Alignment:
        """An alignment in which no position is aligned (a fallback), with one reason for all."""
        return cls(
            np.full(n_student, -1, dtype=np.int64),
            np.full(n_teacher, -1, dtype=np.int64),
            np.full(n_student, int(reason), dtype=np.int8),
            0,
        )


@dataclass(frozen=True)
class AlignmentStats:
    """Alignment statistics of one sample, ready to aggregate.

    ``mean_chunk_width`` / ``max_chunk_width`` measure a chunk by its longer side: a 1:1 chunk has width 1,
    "347" as three Qwen3 digits against one Llama-3 token has width 3.
    """

    student_tokens: int
    teacher_tokens: int
    chunks: int
    one_to_one_tokens: int
    covered_tokens: int
    mean_chunk_width: float
    max_chunk_width: int
    unaligned_by_reason: dict[str, int]

    @property
    def unaligned_tokens(self) -> int:
        return self.student_tokens - self.covered_tokens

    @property
    def one_to_one_fraction(self) -> float:
        return self.one_to_one_tokens / self.student_tokens if self.student_tokens else 1.0

    @property
    def covered_fraction(self) -> float:
        return self.covered_tokens / self.student_tokens if self.student_tokens else 1.0

    def as_dict(self) -> dict[str, float]:
        out: dict[str, float] = {
            "student_tokens": self.student_tokens,
            "teacher_tokens": self.teacher_tokens,
            "chunks": self.chunks,
            "one_to_one_fraction": self.one_to_one_fraction,
            "covered_fraction": self.covered_fraction,
            "mean_chunk_width": self.mean_chunk_width,
            "max_chunk_width": self.max_chunk_width,
            "unaligned_tokens": self.unaligned_tokens,
        }
        out.update({f"unaligned/{k}": v for k, v in self.unaligned_by_reason.items()})
        return out


# --------------------------------------------------------------------------------------------------
# Core: spans -> chunks (pure numpy)


def _cut_points(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Byte positions after which this side can be cut: every token before ends there or earlier and
    every token after starts there or later. Spans may overlap (pieces of one character share a span)."""
    if not len(ends):
        return np.zeros(0, dtype=np.int64)
    return _cut_intervals(starts, ends, np.full(len(ends), ends.max()))[0]


def _cut_intervals(starts: np.ndarray, ends: np.ndarray, caps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`_cut_points`, but each cut may sit anywhere in ``[lo, hi]``: the gap between one token's
    end and the next token's start (bytes an offset mapping leaves out, e.g. a combining accent composed
    into the previous character, or a space the tokenizer trimmed). ``caps[i]`` bounds the gap after token
    ``i``: the end of what the teacher encoded for that token's sample."""
    prefix_max_end = np.maximum.accumulate(ends)
    suffix_min_start = np.minimum.accumulate(starts[::-1])[::-1]
    next_start = np.minimum(np.append(suffix_min_start[1:], caps[-1]), caps)
    mask = prefix_max_end <= next_start
    return prefix_max_end[mask], next_start[mask]


@dataclass(frozen=True, eq=False)
class BatchAlignment:
    """The alignments of many samples, held as one :class:`Alignment` over their concatenation.

    Chunk indices are global and increase across samples, so :func:`assign_credit` and the statistics run
    once over the whole batch. ``batch[i]`` gives sample ``i``'s own :class:`Alignment`.

    Attributes:
        alignment: the concatenated alignment.
        student_offsets, teacher_offsets, chunk_offsets: int64 ``[n + 1]``: where each sample's student
            positions, teacher positions and chunks start in the concatenation.
    """

    alignment: Alignment
    student_offsets: np.ndarray
    teacher_offsets: np.ndarray
    chunk_offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.student_offsets) - 1

    def __getitem__(self, i: int) -> Alignment:
        a = self.alignment
        s = slice(self.student_offsets[i], self.student_offsets[i + 1])
        t = slice(self.teacher_offsets[i], self.teacher_offsets[i + 1])
        first = self.chunk_offsets[i]
        s_chunk, t_chunk = a.student_chunk[s], a.teacher_chunk[t]
        return Alignment(
            np.where(s_chunk >= 0, s_chunk - first, -1),
            np.where(t_chunk >= 0, t_chunk - first, -1),
            a.reason[s],
            int(self.chunk_offsets[i + 1] - first),
        )

    def assign_credit(self, teacher_log_probs, student_log_probs, *, mode="chunk", split="uniform") -> list:
        """:func:`~slime_xvocab.credit.assign_credit` for every sample at once; lists of arrays in and out."""
        from .credit import assign_credit

        values = assign_credit(
            self.alignment, _concat(teacher_log_probs), _concat(student_log_probs), mode=mode, split=split
        )
        return np.split(values, self.student_offsets[1:-1])

    def stats(self) -> list[AlignmentStats]:
        """Per-sample :class:`AlignmentStats`, computed with one pass over the batch."""
        a, n = self.alignment, len(self)
        s_count = np.diff(self.student_offsets)
        sample_of_pos = np.repeat(np.arange(n), s_count)
        sample_of_chunk = np.repeat(np.arange(n), np.diff(self.chunk_offsets))
        s_sizes, t_sizes = a.chunk_sizes()
        widths = np.maximum(s_sizes, t_sizes)
        width_sum = np.bincount(sample_of_chunk, weights=widths, minlength=n)
        width_max = _segment_max(widths, np.diff(self.chunk_offsets))
        one = np.bincount(sample_of_pos, weights=a.one_to_one(), minlength=n).astype(np.int64)
        covered = np.bincount(sample_of_pos, weights=a.student_chunk >= 0, minlength=n).astype(np.int64)
        reasons = np.bincount(
            sample_of_pos * len(Unaligned) + a.reason, minlength=n * len(Unaligned)
        ).reshape(n, len(Unaligned))
        chunks = np.diff(self.chunk_offsets)
        mean_width = np.divide(width_sum, chunks, out=np.zeros(n), where=chunks > 0)
        # Plain Python numbers up front: building 512 small objects from numpy scalars costs more than
        # the alignment itself.
        unaligned: list[dict[str, int]] = [{} for _ in range(n)]
        rows, cols = np.nonzero(reasons[:, 1:])
        for i, r, count in zip(rows.tolist(), (cols + 1).tolist(), reasons[rows, cols + 1].tolist()):
            unaligned[i][_REASON_NAMES[r]] = count
        columns = zip(
            s_count.tolist(), np.diff(self.teacher_offsets).tolist(), chunks.tolist(), one.tolist(),
            covered.tolist(), mean_width.tolist(), width_max.tolist(), unaligned,
        )
        return [AlignmentStats(*values) for values in columns]


def _segment_max(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Max of each consecutive segment of ``values`` (0 for empty segments)."""
    out = np.zeros(len(counts), dtype=np.int64)
    nonempty = counts > 0
    if nonempty.any():
        starts = (np.cumsum(counts) - counts)[nonempty]
        out[nonempty] = np.maximum.reduceat(values, starts)
    return out


def _count_upto(positions: np.ndarray, total: int) -> np.ndarray:
    """``out[x]`` = how many of ``positions`` are <= x, for every byte position ``0 <= x <= total``."""
    counts = np.bincount(np.minimum(positions, total + 1), minlength=total + 2)[: total + 1]
    return np.cumsum(counts, dtype=np.int64)


def _merge_sorted(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sorted union of two sorted int arrays (a stable sort of two runs is linear)."""
    merged = np.concatenate([a, b])
    merged.sort(kind="stable")
    return merged[np.append(True, merged[1:] != merged[:-1])] if len(merged) else merged


def _concat(arrays, dtype=np.float64) -> np.ndarray:
    arrays = [np.asarray(x, dtype=dtype) for x in arrays]
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)


def align_batch(
    student_spans: Sequence[np.ndarray],
    teacher_spans: Sequence[np.ndarray],
    *,
    teacher_ends: Sequence[int | None] | None = None,
    invalid_bytes: Sequence[np.ndarray | None] | None = None,
    tail_reason: Unaligned = Unaligned.TEACHER_CONTEXT,
) -> BatchAlignment:
    """Align many samples at once (see :func:`align_spans` for the meaning of each argument).

    The samples are laid end to end in one byte coordinate, so the whole batch costs a fixed number of
    vectorised numpy passes instead of a few dozen per sample.
    """
    n = len(student_spans)
    s_list = [np.asarray(x, dtype=np.int64).reshape(-1, 2) for x in student_spans]
    t_list = [np.asarray(x, dtype=np.int64).reshape(-1, 2) for x in teacher_spans]
    s_counts = np.fromiter((len(x) for x in s_list), dtype=np.int64, count=n)
    t_counts = np.fromiter((len(x) for x in t_list), dtype=np.int64, count=n)
    s_all = np.concatenate(s_list) if n else np.zeros((0, 2), dtype=np.int64)
    t_all = np.concatenate(t_list) if n else np.zeros((0, 2), dtype=np.int64)
    s_sample = np.repeat(np.arange(n), s_counts)
    t_sample = np.repeat(np.arange(n), t_counts)
    # Each sample occupies [base, base + size) of one shared byte axis.
    s_size, t_size = _segment_max(s_all[:, 1], s_counts), _segment_max(t_all[:, 1], t_counts)
    size = np.maximum(s_size, t_size)
    base = np.concatenate([[0], np.cumsum(size)])
    s_all = s_all + base[s_sample, None]
    t_all = t_all + base[t_sample, None]
    if teacher_ends is None:
        t_reach = t_size
    else:
        t_reach = np.array([t_size[i] if e is None else e for i, e in enumerate(teacher_ends)], dtype=np.int64)
    bad_at = None
    if invalid_bytes is not None:
        bad = [np.flatnonzero(x) + base[i] for i, x in enumerate(invalid_bytes) if x is not None and x.any()]
        bad_at = np.concatenate(bad) if bad else None
    return _align_global(s_all, t_all, s_counts, t_counts, base, base[:-1] + t_reach, bad_at, tail_reason)


def align_lengths_batch(
    student_lengths: Sequence[np.ndarray], teacher_lengths: Sequence[np.ndarray]
) -> BatchAlignment:
    """Fast path of :func:`align_batch` for byte-exact samples: token byte lengths in, nothing else.

    Each sample's student and teacher tokens must spell the same bytes (check that first), so the
    samples' byte ranges line up on both sides and one cumulative sum places every token.
    """
    n = len(student_lengths)
    s_counts = np.fromiter((len(x) for x in student_lengths), dtype=np.int64, count=n)
    t_counts = np.fromiter((len(x) for x in teacher_lengths), dtype=np.int64, count=n)
    s_len = np.concatenate(student_lengths).astype(np.int64) if n else np.zeros(0, dtype=np.int64)
    t_len = np.concatenate(teacher_lengths).astype(np.int64) if n else np.zeros(0, dtype=np.int64)
    return align_lengths_flat(s_len, s_counts, t_len, t_counts)


def align_lengths_flat(
    student_lengths: np.ndarray, student_counts: np.ndarray, teacher_lengths: np.ndarray, teacher_counts: np.ndarray
) -> BatchAlignment:
    """:func:`align_lengths_batch` on concatenated token byte lengths and per-sample token counts."""
    s_len, t_len = np.asarray(student_lengths, dtype=np.int64), np.asarray(teacher_lengths, dtype=np.int64)
    s_counts, t_counts = np.asarray(student_counts, dtype=np.int64), np.asarray(teacher_counts, dtype=np.int64)
    n = len(s_counts)
    s_end, t_end = np.cumsum(s_len), np.cumsum(t_len)
    s_sample = np.repeat(np.arange(n), s_counts)
    s_bytes = np.bincount(s_sample, weights=s_len, minlength=n).astype(np.int64)
    t_bytes = np.bincount(np.repeat(np.arange(n), t_counts), weights=t_len, minlength=n).astype(np.int64)
    if not np.array_equal(s_bytes, t_bytes):
        k = int(np.flatnonzero(s_bytes != t_bytes)[0])
        raise ByteMismatchError(f"sample {k}: student spells {s_bytes[k]} bytes, teacher {t_bytes[k]}")
    total = int(s_end[-1]) if len(s_end) else 0
    alignment, s_closes = _chunks(s_len, s_end, t_len, t_end, total)
    chunks_per_sample = np.bincount(s_sample, weights=s_closes, minlength=n).astype(np.int64)
    return BatchAlignment(
        alignment,
        np.concatenate([[0], np.cumsum(s_counts)]),
        np.concatenate([[0], np.cumsum(t_counts)]),
        np.concatenate([[0], np.cumsum(chunks_per_sample)]),
    )


def align_lengths(student_lengths: np.ndarray, teacher_lengths: np.ndarray) -> Alignment:
    """:func:`align_lengths_flat` for one sample, without the batch bookkeeping (a short response pays a few
    numpy calls, not a few dozen). Same result as ``align_lengths_batch([s], [t])[0]``.

    Args:
        student_lengths: int ``[n_student]``: bytes spelled by each student token (0 for special tokens).
        teacher_lengths: int ``[n_teacher]``: the same for the teacher tokens, which must spell the same bytes.

    Returns:
        The :class:`Alignment`; zero-length tokens are unaligned (students' with reason ``SPECIAL``).

    Raises:
        ByteMismatchError: the two sides spell different numbers of bytes.
    """
    s_len = np.asarray(student_lengths, dtype=np.int64)
    t_len = np.asarray(teacher_lengths, dtype=np.int64)
    s_end, t_end = np.cumsum(s_len), np.cumsum(t_len)
    s_bytes = int(s_end[-1]) if len(s_end) else 0
    t_bytes = int(t_end[-1]) if len(t_end) else 0
    if s_bytes != t_bytes:
        raise ByteMismatchError(f"sample 0: student spells {s_bytes} bytes, teacher {t_bytes}")
    return _chunks(s_len, s_end, t_len, t_end, s_bytes)[0]


def _chunks(s_len: np.ndarray, s_end: np.ndarray, t_len: np.ndarray, t_end: np.ndarray,
            total: int) -> tuple[Alignment, np.ndarray]:
    """The alignment of two tokenizations of the same ``total`` bytes, and which student tokens close a chunk.

    Contiguous spans on both sides: every text token's end is a cut point, so the shared cuts are the byte
    positions where both sides end a token, found with one flag array over the byte axis.
    """
    s_text, t_text = s_len > 0, t_len > 0
    t_flags = np.zeros(total + 1, dtype=bool)
    t_flags[t_end[t_text]] = True
    s_flags = np.zeros(total + 1, dtype=bool)
    s_flags[s_end[s_text]] = True
    s_closes = s_text & t_flags[s_end]  # this student token ends a chunk
    t_closes = t_text & s_flags[t_end]
    # chunks closed before a token = its chunk index
    student_chunk = np.where(s_text, np.cumsum(s_closes) - s_closes, -1)
    teacher_chunk = np.where(t_text, np.cumsum(t_closes) - t_closes, -1)
    reason = np.where(s_text, np.int8(Unaligned.ALIGNED), np.int8(Unaligned.SPECIAL))
    return Alignment(student_chunk, teacher_chunk, reason, int(np.count_nonzero(s_closes))), s_closes


def _align_global(s_all, t_all, s_counts, t_counts, base, t_reach, bad_at, tail_reason) -> BatchAlignment:
    """The alignment core over samples laid end to end (``base``: sample byte offsets, ``n + 1``;
    ``t_reach``: absolute byte up to which the teacher encoded each sample)."""
    n = len(s_counts)
    size = np.diff(base)
    t_sample = np.repeat(np.arange(n), t_counts)
    student_chunk = np.full(len(s_all), -1, dtype=np.int64)
    teacher_chunk = np.full(len(t_all), -1, dtype=np.int64)
    reason = np.zeros(len(s_all), dtype=np.int8)
    s_text = s_all[:, 1] > s_all[:, 0]
    t_text = t_all[:, 1] > t_all[:, 0]
    reason[~s_text] = Unaligned.SPECIAL
    s_idx, t_idx = np.flatnonzero(s_text), np.flatnonzero(t_text)
    s_start, s_end = s_all[s_idx, 0], s_all[s_idx, 1]
    t_start, t_end = t_all[t_idx, 0], t_all[t_idx, 1]

    # Shared cuts: a student cut inside a teacher cut interval, one per interval (the last, so bytes in a
    # teacher gap join the chunk before it), plus every sample's end so no chunk crosses two samples.
    # Ranks are read off one dense array over the byte axis (a cumulative count), which is several times
    # faster than binary searches over hundreds of thousands of sorted positions.
    total = int(base[-1])
    s_cuts = _cut_points(s_start, s_end)
    if len(t_idx):
        t_lo, t_hi = _cut_intervals(t_start, t_end, t_reach[t_sample[t_idx]])
        interval_id = _count_upto(t_lo, total)  # intervals starting at or before each byte position
        inside = interval_id - _count_upto(t_hi + 1, total)  # ... minus those already closed
        shared = inside[s_cuts] > 0
        cuts, k = s_cuts[shared], interval_id[s_cuts[shared]]
        cuts = cuts[np.append(k[1:] != k[:-1], True)] if len(cuts) else cuts
    else:
        cuts = np.zeros(0, dtype=np.int64)
    cuts = _merge_sorted(cuts, base[1:][size > 0])

    # A token belongs to the chunk whose right edge is the first cut at or after the token's end,
    # i.e. its chunk index is the number of cuts before its end.
    n_chunks = len(cuts)
    cuts_before = _count_upto(cuts + 1, total)  # cuts_before[x] = number of cuts < x
    s_chunk = cuts_before[s_end]
    t_chunk = cuts_before[t_end]
    s_count = np.bincount(s_chunk, minlength=n_chunks)
    t_count = np.bincount(t_chunk, minlength=n_chunks)

    # A chunk needs tokens on both sides; one that holds invalid bytes carries a wrong teacher signal.
    chunk_lo = np.concatenate([[0], cuts[:-1]])
    sample_of_cut = np.searchsorted(base[1:], cuts, side="left")
    bad_reason = np.zeros(n_chunks, dtype=np.int8)
    no_teacher = (s_count > 0) & (t_count == 0)
    past_teacher = chunk_lo >= t_reach[np.minimum(sample_of_cut, n - 1)] if n else no_teacher
    bad_reason[no_teacher & past_teacher] = tail_reason
    bad_reason[no_teacher & ~past_teacher] = Unaligned.NO_TEACHER_TOKENS
    if bad_at is not None:
        chunk_of_bad = np.searchsorted(cuts, bad_at + 1, side="left")
        bad_reason[chunk_of_bad[chunk_of_bad < n_chunks]] = Unaligned.INVALID_UTF8
    keep = (s_count > 0) & (t_count > 0) & (bad_reason == 0)
    renumber = np.cumsum(keep) - 1

    s_keep = keep[s_chunk]
    student_chunk[s_idx[s_keep]] = renumber[s_chunk[s_keep]]
    t_keep = keep[t_chunk]
    teacher_chunk[t_idx[t_keep]] = renumber[t_chunk[t_keep]]
    reason[s_idx] = np.where(s_keep, Unaligned.ALIGNED, bad_reason[s_chunk])

    kept_per_sample = np.bincount(sample_of_cut[keep], minlength=n)
    chunk_offsets = np.concatenate([[0], np.cumsum(kept_per_sample)])
    alignment = Alignment(student_chunk, teacher_chunk, reason, int(keep.sum()))
    return BatchAlignment(
        alignment,
        np.concatenate([[0], np.cumsum(s_counts)]),
        np.concatenate([[0], np.cumsum(t_counts)]),
        chunk_offsets,
    )


def align_spans(
    student_spans: np.ndarray,
    teacher_spans: np.ndarray,
    *,
    invalid_bytes: np.ndarray | None = None,
    teacher_end: int | None = None,
    tail_reason: Unaligned = Unaligned.TEACHER_CONTEXT,
) -> Alignment:
    """Partition two tokenizations of one byte string into the finest chunks with shared boundaries.

    Args:
        student_spans: int64 ``[n_student, 2]``: ``[start, end)`` byte span of each student token, in order,
            from byte 0. Zero-width spans (special tokens) are never aligned (reason ``SPECIAL``).
        teacher_spans: int64 ``[n_teacher, 2]``: spans of the teacher tokens in the same byte coordinates.
            They may overlap (byte pieces of one character reported with the character's span), leave
            gaps (bytes the teacher's normaliser dropped) or stop early (teacher context limit).
        invalid_bytes: optional bool ``[n_bytes]``: bytes the teacher could not see as text; chunks that
            contain one are left unaligned (reason ``INVALID_UTF8``).
        teacher_end: the byte position up to which the teacher encoded the text (default: the end of its
            last span). Bytes between the last teacher span and ``teacher_end`` (dropped by its
            normaliser) still belong to the final chunk; bytes after it were never seen by the teacher.
        tail_reason: reason given to student tokens the teacher never saw.

    Returns:
        The :class:`Alignment`. O(n + m) apart from sorting the cut points.

    Example:
        >>> a = align_spans(np.array([[0, 1], [1, 2], [2, 3]]), np.array([[0, 3]]))   # "347" vs "347"
        >>> a.student_chunk.tolist(), a.teacher_chunk.tolist()
        ([0, 0, 0], [0])
    """
    return align_batch(
        [student_spans],
        [teacher_spans],
        teacher_ends=[teacher_end],
        invalid_bytes=[invalid_bytes],
        tail_reason=tail_reason,
    )[0]


def spans_from_lengths(lengths: np.ndarray, start: int = 0) -> np.ndarray:
    """int64 ``[n, 2]`` spans of consecutive tokens with the given byte lengths."""
    lengths = np.asarray(lengths, dtype=np.int64)
    spans = np.empty((len(lengths), 2), dtype=np.int64)  # filled column by column: np.stack costs more here
    np.cumsum(lengths, out=spans[:, 1])
    spans[:, 1] += start
    np.subtract(spans[:, 1], lengths, out=spans[:, 0])
    return spans


# --------------------------------------------------------------------------------------------------
# Text <-> bytes, and aligning a student response with the teacher's encoding of the same bytes


def decode_with_byte_map(data: bytes) -> tuple[str, np.ndarray, np.ndarray]:
    """Decode UTF-8 bytes for the teacher, keeping track of where every character came from.

    Invalid bytes (a character cut in half by truncation, or garbage the student sampled) become U+FFFD,
    one per byte, and are flagged so the alignment can leave them out.

    Returns:
        ``(text, char_starts, invalid)``: ``char_starts`` is int64 ``[len(text) + 1]``, the byte offset of
        each character (last entry ``len(data)``); ``invalid`` is bool ``[len(data)]``.
    """
    arr = np.frombuffer(data, dtype=np.uint8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        escaped = data.decode("utf-8", errors="surrogateescape")
        lengths = np.fromiter(
            (1 if 0xDC80 <= ord(c) <= 0xDCFF else len(c.encode("utf-8")) for c in escaped),
            dtype=np.int64,
            count=len(escaped),
        )
        char_starts = np.concatenate([[0], np.cumsum(lengths)])
        invalid = np.zeros(len(data), dtype=bool)
        bad_chars = np.flatnonzero([0xDC80 <= ord(c) <= 0xDCFF for c in escaped])
        invalid[char_starts[bad_chars]] = True
        text = "".join("\ufffd" if 0xDC80 <= ord(c) <= 0xDCFF else c for c in escaped)
        return text, char_starts, invalid
    char_starts = np.append(np.flatnonzero((arr & 0xC0) != 0x80), len(data)).astype(np.int64)
    return text, char_starts, np.zeros(len(data), dtype=bool)


@dataclass(frozen=True, eq=False)
class TeacherEncoding:
    """The teacher's tokens for a byte string, with their spans in that string's byte coordinates.

    Attributes:
        ids: int64 ``[m]`` teacher token ids.
        spans: int64 ``[m, 2]`` byte spans in the *original* bytes (what the student spelled).
        exact: True if the teacher's tokens spell exactly the original bytes (spans are byte-precise);
            False if the teacher's normaliser rewrote some text and spans come from its offset mapping.
        invalid_bytes: bool ``[n_bytes]``: bytes that were not valid UTF-8.
    """

    ids: np.ndarray
    spans: np.ndarray
    exact: bool
    invalid_bytes: np.ndarray


def encode_bytes(teacher_tokenizer, teacher_table: TokenBytes, data: bytes) -> TeacherEncoding:
    """Encode bytes with the teacher's tokenizer as plain text and locate every token in those bytes.

    Text that looks like a special token (``<|eot_id|>`` written in prose) stays text
    (``split_special_tokens=True``). A tokenizer's dummy-prefix space is not added (the bytes continue
    the teacher's prompt; see :func:`_encode_continuation`). When the teacher's tokens spell the bytes exactly, spans
    are byte-precise; when its normaliser changed the text (Qwen3 composes NFD accents, Gemma-3 rewrites
    some characters), spans come from the offset mapping, which points back into the original text.
    """
    try:  # valid UTF-8 (the usual case): the character map is only needed when the teacher rewrote text
        text, char_starts, invalid = data.decode("utf-8"), None, None
    except UnicodeDecodeError:
        text, char_starts, invalid = decode_with_byte_map(data)
    if not text:
        empty = np.zeros(0, dtype=np.int64)
        return TeacherEncoding(empty, empty.reshape(0, 2), True, np.zeros(len(data), dtype=bool))
    with tokenizer_lock(teacher_tokenizer):
        ids, offsets = _encode_continuation(teacher_tokenizer, teacher_table, text)
    if invalid is None and teacher_table.bytes_of(ids) == data:
        return TeacherEncoding(ids, spans_from_lengths(teacher_table.lengths_of(ids)), True,
                               np.zeros(len(data), dtype=bool))
    if char_starts is None:
        text, char_starts, invalid = decode_with_byte_map(data)
    spans = char_starts[np.clip(_offset_array(offsets), 0, len(text))]
    return TeacherEncoding(ids, spans, False, invalid)


def _encode_text(tokenizer, text: str) -> tuple[np.ndarray, Sequence]:
    """``tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True)`` as
    (int64 ids, offsets as the tokenizer gave them: (start, end) character pairs; :func:`_offset_array` makes
    the array, only when a caller needs it); straight through the Rust tokenizer where that is the same call
    (:func:`_direct_backend`), which saves the ~20 µs transformers spends around it. The caller holds
    :func:`tokenizer_lock`."""
    backend = _direct_backend(tokenizer)
    if backend is not None and backend.truncation is None and backend.padding is None:
        if not backend.encode_special_tokens:  # what transformers does for split_special_tokens=True
            backend.encode_special_tokens = True
        # encode_batch, as transformers calls it: unlike encode, it lets go of the GIL while it works, so a
        # long response encoded in a worker thread does not stall the event loop.
        enc = backend.encode_batch([text], add_special_tokens=False)[0]
        return np.asarray(enc.ids, dtype=np.int64), enc.offsets
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True)
    return np.asarray(enc["input_ids"], dtype=np.int64), enc["offset_mapping"]


def _offset_array(offsets: Sequence) -> np.ndarray:
    """int64 ``[n, 2]`` character offsets from what :func:`_encode_text` returned (pairs or an array)."""
    return np.asarray(offsets, dtype=np.int64).reshape(-1, 2)


_DIRECT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_DIRECT_PROBES = ("Hello, world! 你好 🤖 <|eot_id|><|im_end|><end_of_turn></s>\n\n  x", "e\u0301 ﬁ\t\r\n1234567 ")


def _direct_backend(tokenizer):
    """The Rust ``tokenizers.Tokenizer`` behind ``tokenizer`` when encoding through it gives what the
    transformers call gives, else None (decided once per tokenizer object).

    That holds for a transformers v5 ``TokenizersBackend`` whose class keeps the base ``__call__`` and
    ``_encode_plus`` (no subclass rewrites the text or the result): those set the backend's
    ``encode_special_tokens`` flag, turn off truncation and padding, and call ``encode_batch`` on the text. Two probe
    texts are encoded both ways as a check; any difference, or any other tokenizer, keeps the transformers call.
    """
    try:
        cached = _DIRECT.get(tokenizer, False)
    except TypeError:  # not weak-referenceable
        return None
    if cached is not False:
        return cached
    backend = None
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # transformers v4 (or none): keep its own call
        TokenizersBackend = None
    if (
        TokenizersBackend is not None
        and isinstance(tokenizer, TokenizersBackend)
        and type(tokenizer).__call__ is PreTrainedTokenizerBase.__call__
        and type(tokenizer)._encode_plus is TokenizersBackend._encode_plus
        and not hasattr(tokenizer, "_switch_to_input_mode")
    ):
        candidate = tokenizer.backend_tokenizer
        with tokenizer_lock(tokenizer):
            for text in _DIRECT_PROBES:
                enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True)
                if candidate.truncation is not None or candidate.padding is not None:
                    break
                candidate.encode_special_tokens = True
                direct = candidate.encode_batch([text], add_special_tokens=False)[0]
                if direct.ids != enc["input_ids"] or [tuple(o) for o in direct.offsets] != [
                    tuple(o) for o in enc["offset_mapping"]
                ]:
                    break
            else:
                backend = candidate
    _DIRECT[tokenizer] = backend
    return backend


# Encoded in front of a continuation for tokenizers that add a dummy-prefix space, then removed again.
_ANCHOR = "\n"


def _encode_continuation(tokenizer, table: TokenBytes, text: str) -> tuple[np.ndarray, Sequence]:
    """Encode ``text`` as the continuation of earlier text: no dummy-prefix space in front of it. Returns
    (ids, offsets) as :func:`_encode_text` does.

    SentencePiece tokenizers with ``add_dummy_prefix`` (Llama-2, Mistral v1-v3, Phi-3) encode ``"Hello"``
    as ``"▁Hello"``: a space the response does not have. For them the text is encoded after an anchor
    (``"\\n"``) whose tokens are then dropped, so ``"Hello"`` stays ``"Hello"``. If a token straddles
    the anchor, it falls back to a plain encode minus a lone leading ``"▁"`` token.
    """
    if not table.adds_dummy_prefix:
        return _encode_text(tokenizer, text)
    ids, offsets = _encode_text(tokenizer, _ANCHOR + text)
    offsets = _offset_array(offsets)
    first = int(np.searchsorted(offsets[:, 1], len(_ANCHOR), side="right"))  # first token past the anchor
    if first < len(ids) and offsets[first, 0] >= len(_ANCHOR) and table.bytes_of(ids[first:]) == text.encode():
        return ids[first:], offsets[first:] - len(_ANCHOR)
    ids, offsets = _encode_text(tokenizer, text)
    if len(ids) and not text.startswith(" ") and table.bytes_of(ids[:1]) == b" ":
        ids, offsets = ids[1:], _offset_array(offsets)[1:]
    return ids, offsets


def response_spans(student_ids: Sequence[int] | np.ndarray, student_table: TokenBytes) -> np.ndarray:
    """Byte spans of the student's response tokens (special tokens are zero-width)."""
    return spans_from_lengths(student_table.lengths_of(student_ids))


def align_response(
    student_ids: Sequence[int] | np.ndarray,
    student_table: TokenBytes,
    teacher_tokenizer,
    teacher_table: TokenBytes,
    *,
    max_teacher_tokens: int | None = None,
) -> tuple[TeacherEncoding, Alignment]:
    """Spell the student's response ids as bytes, encode them for the teacher, and align the two.

    Args:
        student_ids: the student's response token ids (may include special tokens, e.g. end of turn).
        student_table, teacher_table: :func:`~slime_xvocab.token_bytes.token_bytes` of each tokenizer.
        teacher_tokenizer: the teacher's Hugging Face tokenizer.
        max_teacher_tokens: keep at most this many teacher tokens (teacher context budget); student
            positions past them are unaligned with reason ``TEACHER_CONTEXT``.

    Returns:
        ``(teacher_encoding, alignment)``; the teacher's response ids are ``teacher_encoding.ids``.
    """
    s_len = student_table.lengths_of(student_ids)
    return align_response_bytes(
        student_table.bytes_of(student_ids), s_len, teacher_tokenizer, teacher_table,
        max_teacher_tokens=max_teacher_tokens,
    )


def align_response_bytes(
    data: bytes,
    student_lengths: np.ndarray,
    teacher_tokenizer,
    teacher_table: TokenBytes,
    *,
    max_teacher_tokens: int | None = None,
) -> tuple[TeacherEncoding, Alignment]:
    """:func:`align_response` from what a caller already has, so nothing is looked up twice.

    Args:
        data: the bytes the student's response ids spell (``student_table.bytes_of(ids)``).
        student_lengths: int64 ``[n_student]``: ``student_table.lengths_of(ids)``, summing to ``len(data)``.
        teacher_tokenizer, teacher_table, max_teacher_tokens: as for :func:`align_response`.

    Returns:
        ``(teacher_encoding, alignment)``, as :func:`align_response` returns them.
    """
    encoding = encode_bytes(teacher_tokenizer, teacher_table, data)
    teacher_end = len(data)
    if max_teacher_tokens is not None and len(encoding.ids) > max_teacher_tokens:
        keep = max(0, max_teacher_tokens)
        teacher_end = int(encoding.spans[:keep, 1].max()) if keep else 0
        encoding = TeacherEncoding(encoding.ids[:keep], encoding.spans[:keep], encoding.exact, encoding.invalid_bytes)
    if encoding.exact and teacher_end == len(data):
        # Byte-exact and complete (the usual case): token byte lengths alone place every token.
        return encoding, align_lengths(student_lengths, encoding.spans[:, 1] - encoding.spans[:, 0])
    student_spans = spans_from_lengths(student_lengths)
    alignment = align_spans(
        student_spans,
        encoding.spans,
        invalid_bytes=encoding.invalid_bytes,
        teacher_end=teacher_end,
        tail_reason=Unaligned.TEACHER_CONTEXT,
    )
    if not encoding.exact:
        alignment = drop_rewritten_chunks(alignment, data, student_spans, encoding.ids, teacher_table)
    return encoding, alignment


def drop_rewritten_chunks(
    alignment: Alignment, data: bytes, student_spans: np.ndarray, teacher_ids: np.ndarray, teacher_table: TokenBytes
) -> Alignment:
    """Unalign chunks whose teacher text is not the student's text up to Unicode normalisation.

    Only needed when the teacher's tokens were located through its offset mapping: a normaliser that
    composes accents (NFC) or folds compatibility characters (NFKC) is harmless, the teacher scored the
    same text; one that deletes or replaces characters is not, and those chunks get reason
    ``BYTE_MISMATCH`` (delta 0) instead of a teacher signal for text it never saw.
    """
    if not alignment.num_chunks:
        return alignment
    n = alignment.num_chunks
    s_chunk, t_chunk = alignment.student_chunk, alignment.teacher_chunk
    big = np.iinfo(np.int64).max
    s_lo, s_hi = np.full(n, big), np.zeros(n, dtype=np.int64)
    aligned = s_chunk >= 0
    np.minimum.at(s_lo, s_chunk[aligned], student_spans[aligned, 0])
    np.maximum.at(s_hi, s_chunk[aligned], student_spans[aligned, 1])
    # Teacher text of each chunk: its tokens are consecutive, so a range of the teacher's concatenated bytes.
    t_len = teacher_table.lengths_of(teacher_ids)
    t_end = np.cumsum(t_len)
    t_start = t_end - t_len
    in_chunk = t_chunk >= 0
    t_lo, t_hi = np.full(n, big), np.zeros(n, dtype=np.int64)
    np.minimum.at(t_lo, t_chunk[in_chunk], t_start[in_chunk])
    np.maximum.at(t_hi, t_chunk[in_chunk], t_end[in_chunk])
    teacher_bytes = teacher_table.bytes_of(teacher_ids)
    # Byte-identical chunks (almost all) are settled at once; only the others are compared up to NFKC.
    x = np.frombuffer(data, dtype=np.uint8)
    y = np.frombuffer(teacher_bytes, dtype=np.uint8)
    same_len = (s_hi - s_lo) == (t_hi - t_lo)
    same = same_len.copy()
    idx = np.flatnonzero(same_len & (s_hi > s_lo))
    if len(idx):
        lengths = (s_hi - s_lo)[idx]
        owner = np.repeat(np.arange(len(idx)), lengths)
        rank = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        differs = x[s_lo[idx][owner] + rank] != y[t_lo[idx][owner] + rank]
        same[idx[np.unique(owner[differs])]] = False
    bad = []
    for c in np.flatnonzero(~same).tolist():
        student_text = data[s_lo[c]:s_hi[c]].decode("utf-8", errors="replace")
        teacher_text = teacher_bytes[t_lo[c]:t_hi[c]].decode("utf-8", "replace")
        if unicodedata.normalize("NFKC", student_text) != unicodedata.normalize("NFKC", teacher_text):
            bad.append(c)
    if not bad:
        return alignment
    drop = np.zeros(alignment.num_chunks + 1, dtype=bool)
    drop[bad] = True  # index -1 reads the trailing False
    keep = ~drop[:-1]
    renumber = np.append(np.cumsum(keep) - 1, -1)
    s_drop, t_drop = drop[s_chunk], drop[t_chunk]
    reason = alignment.reason.copy()
    reason[s_drop] = Unaligned.BYTE_MISMATCH
    return Alignment(
        np.where(s_drop, -1, renumber[s_chunk]),
        np.where(t_drop, -1, renumber[t_chunk]),
        reason,
        int(keep.sum()),
    )


def align_tokens(
    student_ids: Sequence[int] | np.ndarray,
    teacher_ids: Sequence[int] | np.ndarray,
    student_table: TokenBytes,
    teacher_table: TokenBytes,
    *,
    sample: object = None,
) -> Alignment:
    """Align two token sequences that must spell identical bytes.

    Raises:
        ByteMismatchError: the bytes differ; the message gives the first differing byte, both sides'
            text around it, and the likely cause.
    """
    s_bytes, t_bytes = student_table.bytes_of(student_ids), teacher_table.bytes_of(teacher_ids)
    if s_bytes != t_bytes:
        raise ByteMismatchError(describe_mismatch(s_bytes, t_bytes, sample=sample))
    return align_spans(
        response_spans(student_ids, student_table), response_spans(teacher_ids, teacher_table)
    )


def describe_mismatch(student: bytes, teacher: bytes, *, sample: object = None) -> str:
    """Say where two byte strings first differ and what probably caused it."""
    at = next((k for k, (a, b) in enumerate(zip(student, teacher)) if a != b), min(len(student), len(teacher)))
    lo = max(0, at - 16)

    def show(b: bytes) -> str:
        return repr(b[lo:at + 16].decode("utf-8", errors="replace"))

    s_text, t_text = student.decode("utf-8", "replace"), teacher.decode("utf-8", "replace")
    if unicodedata.normalize("NFC", s_text) == unicodedata.normalize("NFC", t_text):
        cause = "the teacher tokenizer normalises Unicode (NFC); encode with offsets (encode_bytes) instead"
    elif teacher.startswith(b" ") and teacher[1:] == student:
        cause = "the teacher tokenizer adds a dummy-prefix space; drop it before aligning"
    elif len(teacher) < len(student) and student.startswith(teacher):
        cause = "the teacher's tokens stop early (truncated to a context limit?)"
    else:
        cause = "the two token sequences do not spell the same text (were they produced from one response?)"
    where = f"sample {sample}: " if sample is not None else ""
    return (
        f"{where}student and teacher bytes differ at byte {at} "
        f"(student {len(student)} bytes, teacher {len(teacher)} bytes): student {show(student)} vs "
        f"teacher {show(teacher)}. Likely cause: {cause}."
    )


def check_log_probs(values: np.ndarray, what: str, sample: object = None) -> np.ndarray:
    """float64 array of log-probs, raising SampleError on NaN/inf or positive values."""
    arr = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(arr) | (arr > 1e-4)
    if bad.any():
        where = f"sample {sample}: " if sample is not None else ""
        k = int(np.flatnonzero(bad)[0])
        raise SampleError(f"{where}{what}[{k}] = {arr[k]!r} is not a log-probability (finite and <= 0)")
    return arr
