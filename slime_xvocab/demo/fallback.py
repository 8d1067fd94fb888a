"""Built-in stand-in for the plugin's hooks, and the teacher transport the demo's metrics use.

The hooks here keep slime's contract (``async reward_func(args, sample)``, ``post_process_rewards(args,
samples) -> (raw, rewards)``, ``sample.teacher_log_probs`` = one float32 per response token) so that
:mod:`slime_xvocab.demo.scoring` can switch to ``slime_xvocab.hooks`` without touching the loop. They
implement the same idea in a compact form:

1. teacher view: the raw messages rendered with the teacher's chat template, then the student's response
   *text* re-tokenized by the teacher, then the teacher's end-of-turn if the student ended its turn;
2. prefill-only scoring on an SGLang-style ``/generate`` endpoint (or an in-process scorer);
3. byte alignment: cut both tokenizations where both end a token (same byte offset). In ``chunk`` mode a
   chunk of ``n`` student tokens gets ``rollout_lp_j + (T - S) / n`` (T, S = teacher / student log-prob sums
   of the chunk), so the chunk's total student-minus-teacher gap equals the true sequence-level gap. In
   ``exact`` mode only 1:1 chunks are scored and the rest get ``rollout_lp_j`` (zero OPD signal). The
   end of turn is its own chunk, unless ``args.demo_merge_eot`` (``--merge-eot``) makes it share the last
   chunk's gap: the token that closes a chunk also decides which teacher token the chunk is.
"""

from __future__ import annotations

import asyncio
import functools
from argparse import Namespace
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# In-process teachers, addressed as "inproc://<name>" (used by tests and before the HTTP server exists).
INPROC_TEACHERS: dict[str, Callable[[list[int]], list[float | None]]] = {}


@functools.lru_cache(maxsize=8)
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_byte_lengths(tok: Any, ids: Sequence[int]) -> list[int]:
    """UTF-8 byte length of each token (byte-level BPE pieces; other pieces via their decoded text)."""
    dec = _byte_decoder()
    out = []
    for piece, i in zip(tok.convert_ids_to_tokens(list(ids)), ids):
        if piece is not None and all(ch in dec for ch in piece):
            out.append(len(piece))
        else:
            out.append(len(tok.decode([i]).encode("utf-8")))
    return out


async def score_ids(url: str, ids: list[int], n_last: int, client: Any = None, timeout: float = 60.0) -> list[float]:
    """Teacher log-probs of the last ``n_last`` tokens of ``ids`` (SGLang ``/generate``, prefill only).

    Args:
        url: ``http://host:port/generate`` or ``inproc://<name>`` (see :data:`INPROC_TEACHERS`).
        ids: the full teacher input (prompt + response ids).
        n_last: how many trailing positions to return.
        client: an ``httpx.AsyncClient`` to reuse (one is opened per call otherwise).
    """
    if n_last == 0:
        return []
    if url.startswith("inproc://"):
        lps = INPROC_TEACHERS[url](ids)
        return [float(x) for x in lps[-n_last:]]
    import httpx

    payload = {
        "input_ids": ids,
        "sampling_params": {"max_new_tokens": 0, "temperature": 1.0, "skip_special_tokens": False},
        "return_logprob": True,
        "logprob_start_len": max(0, len(ids) - n_last - 1),
    }
    if client is None:
        async with httpx.AsyncClient(timeout=timeout, trust_env=False) as own:
            resp = await own.post(url, json=payload)
    else:
        resp = await client.post(url, json=payload)
    resp.raise_for_status()
    lps = [e[0] for e in resp.json()["meta_info"]["input_token_logprobs"]]
    return [float(x) for x in lps[-n_last:]]


def score_many(url: str, items: Sequence[tuple[list[int], int]], loop: asyncio.AbstractEventLoop) -> list[list[float]]:
    """:func:`score_ids` for many ``(ids, n_last)`` items concurrently over one connection pool."""

    async def _all():
        import httpx

        async with httpx.AsyncClient(timeout=60.0, trust_env=False) as client:
            return await asyncio.gather(*(score_ids(url, ids, n, client) for ids, n in items))

    return loop.run_until_complete(_all())


def teacher_view(args: Namespace, sample: Any) -> tuple[list[int], int, bool]:
    """Teacher ids for a sample: (all ids, number of response ids, student ended its turn)."""
    stok = _tokenizer(args.hf_checkpoint)
    ttok = _tokenizer(args.xvocab_teacher_tokenizer)
    messages = sample.metadata[args.xvocab_messages_key]
    resp = list(sample.tokens[len(sample.tokens) - sample.response_length :])
    ended = bool(resp) and resp[-1] == args.demo_student_eot_id
    text = stok.decode(resp[:-1] if ended else resp, skip_special_tokens=False)
    prompt = ttok.encode(
        ttok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **(getattr(args, "xvocab_template_kwargs", {}) or {})
        ),
        add_special_tokens=False,
    )
    rids = ttok.encode(text, add_special_tokens=False) + ([args.demo_teacher_eot_id] if ended else [])
    return prompt + rids, len(rids), ended


async def reward_func(args: Namespace, sample: Any, **kwargs: Any) -> float:
    """slime custom RM: score the teacher view and stash it in ``sample.metadata["xvocab"]``."""
    ids, n, ended = teacher_view(args, sample)
    lps = await score_ids(args.rm_url, ids, n)
    sample.metadata["xvocab"] = {"teacher_ids": ids[len(ids) - n :], "teacher_lps": lps, "ended": ended}
    return 0.0


def align(
    s_lens: Sequence[int], t_lens: Sequence[int]
) -> list[tuple[range, range]]:
    """Chunks cut at byte offsets where both tokenizations end a token.

    Returns:
        ``[(student_positions, teacher_positions), ...]``; a trailing part with no common end is one chunk.
    """
    s_end, t_end = np.cumsum(s_lens), np.cumsum(t_lens)
    common = sorted(set(s_end.tolist()) & set(t_end.tolist()))
    chunks, si, ti = [], 0, 0
    for c in common:
        sj, tj = int(np.searchsorted(s_end, c)) + 1, int(np.searchsorted(t_end, c)) + 1
        chunks.append((range(si, sj), range(ti, tj)))
        si, ti = sj, tj
    if si < len(s_lens) or ti < len(t_lens):
        chunks.append((range(si, len(s_lens)), range(ti, len(t_lens))))
    return chunks


def post_process_rewards(args: Namespace, samples: Sequence[Any], **kwargs: Any) -> tuple[list, list]:
    """slime post-process: align the stashed teacher log-probs onto student positions."""
    stok = _tokenizer(args.hf_checkpoint)
    ttok = _tokenizer(args.xvocab_teacher_tokenizer)
    for s in samples:
        x = s.metadata["xvocab"]
        rollout = np.asarray(s.rollout_log_probs, dtype=np.float64)
        out = rollout.copy()
        resp = list(s.tokens[len(s.tokens) - s.response_length :])
        n_s = len(resp) - int(x["ended"])
        n_t = len(x["teacher_ids"]) - int(x["ended"])
        t_lps = np.asarray(x["teacher_lps"], dtype=np.float64)
        covered = 0
        chunks = align(token_byte_lengths(stok, resp[:n_s]), token_byte_lengths(ttok, x["teacher_ids"][:n_t]))
        merge_eot = x["ended"] and getattr(args, "demo_merge_eot", False) and args.xvocab_credit_mode == "chunk"
        if x["ended"]:
            if merge_eot and chunks:  # the end of turn decides the last chunk's teacher token: share its gap
                sr, tr = chunks[-1]
                chunks[-1] = (range(sr.start, n_s + 1), range(tr.start, n_t + 1))
            else:
                chunks.append((range(n_s, n_s + 1), range(n_t, n_t + 1)))
        for sr, tr in chunks:
            if not len(sr) or not len(tr):
                continue
            if args.xvocab_credit_mode == "exact" and (len(sr) != 1 or len(tr) != 1):
                continue
            gap = t_lps[list(tr)].sum() - rollout[list(sr)].sum()
            out[list(sr)] = rollout[list(sr)] + gap / len(sr)
            covered += len(sr)
        s.teacher_log_probs = out.astype(np.float32)
        s.metadata["xvocab"]["coverage"] = covered / max(1, s.response_length)
    zeros = [0.0] * len(samples)
    return zeros, list(zeros)
