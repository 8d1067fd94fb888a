"""The demo teacher's exact distribution in the student's tokens, by marginalising over every teacher path.

The demo's answers are digit strings followed by an end of turn, and the teacher is a small model over a compact
vocabulary, so the teacher's probability of any answer prefix can be computed exactly in-process: the sum over
*every* teacher token path that spells it (``"42"`` is the Llama-3 token ``42`` or ``4`` then ``2``), with the
teacher's full next-token distribution at every node (no top-k). From it, each student token gets the value the
plugin's default credit aims at (docs/alignment.md, "Step 4"; ``credit-target``)::

    v_j = log Q(x_<=j) - log Q(x_<j) + log e_j - log e_{j-1},    v_eot = log P(end | x) - log e_n

with ``Q(u)`` the teacher probability that the answer starts with the characters ``u`` and ``e_j`` the
probability that the next characters do not extend student token ``j`` into a longer student token (only a digit
can extend a digit token, and only when the student's tokenizer would merge it: Llama-3 numbers of one or two
digits, never Qwen3's single digits). The values sum to ``log P_teacher(answer, end)``.

This is the **ceiling** arm's teacher signal: what the plugin's ``student_token`` credit would give if the teacher
returned its whole distribution and every path, i.e. OPD "as if the teacher spoke the student's tokenizer".

Scope (stated, not hidden): teacher paths are enumerated over number tokens and the end of turn. When the student
writes a token that is neither a digit nor its end of turn (rare: the student is SFT-trained on the format), that
token gets the log of the teacher's total mass of "neither a digit nor the end" (an upper bound of its exact
value), and the tokens after it get no teacher value (delta 0, counted as not covered).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from slime_xvocab.demo.models import ChatLM

_MAX_TEACHER_DIGITS = 3  # the longest number token either family has


@dataclass
class ExactScore:
    """One answer's exact teacher values.

    Attributes:
        values: one value per student response token (``nan`` where the token gets no teacher value).
        text_logprob: log P_teacher(answer text, end of turn) if the answer ended its turn, else
            log P_teacher(the answer starts with this text); for an answer with a non-digit token, an upper bound.
        n_bytes: UTF-8 bytes of the answer text, +1 for an end of turn.
        off_format: the answer has a token that is neither a digit nor the end of turn.
    """

    values: np.ndarray
    text_logprob: float
    n_bytes: int
    off_format: bool


def _lse(xs) -> float:
    xs = [x for x in xs if x > -np.inf]
    return float(np.logaddexp.reduce(xs)) if xs else -np.inf


def _log_sub(a: float, b: float) -> float:
    """log(exp(a) - exp(b)) for b <= a, floored at a + log(1e-12) (the difference of nearly equal masses)."""
    if b == -np.inf:
        return a
    return a + float(np.log(max(1.0 - np.exp(min(0.0, b - a)), 1e-12)))


class ExactTeacher:
    """Exact student-token values of a demo teacher (a :class:`ChatLM` over a compact vocabulary).

    Args:
        teacher: the teacher model; its chat template renders the prompt.
        student: the student model (its tokenizer decides which digit tokens can be extended).
        batch: contexts per teacher forward.
    """

    def __init__(self, teacher: ChatLM, student: ChatLM, batch: int = 512) -> None:
        self.teacher, self.student, self.batch = teacher, student, batch
        tv, tt = teacher.vocab, teacher.tokenizer
        self.t_num: dict[str, int] = {}  # number string -> teacher model index
        for k, real in enumerate(tv.real_ids.tolist()):
            piece = tt.decode([real])
            if piece.isascii() and piece.isdigit():
                self.t_num[piece] = k
        self.t_num_idx = np.array(sorted(self.t_num.values()), dtype=np.int64)
        self.t_eot = int(tv.to_model([teacher.eot_id])[0])
        # teacher number tokens strictly longer than a prefix u and starting with it, per u of 0-2 digits
        self.t_ext: dict[str, np.ndarray] = {}
        for s, k in self.t_num.items():
            for cut in range(len(s)):
                self.t_ext.setdefault(s[:cut], []).append(k)
        self.t_ext = {u: np.array(ks, dtype=np.int64) for u, ks in self.t_ext.items()}
        # student side: digit string of each real id (None if not a digit token), and whether one more digit merges
        self._s_piece: dict[int, str | None] = {}
        self._s_extendable: dict[int, bool] = {}

    # ------------------------------------------------------------------------------------------- helpers
    def _student_piece(self, real: int) -> str | None:
        if real not in self._s_piece:
            piece = self.student.tokenizer.decode([real])
            digit = piece.isascii() and piece.isdigit()
            self._s_piece[real] = piece if digit else None
            if digit:  # does the student's tokenizer merge this token with a following digit?
                ids = self.student.tokenizer.encode(piece + "5", add_special_tokens=False)
                self._s_extendable[real] = len(ids) == 1
        return self._s_piece[real]

    @torch.no_grad()
    def _next_logprobs(self, contexts: list[list[int]]) -> np.ndarray:
        """Teacher log-distribution (compact indices, "other" excluded) after each context of real ids."""
        lm = self.teacher
        out = []
        for s in range(0, len(contexts), self.batch):
            chunk = contexts[s : s + self.batch]
            ids, att, pos, _, _ = lm._batch(chunk, [[] for _ in chunk])
            logits = lm.model(input_ids=ids, attention_mask=att, position_ids=pos, logits_to_keep=1).logits[:, -1]
            out.append(torch.log_softmax(logits[:, : lm.vocab.other].double(), -1).numpy())
        return np.concatenate(out) if out else np.zeros((0, lm.vocab.other))

    # ---------------------------------------------------------------------------------------------- main
    def score(self, messages: Sequence[list[dict]], responses: Sequence[Sequence[int]]) -> list[ExactScore]:
        """Exact values for each student response (real ids, end of turn included when emitted)."""
        plans = []
        contexts: list[list[int]] = []
        for msgs, resp in zip(messages, responses):
            pieces = [self._student_piece(int(t)) for t in resp]
            n_digit = 0
            while n_digit < len(resp) and pieces[n_digit] is not None:
                n_digit += 1
            ended = n_digit == len(resp) - 1 and int(resp[-1]) == self.student.eot_id
            off = n_digit < len(resp) and not ended
            r = "".join(pieces[:n_digit])
            # every teacher path (number tokens) spelling a prefix of r: (parent node, token, chars consumed)
            nodes = [(-1, -1, 0)]
            i = 0
            while i < len(nodes):
                m = nodes[i][2]
                for width in range(1, _MAX_TEACHER_DIGITS + 1):
                    if m + width <= len(r) and r[m : m + width] in self.t_num:
                        nodes.append((i, self.t_num[r[m : m + width]], m + width))
                i += 1
            prompt = self.teacher.prompt_ids(msgs)
            first = len(contexts)
            paths: list[list[int]] = []
            for parent, tok, _ in nodes:
                paths.append([] if parent < 0 else paths[parent] + [tok])
            real = self.teacher.vocab.real_ids
            contexts.extend(prompt + [int(real[t]) for t in p] for p in paths)
            plans.append((resp, pieces, n_digit, ended, off, r, nodes, first))
        dists = self._next_logprobs(contexts)
        return [self._values(dists, *plan) for plan in plans]

    def _values(self, dists, resp, pieces, n_digit, ended, off, r, nodes, first) -> ExactScore:
        L = len(r)
        lp = np.zeros(len(nodes))
        for i, (parent, tok, _) in enumerate(nodes):
            if parent >= 0:
                lp[i] = lp[parent] + dists[first + parent][tok]
        complete: list[list[float]] = [[] for _ in range(L + 1)]
        end: list[list[float]] = [[] for _ in range(L + 1)]
        digit_next: list[list[float]] = [[] for _ in range(L + 1)]
        extend: list[list[float]] = [[] for _ in range(L + 1)]  # paths that overshoot r[:k] with one token
        for i, (_, _, m) in enumerate(nodes):
            d = dists[first + i]
            complete[m].append(lp[i])
            end[m].append(lp[i] + d[self.t_eot])
            digit_next[m].append(lp[i] + _lse(d[self.t_num_idx]))
            for k in range(m + 1, min(L, m + _MAX_TEACHER_DIGITS - 1) + 1):
                ks = self.t_ext.get(r[m:k])
                if ks is not None:
                    extend[k].append(lp[i] + _lse(d[ks]))
        log_q = np.array([_lse(complete[k] + extend[k]) for k in range(L + 1)])
        log_end = np.array([_lse(end[k]) for k in range(L + 1)])
        log_digit_after = np.array([_lse(extend[k] + digit_next[k]) for k in range(L + 1)])

        values = np.full(len(resp), np.nan)
        log_e_prev = 0.0
        b = 0
        for j in range(n_digit):
            b_next = b + len(pieces[j])
            log_e = _log_sub(log_q[b_next], log_digit_after[b_next]) - log_q[b_next] \
                if self._s_extendable[int(resp[j])] else 0.0
            values[j] = log_q[b_next] - log_q[b] + log_e - log_e_prev
            log_e_prev, b = log_e, b_next
        if ended:
            values[n_digit] = log_end[L] - log_q[L] - log_e_prev
            text_lp = float(log_end[L])
        elif off:
            neither = _log_sub(log_q[L], float(np.logaddexp(log_digit_after[L], log_end[L])))
            values[n_digit] = neither - log_q[L] - log_e_prev
            text_lp = float(neither)
        else:  # truncated inside the digits
            text_lp = float(log_q[L])
        text = self.student.decode_response(resp)
        n_bytes = len(text.encode()) + int(ended)
        return ExactScore(values=values, text_logprob=text_lp, n_bytes=n_bytes, off_format=off)
