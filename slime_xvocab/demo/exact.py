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
writes a token that is neither a digit nor its end of turn (off format), that token's training value is the log
of the teacher's total mass of "neither a digit nor the end" (an upper bound of its exact value), and the tokens
after it get no teacher value (delta 0, counted as not covered). For the evaluation metric such an answer is
scored along the teacher's own tokenization (a lower bound), so that an arm cannot lower the measured reverse KL
by writing off-format text.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from slime_xvocab.demo.models import ChatLM

_MAX_TEACHER_DIGITS = 3  # the longest number token either family has
UNKNOWN_LP = -30.0  # log-prob charged for a token the teacher's vocabulary lacks (the teacher can never write it)


@dataclass
class ExactScore:
    """One answer's exact teacher values.

    Attributes:
        values: one value per student response token (``nan`` where the token gets no teacher value).
        text_logprob: log P_teacher(answer text, end of turn) if the answer ended its turn, else
            log P_teacher(the answer starts with this text), over every teacher tokenization; for an answer with
            a non-digit token, along the teacher's canonical tokenization only (a lower bound).
        n_bytes: UTF-8 bytes of the answer text, +1 for an end of turn.
        off_format: the answer has a token that is neither a digit nor the end of turn.
    """

    values: np.ndarray
    text_logprob: float
    n_bytes: int
    off_format: bool


def _lse(xs) -> float:
    """log(sum(exp(xs))) of a list or array (-inf when empty or all -inf)."""
    a = np.asarray(xs, dtype=np.float64)
    top = a.max(initial=-np.inf)
    if top == -np.inf:
        return -np.inf
    return float(top + np.log(np.exp(a - top).sum()))


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

    def __init__(self, teacher: ChatLM, student: ChatLM, batch: int = 512, cache_size: int = 300_000) -> None:
        self.teacher, self.student, self.batch = teacher, student, batch
        # The distributions are computed in float64 and stored in float32: a context's stored values then do not
        # depend on the batch it was computed in (padding, matrix shapes), so a run does not depend on what its
        # process computed before.
        self._model64 = copy.deepcopy(teacher.model).double().eval()
        self._cache: dict[tuple, np.ndarray] = {}
        self.cache_size = cache_size
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
        """Teacher log-distribution (compact indices, "other" excluded) after each context of real ids.

        Results are cached per context: the dense targets of a prompt's first position need ~100 contexts
        (every one- and two-digit continuation), and prompts come back across steps, arms and seeds.
        """
        lm = self.teacher
        keys = [tuple(c) for c in contexts]
        todo = list(dict.fromkeys(k for k in keys if k not in self._cache))
        if len(self._cache) + len(todo) > self.cache_size:
            self._cache.clear()
        for s in range(0, len(todo), self.batch):
            chunk = [list(k) for k in todo[s : s + self.batch]]
            ids, att, pos, _, _ = lm._batch(chunk, [[] for _ in chunk])
            logits = self._model64(input_ids=ids, attention_mask=att, position_ids=pos, logits_to_keep=1).logits[:, -1]
            dist = torch.log_softmax(logits[:, : lm.vocab.other].double(), -1).float().numpy()
            self._cache.update(zip(todo[s : s + self.batch], dist))
        if not keys:
            return np.zeros((0, lm.vocab.other))
        return np.stack([self._cache[k] for k in keys]).astype(np.float64)

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
        out = [self._values(dists, *plan) for plan in plans]
        off = [i for i, sc in enumerate(out) if sc.off_format]
        if off:  # an off-format answer's probability: its canonical teacher tokenization (a lower bound)
            lps = self._canonical_logprobs([messages[i] for i in off], [responses[i] for i in off])
            for i, lp in zip(off, lps):
                out[i].text_logprob = lp
        return out

    @torch.no_grad()
    def _canonical_logprobs(self, messages, responses) -> list[float]:
        """log P_teacher of each answer's text along the teacher's own tokenization (+ its end of turn if the
        student ended); a token outside the teacher's vocabulary (it can never write it) counts ``UNKNOWN_LP``."""
        t = self.teacher
        prompts, resps, unknown = [], [], []
        for msgs, resp in zip(messages, responses):
            ended = len(resp) > 0 and int(resp[-1]) == self.student.eot_id
            ids = t.tokenizer.encode(self.student.decode_response(resp), add_special_tokens=False)
            ids = ids + ([t.eot_id] if ended else [])
            known = t.vocab.to_model(ids) < t.vocab.other
            prompts.append(t.prompt_ids(msgs))
            resps.append(ids)
            unknown.append(~known)
        lp, mask = t.response_logprobs(prompts, resps)
        out = []
        for i, unk in enumerate(unknown):
            row = lp[i, : len(unk)].double().numpy()
            out.append(float(np.where(unk, UNKNOWN_LP, row).sum()))
        return out

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

    # --------------------------------------------------------------------------------------- dense targets
    def _support(self) -> list[tuple[int, str, bool]]:
        """The student's digit tokens as (model index, digits, extendable by one more digit)."""
        if not hasattr(self, "_support_cache"):
            sup = []
            for k, real in enumerate(self.student.vocab.real_ids.tolist()):
                piece = self._student_piece(int(real))
                if piece is not None:
                    sup.append((k, piece, self._s_extendable[int(real)]))
            self._support_cache = sup
        return self._support_cache

    def _plan_marginals(self, prompt: list[int], targets: set[str], need_de: set[str], contexts: list) -> dict:
        """Teacher paths (number tokens) spelling a prefix of any target; their contexts are appended."""
        prefixes = {t[:i] for t in targets for i in range(len(t) + 1)}
        nodes = [(-1, -1, "")]
        i = 0
        while i < len(nodes):
            w = nodes[i][2]
            for width in range(1, _MAX_TEACHER_DIGITS + 1):
                for piece in self._pieces_after(w, width, prefixes):
                    nodes.append((i, self.t_num[piece], w + piece))
            i += 1
        has_child = {w[:-1] for w in prefixes if w}
        need = [n[2] in has_child or n[2] in need_de for n in nodes]
        paths: list[list[int]] = []
        real = self.teacher.vocab.real_ids
        ctx_index = []
        for parent, tok, _ in nodes:
            paths.append([] if parent < 0 else paths[parent] + [tok])
        for i, p in enumerate(paths):
            if need[i]:
                ctx_index.append(len(contexts))
                contexts.append(prompt + [int(real[t]) for t in p])
            else:
                ctx_index.append(-1)
        return {"nodes": nodes, "ctx": ctx_index, "targets": targets, "need_de": need_de}

    def _pieces_after(self, w: str, width: int, prefixes: set[str]):
        # every digit string of this width that keeps w + piece inside the prefix set and is a teacher token
        frontier = [""]
        for _ in range(width):
            frontier = [f + c for f in frontier for c in "0123456789" if w + f + c in prefixes]
        return [f for f in frontier if f in self.t_num]

    def _marginals(self, plan: dict, dists: np.ndarray) -> dict[str, tuple[float, float, float]]:
        """target -> (log Q, log D, log E): starts with it / then a digit / then the end (D, E only where asked)."""
        nodes, ctx = plan["nodes"], plan["ctx"]
        lp = np.zeros(len(nodes))
        by_string: dict[str, list[int]] = {}
        for i, (parent, tok, w) in enumerate(nodes):
            if parent >= 0:
                lp[i] = lp[parent] + dists[ctx[parent]][tok]
            by_string.setdefault(w, []).append(i)
        out = {}
        for u in plan["targets"]:
            here = by_string.get(u, [])
            ext = []
            for cut in range(max(0, len(u) - _MAX_TEACHER_DIGITS + 1), len(u)):
                ks = self.t_ext.get(u[cut:])
                if ks is None:
                    continue
                for i in by_string.get(u[:cut], []):
                    ext.append(lp[i] + _lse(dists[ctx[i]][ks]))
            log_q = _lse([lp[i] for i in here] + ext)
            log_d = log_e = -np.inf
            if u in plan["need_de"]:
                log_d = _lse(ext + [lp[i] + _lse(dists[ctx[i]][self.t_num_idx]) for i in here])
                log_e = _lse([lp[i] + dists[ctx[i]][self.t_eot] for i in here])
            out[u] = (log_q, log_d, log_e)
        return out

    def dense_targets(self, messages: Sequence[list[dict]], responses: Sequence[Sequence[int]]) -> list[dict]:
        """The teacher's exact distribution over the student's next token at every response position.

        Support: the student's digit tokens and its end of turn; every other student token shares one tail
        bucket (the teacher's mass of "neither a digit nor the end"). Positions after a non-digit token get no
        target.

        Returns:
            Per response ``{"positions": [j...], "logq": [len(positions), V] (nan off the support),
            "log_tail": [len(positions)]}`` with ``V`` the student's model vocabulary (without "other").
        """
        support = self._support()
        V = self.student.vocab.other
        s_eot = int(self.student.vocab.to_model([self.student.eot_id])[0])
        plans, contexts = [], []
        for msgs, resp in zip(messages, responses):
            pieces = [self._student_piece(int(t)) for t in resp]
            positions, prefixes, prev_ext = [], [], []
            r = ""
            for j in range(len(resp)):
                positions.append(j)
                prefixes.append(r)
                prev_ext.append(j > 0 and self._s_extendable[int(resp[j - 1])])
                if pieces[j] is None:
                    break
                r += pieces[j]
            targets, need_de = set(), set(prefixes)
            for pre, pe in zip(prefixes, prev_ext):
                targets.add(pre)
                if not pe:
                    for _, s, ext in support:
                        targets.add(pre + s)
                        if ext:
                            need_de.add(pre + s)
            plan = self._plan_marginals(self.teacher.prompt_ids(msgs), targets, need_de, contexts)
            plans.append((plan, positions, prefixes, prev_ext))
        dists = self._next_logprobs(contexts)
        out = []
        for plan, positions, prefixes, prev_ext in plans:
            marg = self._marginals(plan, dists)
            logq = np.full((len(positions), V), np.nan)
            log_tail = np.zeros(len(positions))
            for row, (pre, pe) in enumerate(zip(prefixes, prev_ext)):
                lq, ld, le = marg[pre]
                log_e_prev = _log_sub(lq, ld) - lq if pe else 0.0
                base = lq + log_e_prev
                for k, s, ext in support:
                    if pe:
                        logq[row, k] = -np.inf
                    else:
                        uq, ud, _ = marg[pre + s]
                        logq[row, k] = (_log_sub(uq, ud) if ext else uq) - base
                logq[row, s_eot] = le - base
                log_tail[row] = _log_sub(lq, float(np.logaddexp(ld, le))) - base
            out.append({"positions": positions, "logq": logq, "log_tail": log_tail})
        return out
