"""Reference teacher server: the scoring subset of SGLang's HTTP API, computed with transformers.

Production teachers run SGLang (``python -m sglang.launch_server``). This server exists so the plugin, its
tests and the CPU demo can score with a real model where SGLang cannot run (no GPU): it answers prefill-only
``/generate`` requests with exactly SGLang's response shape, error envelopes and status codes, and it can be
registered behind ``sglang-router``. Run it with::

    slime-xvocab serve-teacher --model /path/to/hf_model_dir --port 30000
    curl -s localhost:30000/generate -d '{"input_ids": [1, 5, 9, 17], "logprob_start_len": 0,
        "return_logprob": true, "sampling_params": {"max_new_tokens": 0}}'

What it speaks:

* ``POST /generate`` (and PUT): ``input_ids`` as a list (one sequence) or a list of lists (a batch), or
  ``text`` / a list of texts when the model dir has a tokenizer (tokenised with ``add_special_tokens=True``,
  like SGLang). ``logprob_start_len``, ``return_logprob``, ``top_logprobs_num``, ``sampling_params`` and
  ``rid`` may be per-item lists or broadcast scalars; so may ``input_logprob_temperature`` (sglang#36213:
  input log-probs are log softmax(logits / T), T > 0, default 1, the applied T echoed in ``meta_info``; with
  ``--no-input-logprob-temperature`` the option is ignored and nothing echoed, like SGLang before #36213).
  ``sampling_params.max_new_tokens`` must be 0: this server only scores. Answers carry
  ``input_token_logprobs`` as ``[logprob|null, id, null]`` triples with a leading null, like SGLang;
  ``input_top_logprobs`` when ``top_logprobs_num > 0``.
* ``GET /health``, ``/health_generate`` (runs a 2-token forward), ``/model_info`` and ``/get_model_info``,
  ``/server_info`` and ``/get_server_info`` (``context_length``, ``max_req_input_len``, ``tp_size``,
  ``dp_size``, ``model_path``, ``version``, and request counters), ``/v1/models``.
* Errors: 400 ``{"error": {"message": ...}}`` for validation failures (SGLang's messages where SGLang has
  one), 400 ``{"object": "error", ...}`` for a body that is not a JSON object, 401 for a missing or
  wrong API key.

Log-probs are ``logits.gather(next_id) - logsumexp(logits)`` in float32 (logits divided by T first when
T != 1), with the LM head applied only to the positions the batch needs (``logits_to_keep``). Batches are
right-padded with an attention mask and explicit position ids. Model calls run in one worker thread, one at
a time, off the event loop.

**Compact-vocabulary models.** A model trained on a subset of a real tokenizer's vocabulary can be served
with the real ids: put ``xvocab_vocab_map.json`` = ``{"real_ids": [r_0, ..., r_{K-1}]}`` in the model dir.
Model index ``k`` is real token ``r_k`` and model index ``K`` is an "other" slot. Incoming real ids are
mapped to model indices (unknown ids to ``K``) for the forward; the log-prob reported for a real id is that
of its model index (the "other" slot for unknown ids); echoed ids stay the real ids. Top-k lists only real
ids (the "other" slot is left out). An optional ``"vocab_size"`` key bounds the accepted real ids.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TeacherModel", "ScoreItem", "make_app", "cli_main", "start_teacher_server", "ServerHandle"]

logger = logging.getLogger(__name__)

VOCAB_MAP_FILE = "xvocab_vocab_map.json"
TEMPERATURE_KEY = "input_logprob_temperature"  # sglang#36213
_SAMPLING_DEFAULT_MAX_NEW = (
    None  # SGLang's default is 128 generated tokens; this server requires an explicit 0
)


def _version() -> str:
    from . import __version__

    return f"slime-xvocab-reference-{__version__}"


class RequestError(ValueError):
    """A request that fails validation; answered with ``status`` and SGLang's error envelope."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class ScoreItem:
    """One sequence to score. ``start`` is SGLang's ``logprob_start_len`` (already resolved, 0..len)."""

    ids: list[int]
    start: int
    top_k: int = 0
    return_logprob: bool = True
    rid: str = ""
    temperature: float = 1.0
    result: dict[str, Any] = field(default_factory=dict)


class TeacherModel:
    """A causal LM that scores token sequences (the model side of the server; no HTTP).

    Args:
        model_dir: a Hugging Face model directory (config.json + weights), optionally with a tokenizer and
            ``xvocab_vocab_map.json``.
        device: ``"cpu"`` or ``"cuda"`` (or ``"cuda:N"``).
        dtype: ``"float32"`` (default, exact), ``"bfloat16"``, or ``"float64"`` (batch-invariant: a sequence's
            answer does not depend on what it was batched with, at twice the CPU cost); log-softmax is always
            done in float32.
        context_length: longest accepted input; default ``max_position_embeddings`` from the config.
        max_batch_tokens: padded tokens per forward; larger batches are split.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        context_length: int | None = None,
        max_batch_tokens: int = 16384,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.model_dir = str(Path(model_dir).resolve())
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                       "float64": torch.float64}[dtype]
        self.dtype = dtype
        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch_dtype)
        self.model.to(self.device).eval()
        cfg = self.model.config
        self.model_vocab = int(self.model.get_output_embeddings().weight.shape[0])
        max_pos = getattr(cfg, "max_position_embeddings", None)
        self.context_length = int(context_length or max_pos or 4096)
        self.max_batch_tokens = max(int(max_batch_tokens), self.context_length)
        self.model_type = getattr(cfg, "model_type", "")
        self.architectures = list(getattr(cfg, "architectures", None) or [])
        self._lock = threading.Lock()
        self._supports_keep = True
        self.real_ids: np.ndarray | None = None
        self.vocab_size = self.model_vocab  # the ids accepted on the wire
        map_path = Path(self.model_dir) / VOCAB_MAP_FILE
        if map_path.exists():
            self._load_vocab_map(map_path)
        self._tokenizer: Any = None
        self._tokenizer_loaded = False

    def _load_vocab_map(self, path: Path) -> None:
        data = json.loads(path.read_text())
        real = np.asarray(data["real_ids"], dtype=np.int64)
        if real.ndim != 1 or real.size == 0 or (real < 0).any() or np.unique(real).size != real.size:
            raise ValueError(f"{path}: real_ids must be a non-empty list of distinct non-negative ints")
        if self.model_vocab < real.size + 1:
            raise ValueError(
                f"{path}: {real.size} real ids need a model vocabulary of at least {real.size + 1} "
                f"(one 'other' slot), the model has {self.model_vocab}"
            )
        self.real_ids = real
        self._order = np.argsort(real)
        self._sorted = real[self._order]
        self.other_index = int(real.size)
        self.vocab_size = int(data.get("vocab_size") or np.iinfo(np.int32).max)

    def to_model_ids(self, ids: Sequence[int]) -> np.ndarray:
        """Map wire (real) ids to model indices; identity without a vocab map, unknown -> 'other' slot."""
        arr = np.asarray(ids, dtype=np.int64)
        if self.real_ids is None:
            return arr
        pos = np.searchsorted(self._sorted, arr)
        pos_c = np.minimum(pos, self._sorted.size - 1)
        found = self._sorted[pos_c] == arr
        return np.where(found, self._order[pos_c], self.other_index)

    @property
    def tokenizer(self) -> Any:
        """The model dir's tokenizer, or None if it has none (loaded on first use)."""
        if not self._tokenizer_loaded:
            self._tokenizer_loaded = True
            try:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
            except Exception as e:  # noqa: BLE001 - any failure means "no tokenizer here"
                logger.info("no tokenizer in %s (%s); only input_ids are accepted", self.model_dir, e)
                self._tokenizer = None
        return self._tokenizer

    def score(self, items: list[ScoreItem]) -> None:
        """Fill ``item.result`` with (logprobs, top) for every item; thread-safe (serialised)."""
        for it in items:
            it.result = {"lps": [], "top": ([], []) if it.top_k > 0 else None}
        with self._lock:
            # Only items with a token after their start need a forward (start <= len - 2).
            todo = [it for it in items if it.return_logprob and it.start <= len(it.ids) - 2]
            order = sorted(range(len(todo)), key=lambda i: len(todo[i].ids))
            chunk: list[ScoreItem] = []
            longest = 0
            for i in order:
                it = todo[i]
                longest_next = max(longest, len(it.ids))
                if chunk and longest_next * (len(chunk) + 1) > self.max_batch_tokens:
                    self._forward(chunk)
                    chunk, longest_next = [], len(it.ids)
                chunk.append(it)
                longest = longest_next
            if chunk:
                self._forward(chunk)

    def _forward(self, items: list[ScoreItem]) -> None:
        import torch

        lengths = [len(it.ids) for it in items]
        T = max(lengths)
        B = len(items)
        ids = np.zeros((B, T), dtype=np.int64)
        mask = np.zeros((B, T), dtype=np.int64)
        for b, it in enumerate(items):
            ids[b, : lengths[b]] = self.to_model_ids(it.ids)
            mask[b, : lengths[b]] = 1
        # Position j's logits predict token j+1. Item b needs rows start_b .. L_b-2, so the batch needs rows
        # min_start .. T-2; keep T - min_start rows (one spare at the end) instead of the whole sequence.
        first = min(it.start for it in items)
        keep = T - first
        input_ids = torch.from_numpy(ids).to(self.device)
        attn = torch.from_numpy(mask).to(self.device)
        pos = torch.arange(T, device=self.device).unsqueeze(0).expand(B, T)  # right padding: 0..L-1
        with torch.no_grad():
            logits = None
            if self._supports_keep:
                try:
                    logits = self.model(
                        input_ids=input_ids,
                        attention_mask=attn,
                        position_ids=pos,
                        use_cache=False,
                        logits_to_keep=keep,
                    ).logits
                except TypeError:
                    self._supports_keep = False
            if logits is None:
                logits = self.model(
                    input_ids=input_ids, attention_mask=attn, position_ids=pos, use_cache=False
                ).logits[:, first:, :]
            logits = logits.float()
            if logits.shape[1] != keep:  # a model that ignored logits_to_keep
                logits = logits[:, -keep:, :]
            temps = [it.temperature for it in items]
            if any(t != 1.0 for t in temps):  # T = 1 divides nothing: stock answers stay bit-identical
                logits = logits / torch.tensor(temps, dtype=logits.dtype, device=logits.device).view(B, 1, 1)
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            next_ids = torch.zeros((B, keep), dtype=torch.long, device=self.device)
            nxt = input_ids[:, first + 1 :]
            next_ids[:, : nxt.shape[1]] = nxt
            lp_all = (logits.gather(-1, next_ids.unsqueeze(-1)) - lse).squeeze(-1).cpu().numpy()
            k_max = max(it.top_k for it in items)
            top_vals = top_idx = None
            if k_max > 0:
                norm = logits - lse
                if self.real_ids is not None:
                    norm[..., self.other_index :] = float("-inf")  # top-k over real tokens only
                    k_max = min(k_max, self.other_index)
                k_max = min(k_max, norm.shape[-1])
                tv, ti = torch.topk(norm, k_max, dim=-1)
                top_vals, top_idx = tv.cpu().numpy(), ti.cpu().numpy()
        for b, it in enumerate(items):
            L = lengths[b]
            # tokens start+1 .. L-1 <- logits rows start .. L-2 <- kept rows start-first .. L-2-first
            lo, hi = it.start - first, L - 1 - first
            lps = lp_all[b, lo:hi].astype(np.float64).tolist() if hi > lo else []
            top = None
            if it.top_k > 0 and top_vals is not None:
                k = min(it.top_k, top_vals.shape[-1])
                vals = top_vals[b, lo:hi, :k].astype(np.float64)
                idx = top_idx[b, lo:hi, :k]
                if self.real_ids is not None:
                    idx = self.real_ids[idx]
                top = (vals.tolist(), idx.tolist())
            it.result = {"lps": lps, "top": top}


# ---------------------------------------------------------------------- HTTP layer


def _error(message: str, status: int = 400) -> Any:
    from aiohttp import web

    return web.json_response({"error": {"message": message}}, status=status)


def _pydantic_style_error(message: str) -> Any:
    from aiohttp import web

    body = {"object": "error", "message": message, "type": "Bad Request", "param": None, "code": 400}
    return web.json_response(body, status=400)


def _per_item(value: Any, n: int, name: str, batch: bool, is_scalar: Any) -> list[Any]:
    """Broadcast a scalar/dict field or check a per-item list (SGLang's batch normalisation)."""
    if batch and isinstance(value, list) and not is_scalar(value):
        if len(value) != n:
            raise RequestError(f"{name} has {len(value)} entries but the batch has {n} inputs.")
        return list(value)
    return [value] * n


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_generate_request(
    body: Any, tm: TeacherModel, *, input_logprob_temperature: bool = True
) -> tuple[list[ScoreItem], bool, bool]:
    """Validate a ``/generate`` body and build the items to score.

    ``input_logprob_temperature=False`` ignores that option, as SGLang without sglang#36213 does.

    Returns:
        ``(items, is_batch, return_prompt_token_ids)``.

    Raises:
        RequestError: with SGLang's message where SGLang has one.
    """
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object.", status=-1)
    has_ids, has_text = body.get("input_ids") is not None, body.get("text") is not None
    if has_ids == has_text:
        raise RequestError("Either text or input_ids should be provided (exactly one of them).")
    if has_text:
        text = body["text"]
        batch = isinstance(text, list)
        texts = text if batch else [text]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise RequestError("text must be a string or a non-empty list of strings.")
        tok = tm.tokenizer
        if tok is None:
            raise RequestError(
                "This teacher server has no tokenizer (none in the model directory); "
                "send input_ids instead of text."
            )
        seqs = [list(tok(t, add_special_tokens=True)["input_ids"]) for t in texts]
    else:
        ids = body["input_ids"]
        if not isinstance(ids, list):
            raise RequestError("input_ids must be a list of token ids or a list of lists.", status=-1)
        batch = bool(ids) and isinstance(ids[0], list)
        seqs = ids if batch else [ids]
        if not seqs:
            raise RequestError("input_ids cannot be empty.")
        for i, s in enumerate(seqs):
            if not isinstance(s, list) or not all(_is_int(x) for x in s):
                raise RequestError(
                    f"input_ids[{i}] must be a list of integers."
                    if batch
                    else "input_ids must be a list of integers.",
                    status=-1,
                )
    n = len(seqs)
    for i, s in enumerate(seqs):
        where = f" (batch item {i})" if batch else ""
        if not s:
            raise RequestError(f"input_ids cannot be empty{where}.")
        if len(s) > tm.context_length:
            raise RequestError(
                f"The input ({len(s)} tokens) is longer than the model's context length "
                f"({tm.context_length} tokens)."
            )
        lo, hi = min(s), max(s)
        if lo < 0 or hi >= tm.vocab_size:
            bad = lo if lo < 0 else hi
            raise RequestError(
                f"Token id {bad} in input_ids{where} is out of range for the model's vocabulary size "
                f"{tm.vocab_size}."
            )
    sps = _per_item(body.get("sampling_params") or {}, n, "sampling_params", batch, lambda v: False)
    for i, sp in enumerate(sps):
        sp = sp or {}
        if not isinstance(sp, dict):
            raise RequestError("sampling_params must be an object or a list of objects.", status=-1)
        mnt = sp.get("max_new_tokens", _SAMPLING_DEFAULT_MAX_NEW)
        if mnt is None:
            mnt = "nothing (SGLang's default generates 128 tokens)"
        if mnt != 0:
            raise RequestError(
                f"This reference teacher server only scores (prefill-only): sampling_params.max_new_tokens "
                f"must be 0, got {mnt}{f' (batch item {i})' if batch else ''}. Use SGLang to generate."
            )
    rls = _per_item(body.get("return_logprob", False), n, "return_logprob", batch, lambda v: False)
    starts = _per_item(body.get("logprob_start_len", -1), n, "logprob_start_len", batch, lambda v: False)
    tops = _per_item(body.get("top_logprobs_num", 0) or 0, n, "top_logprobs_num", batch, lambda v: False)
    temps = [1.0] * n
    if input_logprob_temperature and body.get(TEMPERATURE_KEY) is not None:
        temps = _per_item(body[TEMPERATURE_KEY], n, TEMPERATURE_KEY, batch, lambda v: False)
        for t in temps:
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
                raise RequestError(f"{TEMPERATURE_KEY} must be a positive finite number, got {t!r}.")
    if body.get("token_ids_logprob") is not None:
        raise RequestError(
            "token_ids_logprob is not supported by this reference server; use top_logprobs_num."
        )
    rid = body.get("rid")
    if rid is None:
        rids = [uuid.uuid4().hex for _ in range(n)]
    elif isinstance(rid, list):
        if len(rid) != n:
            raise RequestError(f"rid has {len(rid)} entries but the batch has {n} inputs.")
        rids = [str(r) for r in rid]
    else:
        rids = [f"{rid}_{i}" for i in range(n)] if batch else [str(rid)]
    if len(set(rids)) != len(rids):
        raise RequestError("Duplicate request ids (rid) in one batch.")
    items = []
    for s, rl, st, k, r, temp in zip(seqs, rls, starts, tops, rids, temps, strict=True):
        if not _is_int(st) or not _is_int(k) or not isinstance(rl, bool):
            raise RequestError(
                "logprob_start_len and top_logprobs_num must be integers and return_logprob a boolean.",
                status=-1,
            )
        if st == -1:
            st = len(s)  # SGLang: -1 means "output tokens only", i.e. no input log-probs
        if st < 0:
            raise RequestError(f"logprob_start_len={st} must be >= -1.")
        if st > len(s):
            raise RequestError(
                f"req.logprob_start_len={st} is higher than the number of input tokens "
                f"len(req.origin_input_ids)={len(s)}. Please use a smaller logprob_start_len."
            )
        if k < 0:
            raise RequestError(f"top_logprobs_num={k} must be >= 0.")
        items.append(
            ScoreItem(
                ids=[int(x) for x in s], start=st, top_k=k if rl else 0, return_logprob=rl, rid=r,
                temperature=float(temp),
            )
        )
    return items, batch, bool(body.get("return_prompt_token_ids", False))


def build_answer(
    it: ScoreItem, latency: float, return_prompt_token_ids: bool, *, echo_temperature: bool = True
) -> dict[str, Any]:
    """One item's response object, shaped like SGLang's prefill-only ``/generate`` answer (with sglang#36213's
    ``input_logprob_temperature`` echo unless ``echo_temperature`` is False)."""
    meta: dict[str, Any] = {
        "id": it.rid,
        "finish_reason": {"type": "length", "length": 0},
        "prompt_tokens": len(it.ids),
        "weight_version": "default",
    }
    if it.return_logprob:
        sub = it.ids[it.start :]
        lps = it.result["lps"]
        meta["input_token_logprobs"] = (
            [[None, sub[0], None]] + [[lp, t, None] for lp, t in zip(lps, sub[1:], strict=True)]
            if sub
            else []
        )
        meta["output_token_logprobs"] = []
        if it.top_k > 0:
            vals, idx = it.result["top"]
            meta["input_top_logprobs"] = (
                [None]
                + [
                    [[v, i, None] for v, i in zip(vr, ir, strict=True)]
                    for vr, ir in zip(vals, idx, strict=True)
                ]
                if sub
                else []
            )
            meta["output_top_logprobs"] = []
    meta.update(completion_tokens=0, cached_tokens=0, e2e_latency=latency)
    if echo_temperature:
        meta[TEMPERATURE_KEY] = it.temperature
    out: dict[str, Any] = {"text": "", "output_ids": [], "meta_info": meta}
    if return_prompt_token_ids:
        out["prompt_token_ids"] = it.ids
    return out


def make_app(
    tm: TeacherModel,
    *,
    api_key: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    input_logprob_temperature: bool = True,
) -> Any:
    """Build the aiohttp application serving ``tm``.

    Args:
        tm: the loaded model.
        api_key: if set, every route except ``/health*`` needs ``Authorization: Bearer <api_key>``.
        host, port: reported in ``/server_info``.
        input_logprob_temperature: honour and echo sglang#36213's option (False: ignore it, like older SGLang).
    """
    from aiohttp import web

    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-model")
    counters = {
        "num_generate_requests": 0,
        "num_scored_sequences": 0,
        "num_scored_tokens": 0,
        "num_errors": 0,
        "num_model_calls": 0,  # scoring calls into the model; concurrent requests share one
    }
    open_paths = {"/health", "/health_generate"}
    # Requests that arrive while the model is busy are scored together in its next forward, as SGLang batches
    # concurrent requests (slime's reward hooks send one request per sample).
    waiting: list[tuple[list[ScoreItem], asyncio.Future]] = []
    draining: list[asyncio.Task] = []

    async def drain() -> None:
        loop = asyncio.get_running_loop()
        while waiting:
            batch = waiting[:]
            waiting.clear()
            counters["num_model_calls"] += 1
            try:
                await loop.run_in_executor(executor, tm.score, [it for items, _ in batch for it in items])
            except Exception as e:  # noqa: BLE001 - every request of the failed forward gets the error
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
            else:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_result(None)
        draining.clear()

    async def score_together(items: list[ScoreItem]) -> None:
        fut = asyncio.get_running_loop().create_future()
        waiting.append((items, fut))
        if not draining:
            draining.append(asyncio.ensure_future(drain()))
        await fut

    @web.middleware
    async def auth(request: web.Request, handler: Any) -> web.StreamResponse:
        if api_key and request.path not in open_paths:
            if request.headers.get("Authorization", "") != f"Bearer {api_key}":
                return _error("Unauthorized: missing or wrong API key (Authorization: Bearer <key>).", 401)
        return await handler(request)

    async def generate(request: web.Request) -> web.StreamResponse:
        t0 = time.perf_counter()
        counters["num_generate_requests"] += 1
        try:
            body = await request.json(loads=json.loads)
        except ValueError as e:
            counters["num_errors"] += 1
            return _pydantic_style_error(f"The request body is not valid JSON: {e}")
        try:
            items, batch, rpti = parse_generate_request(
                body, tm, input_logprob_temperature=input_logprob_temperature
            )
        except RequestError as e:
            counters["num_errors"] += 1
            return _pydantic_style_error(str(e)) if e.status == -1 else _error(str(e), e.status)
        try:
            await score_together(items)
        except Exception as e:  # noqa: BLE001 - report model failures as SGLang does (500, object envelope)
            logger.exception("scoring failed")
            counters["num_errors"] += 1
            body = {
                "object": "error",
                "message": f"{type(e).__name__}: {e}",
                "type": "500",
                "param": None,
                "code": 500,
            }
            return web.json_response(body, status=500)
        latency = time.perf_counter() - t0
        answers = [build_answer(it, latency, rpti, echo_temperature=input_logprob_temperature) for it in items]
        counters["num_scored_sequences"] += len(items)
        counters["num_scored_tokens"] += sum(len(it.ids) for it in items)
        return web.json_response(answers if batch else answers[0])

    async def health(request: web.Request) -> web.StreamResponse:
        return web.Response(status=200, text="")

    async def health_generate(request: web.Request) -> web.StreamResponse:
        probe = [ScoreItem(ids=[0, 0] if tm.real_ids is None else [int(tm.real_ids[0])] * 2, start=0)]
        try:
            await asyncio.wait_for(
                asyncio.get_running_loop().run_in_executor(executor, tm.score, probe), 20.0
            )
        except Exception as e:  # noqa: BLE001
            return web.Response(status=503, text=f"health check forward failed: {e}")
        return web.Response(status=200, text="")

    def model_info_dict() -> dict[str, Any]:
        return {
            "model_path": tm.model_dir,
            "tokenizer_path": tm.model_dir,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": tm.model_type,
            "architectures": tm.architectures,
            "served_model_name": tm.model_dir,
        }

    async def model_info(request: web.Request) -> web.StreamResponse:
        return web.json_response(model_info_dict())

    async def server_info(request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {
                "model_path": tm.model_dir,
                "tokenizer_path": tm.model_dir,
                "served_model_name": tm.model_dir,
                "host": host,
                "port": port,
                "context_length": tm.context_length,
                "max_req_input_len": tm.context_length,
                "max_total_num_tokens": tm.max_batch_tokens,
                "tp_size": 1,
                "dp_size": 1,
                "device": str(tm.device),
                "dtype": tm.dtype,
                "skip_tokenizer_init": False,
                "allow_auto_truncate": False,
                "vocab_size": tm.vocab_size if tm.real_ids is None else None,
                "xvocab_vocab_map": tm.real_ids is not None,
                "internal_states": [dict(counters)],
                **counters,
                "version": _version(),
            }
        )

    async def v1_models(request: web.Request) -> web.StreamResponse:
        card = {
            "id": tm.model_dir,
            "object": "model",
            "created": 0,
            "owned_by": "slime-xvocab",
            "root": tm.model_dir,
            "max_model_len": tm.context_length,
            "parent": None,
        }
        return web.json_response({"object": "list", "data": [card]})

    app = web.Application(middlewares=[auth], client_max_size=256 * 1024 * 1024)
    app.router.add_post("/generate", generate)
    app.router.add_put("/generate", generate)
    app.router.add_get("/health", health)
    app.router.add_get("/health_generate", health_generate)
    for path in ("/model_info", "/get_model_info"):
        app.router.add_get(path, model_info)
    for path in ("/server_info", "/get_server_info"):
        app.router.add_get(path, server_info)
    app.router.add_get("/v1/models", v1_models)
    app["counters"] = counters

    async def _shutdown(app: web.Application) -> None:
        executor.shutdown(wait=False, cancel_futures=True)

    app.on_cleanup.append(_shutdown)
    return app


# ---------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="slime-xvocab serve-teacher",
        description="Serve a Hugging Face causal LM's per-token log-probs with SGLang's /generate protocol "
        "(scoring only). For tests, demos and CPU boxes; production teachers run SGLang.",
    )
    p.add_argument(
        "--model", "--model-path", dest="model", required=True, help="Hugging Face model directory"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"],
                   help="float64: a sequence's answer does not depend on what it was batched with (reproducible runs)")
    p.add_argument("--context-length", type=int, default=None, help="longest input (default: from config)")
    p.add_argument("--max-batch-tokens", type=int, default=16384, help="padded tokens per forward pass")
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer <key>")
    p.add_argument("--num-threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument(
        "--no-input-logprob-temperature",
        dest="input_logprob_temperature",
        action="store_false",
        help="ignore input_logprob_temperature and echo nothing, like SGLang without sglang#36213",
    )
    p.add_argument("--log-level", default="info")
    return p


def cli_main(argv: list[str]) -> int:
    """Entry point of ``slime-xvocab serve-teacher``; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from aiohttp import web

    if args.num_threads:
        import torch

        torch.set_num_threads(args.num_threads)
    problem = _model_dir_problem(args.model)
    if problem is not None:
        print(f"slime-xvocab serve-teacher: {problem}", file=sys.stderr)
        return 2
    try:
        tm = TeacherModel(
            args.model,
            device=args.device,
            dtype=args.dtype,
            context_length=args.context_length,
            max_batch_tokens=args.max_batch_tokens,
        )
    except (OSError, ValueError, RuntimeError) as e:  # unreadable weights, unknown architecture, bad device
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"slime-xvocab serve-teacher: cannot load the model from {args.model!r}: {type(e).__name__}: {first}",
              file=sys.stderr)
        return 1
    app = make_app(
        tm, api_key=args.api_key, host=args.host, port=args.port,
        input_logprob_temperature=args.input_logprob_temperature,
    )
    logger.info(
        "teacher %s on %s (%s), context %d, vocab map %s: listening on http://%s:%d",
        tm.model_dir,
        tm.device,
        tm.dtype,
        tm.context_length,
        tm.real_ids is not None,
        args.host,
        args.port,
    )
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None, handle_signals=True)
    return 0


def _model_dir_problem(model: str) -> str | None:
    """What is wrong with ``--model`` before anything is imported (None: a directory with a config.json)."""
    path = Path(model).expanduser()
    if not path.exists():
        return (
            f"--model {model!r}: no such directory. Give a local Hugging Face model directory (config.json + "
            "weights), e.g. one downloaded with `huggingface-cli download <org/name> --local-dir DIR`"
        )
    if not path.is_dir():
        return f"--model {model!r} is a file; give the model directory that holds it"
    if not (path / "config.json").is_file():
        return f"--model {model!r} has no config.json: it is not a Hugging Face model directory"
    return None


# ---------------------------------------------------------------------- subprocess helper


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerHandle:
    """A reference teacher server running as a subprocess; see :func:`start_teacher_server`.

    Attributes:
        url: ``http://127.0.0.1:<port>`` (base URL, no ``/generate``).
        port: the TCP port.
        process: the ``subprocess.Popen``.
        log_path: file holding the server's stdout and stderr.
    """

    def __init__(self, process: subprocess.Popen, port: int, log_path: Path) -> None:
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path

    def log_tail(self, n: int = 40) -> str:
        """The last ``n`` lines the server printed."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the server at once (simulates a crash)."""
        if self.alive():
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after ``timeout_s``); idempotent."""
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_teacher_server(
    model_dir: str | os.PathLike,
    port: int = 0,
    *,
    extra_args: Sequence[str] = (),
    api_key: str | None = None,
    num_threads: int | None = 1,
    startup_timeout_s: float = 180.0,
    env: dict[str, str] | None = None,
) -> ServerHandle:
    """Start ``python -m slime_xvocab.teacher_server`` on 127.0.0.1 and wait until it answers.

    Args:
        model_dir: the model directory.
        port: TCP port; 0 picks a free one.
        extra_args: more CLI flags (e.g. ``["--context-length", "64"]``).
        api_key: passed as ``--api-key``.
        num_threads: torch threads in the server (1 keeps several servers from fighting over cores).
        startup_timeout_s: how long to wait for ``/health_generate`` to return 200.
        env: extra environment variables for the subprocess.

    Returns:
        A running ServerHandle (use it as a context manager to stop it).

    Raises:
        RuntimeError: the server exited or did not become healthy in time (the message has its log tail).
    """
    import httpx

    port = port or free_port()
    log_file = tempfile.NamedTemporaryFile(prefix=f"teacher-{port}-", suffix=".log", delete=False)
    cmd = [
        sys.executable,
        "-m",
        "slime_xvocab.teacher_server",
        "--model",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *extra_args,
    ]
    if api_key:
        cmd += ["--api-key", api_key]
    if num_threads:
        cmd += ["--num-threads", str(num_threads)]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    root = str(Path(__file__).resolve().parent.parent)  # so `-m slime_xvocab...` works from any cwd
    full_env["PYTHONPATH"] = root + os.pathsep + full_env.get("PYTHONPATH", "")
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=full_env)
    log_file.close()
    handle = ServerHandle(proc, port, Path(log_file.name))
    deadline = time.monotonic() + startup_timeout_s
    with httpx.Client(timeout=5.0, trust_env=False) as http:
        while time.monotonic() < deadline:
            if not handle.alive():
                raise RuntimeError(
                    f"teacher server on port {port} exited with code {proc.returncode}:\n{handle.log_tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if http.get(handle.url + "/health_generate").status_code == 200:
                    return handle
            time.sleep(0.2)
    handle.stop()
    raise RuntimeError(
        f"teacher server on port {port} not healthy after {startup_timeout_s}s:\n{handle.log_tail()}"
    )


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
