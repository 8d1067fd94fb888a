"""An exact oracle for credit: a teacher whose whole distribution is a handful of responses.

The teacher puts probability ``P(w)`` on each designed response ``w`` and writes it in its own canonical
tokens (the teacher tokenizer's plain encode), then ends its turn. Its next-token distribution after any
prefix of one of those token sequences follows by counting, so both what an SGLang teacher would answer
(``score``: the observed tokens' log-probs and the top-k at every position) and the right value of every
student token (``oracle_values``: brute-force marginalisation over the responses in the *student's*
canonical tokens) are exact. Nothing here uses the plugin's alignment or credit code.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
from aiohttp import web
from loopback import LoopbackApp


def canonical_ids(tokenizer, text: str) -> list[int]:
    """The tokenizer's own encoding of ``text`` (no special tokens added)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def spells(table, ids, text: str) -> bool:
    return table.bytes_of(np.asarray(ids, dtype=np.int64)) == text.encode()


class CanonicalTeacher:
    """P over a few responses, each tokenized canonically by the teacher, then its end of turn."""

    def __init__(self, tokenizer, responses: dict[str, float], eot_id: int) -> None:
        total = sum(responses.values())
        self.responses = {text: p / total for text, p in responses.items()}
        self.eot_id = eot_id
        self.paths = [(tuple(canonical_ids(tokenizer, text)) + (eot_id,), p) for text, p in self.responses.items()]

    def next_distribution(self, prefix: tuple[int, ...]) -> dict[int, float]:
        mass: dict[int, float] = defaultdict(float)
        for ids, p in self.paths:
            if len(ids) > len(prefix) and ids[: len(prefix)] == prefix:
                mass[ids[len(prefix)]] += p
        total = sum(mass.values())
        return {tok: p / total for tok, p in mass.items()} if total else {}

    def score(self, response_ids, k: int | None = None) -> tuple[np.ndarray, list]:
        """What SGLang would return for these teacher response ids: log-probs and the top-k per position."""
        lps, top = [], []
        for i, tok in enumerate(response_ids):
            dist = self.next_distribution(tuple(response_ids[:i]))
            p = dist.get(int(tok), 0.0)
            lps.append(math.log(p) if p > 0 else -30.0)
            ranked = sorted(dist.items(), key=lambda kv: -kv[1])[:k]
            top.append((np.array([t for t, _ in ranked], dtype=np.int64), np.log([q for _, q in ranked])))
        return np.array(lps), top


def oracle_values(student_tokenizer, responses: dict[str, float], text: str, ends_turn: bool) -> np.ndarray:
    """The teacher's probability of each student token, by brute force over the responses.

    ``v_j = log P(S(w)[:j+1] == s[:j+1]) - log P(S(w)[:j] == s[:j])`` with ``S`` the student's canonical
    tokenization and ``s = S(text)``; the end of turn gets ``log P(w == text) - log P(S(w)[:n] == s)``.
    """
    total = sum(responses.values())
    probs = {w: p / total for w, p in responses.items()}
    tokenized = {w: tuple(canonical_ids(student_tokenizer, w)) for w in probs}
    s = tokenized[text] if text in tokenized else tuple(canonical_ids(student_tokenizer, text))

    def mass(j: int) -> float:
        return sum(p for w, p in probs.items() if tokenized[w][:j] == s[:j] and len(tokenized[w]) >= j)

    values = [math.log(mass(j + 1) / mass(j)) for j in range(len(s))]
    if ends_turn:
        values.append(math.log(probs.get(text, 0.0) / mass(len(s))))
    return np.array(values)


class OracleServer:
    """The canonical teacher behind SGLang's ``/generate`` scoring protocol, on loopback (a real HTTP server).

    Answers ``input_token_logprobs`` from ``logprob_start_len`` on (leading null, as SGLang does) and, when
    asked, ``input_top_logprobs``; the response starts at ``logprob_start_len + 1``.
    """

    def __init__(self, teacher: CanonicalTeacher) -> None:
        self.teacher = teacher
        self.requests = 0

    def __enter__(self) -> OracleServer:
        self._app = LoopbackApp(self._routes)
        self.url = self._app.url
        return self

    def __exit__(self, *exc) -> None:
        self._app.close()

    def _routes(self, app: web.Application) -> None:
        app.router.add_post("/generate", self._generate)
        app.router.add_get("/health_generate", self._health)
        app.router.add_get("/health", self._health)

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _generate(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests += 1
        ids, start = body["input_ids"], int(body["logprob_start_len"])
        k = int(body.get("top_logprobs_num") or 0)
        lps, top = self.teacher.score(ids[start + 1:], k or None)
        meta = {
            "prompt_tokens": len(ids),
            "input_token_logprobs": [[None, ids[start], None]]
            + [[float(lp), int(t), None] for lp, t in zip(lps, ids[start + 1:])],
        }
        if k:
            meta["input_top_logprobs"] = [None] + [
                [[float(lp), int(t), None] for t, lp in zip(t_ids, t_lps)] for t_ids, t_lps in top
            ]
        return web.json_response({"text": "", "output_ids": [], "meta_info": meta})


def oracle_next_distribution(student_tokenizer, responses: dict[str, float], text: str, j: int,
                             eot_id: int) -> dict[int, float]:
    """The teacher's distribution over the student's token ``j`` given the student's first ``j`` tokens of
    ``text``, by brute force: ``P(S(w)[j] = t | S(w)[:j] = s[:j])`` over the responses ``w`` in the student's
    canonical tokens ``S``; ``eot_id`` where ``w`` ends after exactly ``j`` tokens."""
    total = sum(responses.values())
    s = tuple(canonical_ids(student_tokenizer, text))
    mass: dict[int, float] = defaultdict(float)
    for w, p in responses.items():
        ids = tuple(canonical_ids(student_tokenizer, w))
        if ids[:j] == s[:j] and len(ids) >= j:
            mass[ids[j] if len(ids) > j else eot_id] += p / total
    z = sum(mass.values())
    return {t: p / z for t, p in mass.items()} if z else {}
