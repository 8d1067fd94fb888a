"""slime hooks: cross-vocabulary teacher log-probs for slime's on-policy distillation (OPD).

Drop-in replacements for slime's ``slime.rollout.on_policy_distillation`` hooks, plus two small ones::

    --custom-rm-path                    slime_xvocab.hooks.reward_func
    --custom-reward-post-process-path   slime_xvocab.hooks.post_process_rewards
    --rollout-sample-hook-path          slime_xvocab.hooks.mark_evaluation
    --custom-rollout-log-function-path  slime_xvocab.hooks.log_rollout_data
    --use-opd --opd-type sglang --opd-kl-coef 1.0 --rollout-temperature 1
    --custom-config-path xvocab.yaml    # xvocab_* keys, see docs/configuration.md

Signatures (the ones slime calls; pinned by tests/test_hooks.py):

* ``async reward_func(args, sample, **kwargs) -> float``: on slime's rollout event loop, once per sample
  (a list of samples with ``--group-rm``). It builds the teacher's view of the sample (the raw messages in
  ``sample.metadata[xvocab_messages_key]`` rendered with the teacher's chat template, then the student's
  response bytes in teacher tokens), scores it on the teacher server (log-probs and top-k), aligns the two
  tokenizations and values each student token with the teacher's probability of that token
  (:mod:`slime_xvocab.credit`), and sets ``sample.teacher_log_probs`` (float32, ``response_length`` values).
  The teacher requests run on an event loop of the plugin's own, and tokenisation, alignment, credit and the
  decoding of the teacher's answers on one worker thread: slime's loop hands the sample over, takes it back
  and writes the results to it (``benchmarks/README.md`` measures its longest stall). It returns the task
  reward of ``xvocab_inner_rm_type`` / ``xvocab_inner_rm_path``, or 0.0 for pure distillation. Evaluation
  samples are never sent to the teacher: they get the task reward only.
* ``post_process_rewards(args, samples) -> (raw_rewards, rewards)``: once per rollout, on the
  flat list. Fills ``teacher_log_probs`` of any sample that has none (fallback), enforces
  ``xvocab_max_failed_fraction`` and normalises task rewards per group exactly like slime's default.
* ``mark_evaluation(args, sample, *, rollout_id=None, evaluation=False) -> None``: a sample hook, the only
  hook slime tells whether a sample is an evaluation sample; records it in ``sample.metadata["xvocab"]``.
* ``log_rollout_data(rollout_id, args, samples, rollout_extra_metrics, rollout_time) -> bool``: logs
  ``rollout/xvocab/*`` through slime's logger and returns False, so slime's default logging still runs.

Positions that get no teacher signal keep the student's rollout log-prob exactly, so their OPD delta
``student_lp - teacher_lp`` is zero when slime's advantage uses the rollout log-probs
(``--use-rollout-logprobs``); by default slime uses Megatron's recomputed log-probs and the delta there is
the train/inference mismatch (``xvocab_unscored: mask`` takes those positions out of the loss; see
docs/how-it-fits.md). When student and teacher share a tokenizer, the request is slime's own
(``sample.tokens`` as they are) and ``teacher_log_probs`` equals what slime's OPD hooks produce.

What a sample carries afterwards (plain Python values, so samples pickle across Ray actors)::

    sample.teacher_log_probs            torch.float32 [response_length] (a list if torch is missing)
    sample.metadata["xvocab"] = {"stats": {...}, "failed": bool, "error": str | None,
                                 "evaluation": bool, "rollout_id": int | None,
                                 "route": [teacher names], "teachers": {name: {...stats}}}
    sample.metadata["xvocab_dense"]     dense.DenseTargets, with xvocab_dense (docs/dense.md)

Several teachers (``xvocab_teachers``, docs/multi-teacher.md): each has its own view builder (its tokenizer,
template and context limit; the student tokenizer is shared) and its own client (concurrency, retries,
counters). A sample's route (``xvocab_teacher_route_key`` / ``xvocab_teacher_routes``) names one teacher or
several with weights; several are scored concurrently and mixed per token (:mod:`slime_xvocab.routing`). A
teacher that fails is charged to that teacher; the sample falls back only when every teacher of its route
failed. The single-teacher keys are the one teacher ``default``.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import contextvars
import copy
import functools
import importlib
import inspect
import logging
import os
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .alignment import Alignment, Unaligned
from .config import TeacherConfig, XVocabConfig
from .credit import CreditResult, assign_credit, student_extensions, student_token_credit
from .errors import ByteMismatchError, ConfigError, NonFiniteCreditError, SampleError, TeacherError, XVocabError
from .metrics import (
    compute_post_process_metrics,
    compute_rollout_metrics,
    compute_teacher_metrics,
    failure_reason,
    sample_stats,
)
from .routing import mix_log_probs, route_of
from .urls import redact_text, redact_url

__all__ = [
    "reward_func",
    "post_process_rewards",
    "mark_evaluation",
    "log_rollout_data",
    "normalize_group_rewards",
    "eval_rm_type",
    "slime_logging",
    "get_config",
    "teacher_view_builder",
    "reset",
    "META_KEY",
]

logger = logging.getLogger(__name__)

#: Key of ``sample.metadata`` under which the hooks keep their per-sample record.
META_KEY = "xvocab"
#: Estimators whose task rewards slime normalises per group (mean-subtracted; the first three also / std).
GROUP_ESTIMATORS = ("grpo", "gspo", "cispo", "reinforce_plus_plus_baseline")
STD_ESTIMATORS = ("grpo", "gspo", "cispo")
_LOG_FIRST_FAILURES = 5


# ---------------------------------------------------------------------------------------------- state
# One config / runtime per args object (slime hands every hook the same Namespace in a process; Ray
# actors each unpickle their own copy). argparse.Namespace defines __eq__, so it is unhashable: key by id
# and keep a weak reference to tell a recycled id from the same object.


@dataclass
class _Teacher:
    """One teacher of a runtime: its settings, view builder, HTTP client and per-teacher state."""

    spec: TeacherConfig
    builder: Any  # teacher_view.TeacherViewBuilder (student tokenizer shared by every teacher)
    client: Any  # teacher_client.TeacherClient: its own concurrency, retries and counters
    extensions: Any = None  # credit.StudentExtensions (student_token credit across tokenizers), shared
    temperature_checked: bool = False
    probe: Any = None  # (event loop, asyncio.Task) of its start-up probe, once per runtime
    dense: Any = None  # (dense.StudentProjection, credit.StudentExtensions) with xvocab_dense (cross-vocabulary)


@dataclass
class _Runtime:
    config: XVocabConfig
    teachers: dict[str, _Teacher]  # configured order; the first is the default teacher's when not routed
    inner_args: Any = None  # args copy for slime's rm_hub (custom_rm_path cleared, rm_type = inner type)
    failures_logged: int = 0

    @property
    def first(self) -> _Teacher:
        return next(iter(self.teachers.values()))

    @property
    def builder(self) -> Any:
        """The first teacher's view builder (the only one with the single-teacher keys)."""
        return self.first.builder

    @property
    def client(self) -> Any:
        """The first teacher's client (the only one with the single-teacher keys)."""
        return self.first.client


_LOCK = threading.Lock()
_CONFIGS: dict[int, tuple[Any, XVocabConfig]] = {}
_RUNTIMES: dict[int, tuple[Any, _Runtime]] = {}


def _ref(obj: Any) -> Any:
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: obj


def _cached(cache: dict[int, tuple[Any, Any]], args: Any) -> Any:
    hit = cache.get(id(args))
    if hit is not None and hit[0]() is args:
        return hit[1]
    return None


def get_config(args: Any) -> XVocabConfig:
    """The validated :class:`XVocabConfig` of ``args``, built once per args object.

    Raises:
        ConfigError: listing every problem of the configuration.
    """
    config = _cached(_CONFIGS, args)
    if config is None:
        with _LOCK:
            config = _cached(_CONFIGS, args)
            if config is None:
                config = XVocabConfig.from_args(args)
                logger.info("slime-xvocab config: %s", config.to_dict())
                _CONFIGS[id(args)] = (_ref(args), config)
    return config


def _runtime(args: Any) -> _Runtime:
    """Tokenizers, teacher-view builder and teacher client of ``args`` (built once; call off the loop)."""
    runtime = _cached(_RUNTIMES, args)
    if runtime is None:
        config = get_config(args)
        with _LOCK:
            runtime = _cached(_RUNTIMES, args)
            if runtime is None:
                runtime = _build_runtime(args, config)
                _RUNTIMES[id(args)] = (_ref(args), runtime)
    return runtime


def teacher_view_builder(args: Any, teacher: str | None = None) -> Any:
    """The :class:`~slime_xvocab.teacher_view.TeacherViewBuilder` the hooks use for ``args`` (built once per args
    object, tokenizers loaded once per process): for previews and evaluations that must see what the hooks see.

    Args:
        args: slime's args.
        teacher: a teacher name of ``xvocab_teachers``; default: the first teacher (``default`` with the
            single-teacher keys).

    Raises:
        ConfigError: the ``xvocab_*`` settings of ``args`` are invalid, a tokenizer does not load, or
            ``teacher`` is not a configured name.
    """
    runtime = _runtime(args)
    if teacher is None:
        return runtime.builder
    if teacher not in runtime.teachers:
        raise ConfigError(f"no teacher named {teacher!r} (teachers: {', '.join(runtime.teachers)})")
    return runtime.teachers[teacher].builder


class _PluginThreads:
    """The two threads the hooks' work runs on, made on first use and again in a forked child (a fork copies
    neither thread, so a child must not hand work to its parent's):

    * ``loop``: an event loop of the plugin's own, running every sample's teacher requests and retries.
      slime's rollout loop hands samples over, takes them back and writes the results to them.
    * ``pool``: one worker thread for the CPU work (teacher view, credit, decoding top-k answers), so the
      plugin's loop stays free to answer the network meanwhile.

    Why not slime's loop and asyncio's default pool: a loop that runs each sample's HTTP calls and answer
    handling does ~0.5 ms of Python per sample, and samples arrive in bursts; and every busy Python thread
    makes the loop wait up to the interpreter's switch interval (5 ms) for the GIL after each socket read or
    write. For the same reason the samples one iteration of slime's loop hands over (64 at once with
    ``--group-rm``) wake the plugin's loop once, not once each. ``benchmarks/README.md`` measures the longest
    stall of slime's loop.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._handing: dict[asyncio.AbstractEventLoop, list] = {}  # caller loop -> hand-overs of this iteration

    def _ensure(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                return
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="xvocab-io", daemon=True).start()
            self._loop = loop
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="xvocab-cpu")
            self._handing = {}
            if self._pid == -1:  # once per process image; a forked child inherits the registration
                atexit.register(self._close_clients)
            self._pid = os.getpid()

    def _close_clients(self) -> None:
        """At exit, close the teacher clients' connection pools on the loop they live on, which is still
        running then (daemon threads stop after the exit handlers), so aiohttp has no unclosed session to
        report."""
        loop = self._loop
        if loop is None or self._pid != os.getpid() or not loop.is_running():
            return
        clients = [t.client for _, runtime in list(_RUNTIMES.values()) for t in runtime.teachers.values()]
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(_close_all(clients), loop).result(timeout=5)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        self._ensure()
        assert self._loop is not None
        return self._loop

    @property
    def pool(self) -> concurrent.futures.ThreadPoolExecutor:
        self._ensure()
        assert self._pool is not None
        return self._pool

    def hand_over(self, coro: Any) -> concurrent.futures.Future:
        """Run ``coro`` on the plugin's loop (call from the caller's running loop); cancelling the returned
        future cancels the coroutine there."""
        caller = asyncio.get_running_loop()
        plugin_loop = self.loop
        done: concurrent.futures.Future = concurrent.futures.Future()
        batch = self._handing.get(caller)
        if batch is None:  # the first hand-over of this iteration: send them all when the iteration ends
            batch = self._handing[caller] = []
            caller.call_soon(self._send, caller, plugin_loop)
        batch.append((coro, done))
        return done

    def _send(self, caller: asyncio.AbstractEventLoop, plugin_loop: asyncio.AbstractEventLoop) -> None:
        plugin_loop.call_soon_threadsafe(self._start, plugin_loop, self._handing.pop(caller))

    @staticmethod
    def _start(plugin_loop: asyncio.AbstractEventLoop, batch: list) -> None:
        for coro, done in batch:
            if done.cancelled():
                coro.close()
                continue
            task = plugin_loop.create_task(coro)
            task.add_done_callback(functools.partial(_settle, done))
            done.add_done_callback(
                lambda f, task=task: f.cancelled() and plugin_loop.call_soon_threadsafe(task.cancel)
            )


async def _close_all(clients: list[Any]) -> None:
    await asyncio.gather(*(c.aclose() for c in clients), return_exceptions=True)


def _settle(done: concurrent.futures.Future, task: asyncio.Task) -> None:
    """Copy a finished task's outcome to the future its caller awaits (unless the caller gave up on it)."""
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        if task.cancelled():
            done.cancel()
        elif task.exception() is not None:
            done.set_exception(task.exception())
        else:
            done.set_result(task.result())


_THREADS = _PluginThreads()


class _CpuExecutor(concurrent.futures.Executor):
    """The plugin's CPU thread for a teacher client: looked up at each call, so a client built before a fork
    uses the child's thread, not the parent's (which the child does not have)."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        return _THREADS.pool.submit(fn, *args, **kwargs)


async def _on_plugin_loop(coro: Any) -> Any:
    """Await ``coro`` run on the plugin's own event loop (cancelling the caller cancels it there too)."""
    return await asyncio.wrap_future(_THREADS.hand_over(coro))


async def _on_cpu_thread(func: Any, *args: Any) -> Any:
    """``await asyncio.to_thread(func, *args)``, on the plugin's CPU worker thread."""
    call = functools.partial(contextvars.copy_context().run, func, *args)
    return await asyncio.get_running_loop().run_in_executor(_THREADS.pool, call)


def reset(args: Any = None) -> None:
    """Forget cached configs/runtimes (of ``args``, or all, then also slime's logger lookup): for tests and
    notebooks. The teacher clients of the forgotten runtimes close their connection pools (when called
    outside a running event loop), so nothing is left for the garbage collector to complain about."""
    with _LOCK:
        if args is None:
            dropped = [runtime for _, runtime in _RUNTIMES.values()]
            _CONFIGS.clear()
            _RUNTIMES.clear()
            _SLIME_LOGGING.clear()
        else:
            _CONFIGS.pop(id(args), None)
            entry = _RUNTIMES.pop(id(args), None)
            dropped = [entry[1]] if entry is not None else []
    try:
        asyncio.get_running_loop()
        return  # inside a loop: the caller closes its clients (aclose) if it cares
    except RuntimeError:
        pass
    for runtime in dropped:
        for teacher in runtime.teachers.values():
            asyncio.run(teacher.client.aclose())


_TOKENIZERS: dict[tuple[str, bool], Any] = {}


def _load_tokenizer(path: str, config: XVocabConfig, role: str, key: str = "xvocab_teacher_tokenizer") -> Any:
    """``AutoTokenizer.from_pretrained``, once per (path, trust_remote_code) in this process (the token
    byte tables are cached per tokenizer object, so reusing the object reuses them too). ``key`` names the
    setting in the error."""
    cache_key = (path, config.trust_remote_code)
    if cache_key not in _TOKENIZERS:
        _TOKENIZERS[cache_key] = _load_tokenizer_uncached(path, config, role, key)
    return _TOKENIZERS[cache_key]


def _load_tokenizer_uncached(path: str, config: XVocabConfig, role: str, key: str) -> Any:
    from transformers import AutoTokenizer

    if role == "student":
        key = "xvocab_student_tokenizer (default: --hf-checkpoint)"
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    except Exception as exc:  # transformers raises OSError, ValueError, ... depending on what is wrong
        raise ConfigError(
            f"could not load the {role} tokenizer from {path!r} ({key}): {type(exc).__name__}: {exc}. "
            "It must be a local Hugging Face directory (tokenizer.json / tokenizer_config.json) on the "
            "node running slime's rollout manager, or a hub id reachable from it."
        ) from exc


def _student_end_ids(tokenizer: Any, spec: str | None) -> list[int] | None:
    """Ids of ``xvocab_student_end_of_turn`` (comma-separated token strings), or None to discover them."""
    if not spec:
        return None
    ids = []
    for token in (t.strip() for t in spec.split(",")):
        token_id = tokenizer.convert_tokens_to_ids(token)
        unk = getattr(tokenizer, "unk_token_id", None)
        if not isinstance(token_id, int) or token_id < 0 or token_id == unk:
            raise ConfigError(
                f"xvocab_student_end_of_turn: {token!r} is not a token of the student tokenizer "
                f"{getattr(tokenizer, 'name_or_path', '')!r}; give the exact token text, e.g. <|im_end|>"
            )
        ids.append(token_id)
    return ids


def _build_runtime(args: Any, config: XVocabConfig) -> _Runtime:
    """Every teacher's view builder and client (the student tokenizer and its tables loaded once)."""
    student_tok = _load_tokenizer(config.student_tokenizer, config, "student")
    student_end = _student_end_ids(student_tok, config.student_end_of_turn)
    teachers: dict[str, _Teacher] = {}
    shared_extensions: list = []  # the student's extension table, built once for every cross-vocab teacher
    for spec in config.teachers:
        teachers[spec.name] = _build_teacher(config, spec, student_tok, student_end, shared_extensions)
    if config.dense:
        from .dense_transport import check_rollout_side

        check_rollout_side(args)
    inner_args = None
    if config.inner_rm_type:
        inner_args = copy.copy(args)
        inner_args.custom_rm_path = None
        inner_args.rm_type = config.inner_rm_type
    return _Runtime(config, teachers, inner_args)


def _build_teacher(
    config: XVocabConfig, spec: TeacherConfig, student_tok: Any, student_end: Any, shared_extensions: list
) -> _Teacher:
    from .teacher_client import TeacherClient
    from .teacher_view import TeacherViewBuilder

    key = "xvocab_teacher_tokenizer" if len(config.teachers) == 1 else f"xvocab_teachers[{spec.name!r}].tokenizer"
    teacher_tok = _load_tokenizer(spec.tokenizer, config, "teacher", key)
    student_token = config.credit_mode == "student_token"
    builder = TeacherViewBuilder(
        student_tok,
        teacher_tok,
        prompt_format=spec.prompt_format,
        template_kwargs=spec.template_kwargs,
        system_prompt=spec.system_prompt,
        end_of_turn=spec.end_of_turn,
        student_end_of_turn=student_end,
        max_teacher_tokens=spec.max_teacher_tokens,
        probe_next=student_token or config.dense,
    )
    student_token = student_token and not builder.same_tokenizer
    if student_token and not shared_extensions:
        shared_extensions.append(student_extensions(student_tok, builder.student_table))
    client = TeacherClient(
        list(spec.urls),
        api_key=spec.api_key,
        timeout_s=spec.timeout_s,
        max_retries=spec.max_retries,
        retry_budget_s=spec.retry_budget_s,
        ca_bundle=spec.ca_bundle,
        verify_tls=spec.verify_tls,
        max_concurrency=spec.max_concurrency,
        max_input_tokens=spec.max_teacher_tokens,
        top_logprobs=spec.top_k if student_token or config.dense else 0,
        temperature=1.0 if config.teacher_temperature is None else config.teacher_temperature,
        executor=_CpuExecutor(),
    )
    logger.info(
        "slime-xvocab ready: student %s, teacher %r %s (%s), teacher at %s",
        config.student_tokenizer,
        spec.name,
        spec.tokenizer,
        "same tokenizer: slime's request" if builder.same_tokenizer else "cross-vocabulary",
        ", ".join(redact_url(u) for u in client.urls),
    )
    dense = None
    if config.dense and not builder.same_tokenizer:
        from .dense import student_projection

        dense = (student_projection(student_tok, builder.student_table),
                 student_extensions(student_tok, builder.student_table))
    return _Teacher(spec, builder, client, shared_extensions[0] if student_token else None, dense=dense)


# ---------------------------------------------------------------------------------------------- helpers


def _sample_id(sample: Any) -> str:
    return f"(group_index={getattr(sample, 'group_index', None)}, index={getattr(sample, 'index', None)})"


def _meta(sample: Any) -> dict:
    md = getattr(sample, "metadata", None)
    entry = md.get(META_KEY) if isinstance(md, dict) else None
    return entry if isinstance(entry, dict) else {}


def _update_meta(sample: Any, **values: Any) -> None:
    """Merge into ``sample.metadata["xvocab"]``, copying both dicts (group siblings may share one)."""
    md = dict(sample.metadata) if isinstance(getattr(sample, "metadata", None), dict) else {}
    entry = dict(md.get(META_KEY) or {})
    entry.update(values)
    md[META_KEY] = entry
    sample.metadata = md


def _is_evaluation(sample: Any, kwargs: dict) -> bool:
    """Eval samples: told by ``evaluation=`` (future slime), by :func:`mark_evaluation`, or, failing both,
    by ``sample.custom_rm_path`` (slime sets it on eval samples only, from the eval dataset config)."""
    if "evaluation" in kwargs:
        return bool(kwargs["evaluation"])
    flag = _meta(sample).get("evaluation")
    if flag is not None:
        return bool(flag)
    return bool(getattr(sample, "custom_rm_path", None))


def _as_float_array(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().float().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _to_tensor(values: np.ndarray) -> Any:
    """float32 torch tensor like slime's own OPD hook stores; a list of floats when torch is missing."""
    values = np.asarray(values, dtype=np.float32)
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is always there under slime
        return values.tolist()
    return torch.from_numpy(values.copy())


def _student_log_probs(sample: Any, n: int, sid: str) -> np.ndarray:
    lps = getattr(sample, "rollout_log_probs", None)
    if lps is None:
        raise SampleError(
            f"sample {sid}: rollout_log_probs is None; slime-xvocab needs the student's log-prob of every "
            "response token (slime's default generate records them; a custom generate function must pass "
            "log_probs to sample.append_response_tokens)"
        )
    arr = _as_float_array(lps)
    if len(arr) != n:
        raise SampleError(
            f"sample {sid}: len(rollout_log_probs)={len(arr)} != response_length={n} (a Sample invariant)"
        )
    return arr


def _messages(sample: Any, config: XVocabConfig, sid: str) -> list:
    from .teacher_view import messages_from_metadata

    md = sample.metadata if isinstance(getattr(sample, "metadata", None), dict) else {}
    if config.messages_key not in md and isinstance(getattr(sample, "prompt", None), list):
        return sample.prompt  # slime keeps the message list as the prompt without --apply-chat-template
    return messages_from_metadata(md, config.messages_key, sample_id=sid)


@dataclass(frozen=True)
class _View:
    """What the hooks need of a teacher view (a TeacherView, or the same-tokenizer identity view)."""

    input_ids: list
    response_start: int
    alignment: Alignment
    eot_mapped: bool = False
    teacher_truncated_tokens: int = 0
    exact_bytes: bool = True
    source: Any = None  # the TeacherView (spans and bytes for the prefix split)


def _identity_view(sample: Any, n: int, max_tokens: int | None, end_ids: Any = ()) -> _View:
    """slime's own OPD request: ``sample.tokens`` as they are, each response token its own chunk."""
    ids = list(sample.tokens)
    start = len(ids) - n
    kept = n if max_tokens is None or len(ids) <= max_tokens else max(0, max_tokens - start)
    cut = n - kept
    ids = ids[: start + kept]
    student_chunk = np.full(n, -1, dtype=np.int64)
    student_chunk[:kept] = np.arange(kept)
    reason = np.zeros(n, dtype=np.int8)
    reason[kept:] = Unaligned.TEACHER_CONTEXT
    alignment = Alignment(student_chunk, np.arange(kept, dtype=np.int64), reason, kept)
    ends_turn = kept == n and n > 0 and int(sample.tokens[-1]) in end_ids
    return _View(ids, start, alignment, eot_mapped=ends_turn, teacher_truncated_tokens=cut)


def _build_view(config: XVocabConfig, teacher: _Teacher, sample: Any, n: int, sid: str) -> _View:
    """The sample as ``teacher`` reads it (its own tokenizer, chat template and context limit)."""
    if teacher.builder.same_tokenizer:
        return _identity_view(sample, n, teacher.spec.max_teacher_tokens, teacher.builder.student_end_ids)
    messages = _messages(sample, config, sid)
    md = sample.metadata if isinstance(getattr(sample, "metadata", None), dict) else {}
    response_ids = list(sample.tokens[len(sample.tokens) - n :])
    view = teacher.builder.build(messages, response_ids, tools=md.get(config.tools_key), sample_id=sid)
    return _View(
        list(view.input_ids),
        int(view.response_start),
        view.alignment,
        bool(view.eot_mapped),
        int(view.teacher_truncated_tokens),
        bool(view.exact_bytes),
        view,
    )


# ---------------------------------------------------------------------------------------------- reward


async def reward_func(args: Any, sample: Any, **kwargs: Any) -> Any:
    """slime ``--custom-rm-path`` hook: set ``sample.teacher_log_probs`` and return the task reward.

    Args:
        args: slime's args (``xvocab_*`` settings on it; see :class:`~slime_xvocab.config.XVocabConfig`).
        sample: a slime ``Sample`` after generation (``tokens``, ``response_length``,
            ``rollout_log_probs``, ``metadata``); with ``--group-rm`` slime passes a list of them.
        **kwargs: passed on to the inner reward function; ``evaluation=True`` marks an eval sample.

    Returns:
        The inner task reward (``xvocab_inner_rm_type`` / ``xvocab_inner_rm_path``; a dict reward is
        returned as is, for ``--reward-key``) or 0.0 for pure distillation; a list for a list input.

    Raises:
        ConfigError: invalid configuration (on the first call).
        TeacherError, SampleError: the sample could not be scored and ``xvocab_fallback`` is ``error``.
    """
    if isinstance(sample, list):  # --group-rm: slime calls the reward function once per group
        return list(await asyncio.gather(*(reward_func(args, s, **kwargs) for s in sample)))
    config = get_config(args)
    if _is_evaluation(sample, kwargs):
        _update_meta(sample, evaluation=True)
        runtime = _cached(_RUNTIMES, args)
        return await _inner_reward(args, sample, config, runtime, kwargs, evaluation=True)
    runtime = _cached(_RUNTIMES, args) or await asyncio.to_thread(_runtime, args)
    write_scores, reward = await asyncio.gather(
        _on_plugin_loop(_probe_then_score(runtime, sample)), _inner_reward(args, sample, config, runtime, kwargs)
    )
    write_scores()  # here, on slime's loop: the inner reward (user code) may have written to the sample too
    return reward


async def _probe_then_score(runtime: _Runtime, sample: Any) -> Callable[[], None]:
    """On the plugin's loop: the start-up probe (once), then the sample's teacher values."""
    await _startup_probe(runtime)
    return await _score_sample(runtime, sample)


async def _startup_probe(runtime: _Runtime) -> None:
    """:func:`~slime_xvocab.probe.probe_teacher` once per runtime and teacher, all teachers at once (every
    caller awaits the same tasks, so a failed probe raises the same error for every sample of the first
    rollout). With several teachers the error names the teacher."""
    if not runtime.config.startup_probe:
        return
    await asyncio.gather(*(_probe_teacher(t, len(runtime.teachers) > 1) for t in runtime.teachers.values()))


async def _probe_teacher(teacher: _Teacher, named: bool) -> None:
    loop = asyncio.get_running_loop()
    if teacher.probe is None or teacher.probe[0] is not loop:
        if teacher.probe is not None and teacher.probe[1].done():
            teacher.probe[1].result()  # probed on another loop already: re-raise its error, or pass
            return
        task = loop.create_task(_probe(teacher, named))
        teacher.probe = (loop, task)
    await asyncio.shield(teacher.probe[1])


async def _probe(teacher: _Teacher, named: bool) -> None:
    from .probe import probe_teacher

    try:
        await probe_teacher(
            teacher.client,
            teacher_vocab_size=len(teacher.builder.teacher_tokenizer),
            max_teacher_tokens=teacher.spec.max_teacher_tokens,
            wait_s=teacher.spec.retry_budget_s,
        )
    except XVocabError as exc:
        if not named:
            raise
        raise type(exc)(f"teacher {teacher.spec.name!r} (xvocab_teachers): {exc}") from exc


@dataclass
class _Scored:
    """One teacher's answer for one sample: its values (None when it failed) and its stats."""

    name: str
    weight: float
    credit: CreditResult | None
    stats: dict
    error: str | None = None
    exc: BaseException | None = None
    dense: Any = None  # dense.DenseTargets with xvocab_dense


async def _score_sample(runtime: _Runtime, sample: Any) -> Callable[[], None]:
    """Route -> per teacher: view -> log-probs -> alignment -> credit -> mixture -> ``sample.teacher_log_probs``.

    Every routed teacher scores the sample concurrently through its own client. A teacher that fails is
    counted against that teacher; the sample falls back (student's own log-probs) only when every routed
    teacher failed. ``metadata["xvocab"]`` gains ``teachers`` (stats per teacher) and ``route`` (names).

    Returns what writes the results to the sample, for the caller's thread to run: the sample is read here
    but written only there, where nothing else (the inner reward) writes to it at the same time.
    """
    config = runtime.config
    sid = _sample_id(sample)
    n = int(sample.response_length)
    md = sample.metadata if isinstance(getattr(sample, "metadata", None), dict) else {}
    route, matched = route_of(md, config.teacher_route_key, config.teacher_routes, config.default_teacher)
    names = [name for name, _ in route]
    if n == 0:
        return functools.partial(_set_empty_scores, config, sample, matched, names)
    student = None
    try:
        student = _student_log_probs(sample, n, sid)
    except SampleError as exc:  # the sample itself is unusable: no teacher is asked, none is charged
        if config.fallback == "error":
            _raise_fatal(exc, sid)
        failed = [_failed(name, w, exc, n, runtime) for name, w in route]
        return functools.partial(_set_scores, runtime, sample, n, None, failed, matched, {})
    scored = await asyncio.gather(
        *(_score_with(runtime, runtime.teachers[name], w, sample, n, sid, student) for name, w in route)
    )
    return functools.partial(_set_scores, runtime, sample, n, student, list(scored), matched,
                             {s.name: s.stats for s in scored})


def _set_empty_scores(config: XVocabConfig, sample: Any, matched: bool, names: list[str]) -> None:
    """An empty response: no values, nothing asked of any teacher."""
    stats = sample_stats(Alignment.unaligned(0, Unaligned.SPECIAL).stats().as_dict())
    stats["unrouted"] = float(not matched)
    sample.teacher_log_probs = _to_tensor(np.zeros(0))
    if config.dense:
        from .dense_transport import set_sample_targets

        set_sample_targets(sample, _no_dense_targets(config, 0))
    _update_meta(sample, stats=stats, failed=False, error=None, evaluation=False, route=names,
                 teachers={name: stats for name in names})


async def _score_with(
    runtime: _Runtime, teacher: _Teacher, weight: float, sample: Any, n: int, sid: str, student: np.ndarray
) -> _Scored:
    """One teacher's values for one sample; a failure becomes a :class:`_Scored` with its error (or raises with
    ``xvocab_fallback: error``, and for configuration errors)."""
    name = teacher.spec.name
    try:
        view = await _on_cpu_thread(_build_view, runtime.config, teacher, sample, n, sid)
        latency, attempts = 0.0, 0
        if len(view.input_ids) > view.response_start:
            scores = await teacher.client.score(view.input_ids, view.response_start)
            _check_temperature(teacher, scores)
            values, top = scores.log_probs, scores.top_log_probs
            latency, attempts = scores.latency_s, scores.attempts
        else:  # nothing of the response fits the teacher's context: every position keeps its own value
            values, top = np.zeros(0, dtype=np.float32), None
        credit, dense, stats = await _on_cpu_thread(
            _value_answer, runtime, teacher, view, values, top, student, n, latency, attempts
        )
    except ConfigError:
        raise  # a configuration problem is one start-up error, not a fallback per sample
    except Exception as exc:  # every other failure is a counted fallback with its reason
        if runtime.config.fallback == "error":
            _raise_fatal(exc, sid)
        return _failed(name, weight, exc, n, runtime)
    return _Scored(name, weight, credit, stats, dense=dense)


def _value_answer(
    runtime: _Runtime, teacher: _Teacher, view: _View, values: np.ndarray, top: Any, student: np.ndarray, n: int,
    latency: float, attempts: int,
) -> tuple[CreditResult, Any, dict]:
    """Credit (checked finite), dense targets (``xvocab_dense``) and statistics of one teacher's answer: the
    CPU work after the answer, in one hop off the event loop."""
    credit = _credit(runtime, teacher, view, values, top, student)
    _check_finite(credit.values, runtime.config.credit_mode,
                  teacher.spec.name if len(runtime.teachers) > 1 else None)
    dense = _dense_targets(runtime, teacher, view, values, top, n) if runtime.config.dense else None
    stats = sample_stats(
        view.alignment.stats().as_dict(),
        signal_tokens=int(credit.scored.sum()),
        top_k_mass=credit.top_mass,
        clamped_tokens=credit.clamped,
        latency_s=latency,
        attempts=attempts,
        eot_mapped=view.eot_mapped,
        exact_bytes=view.exact_bytes,
        teacher_truncated_tokens=view.teacher_truncated_tokens,
        dense=dense.stats() if dense is not None else None,
    )
    return credit, dense, stats


def _check_finite(values: np.ndarray, credit_mode: str, teacher: str | None) -> None:
    if not np.isfinite(values).all():
        k = int(np.flatnonzero(~np.isfinite(values))[0])
        whose = f"teacher {teacher!r}, " if teacher else ""
        raise NonFiniteCreditError(
            f"teacher_log_probs[{k}] came out {values[k]!r} ({whose}credit_mode={credit_mode}); the sample keeps "
            "the student's log-probs. Please report it with the sample's text."
        )


def _raise_fatal(exc: Exception, sid: str) -> None:
    """``xvocab_fallback: error``: stop training with the sample named."""
    if isinstance(exc, (TeacherError, SampleError)):
        raise type(exc)(
            f"sample {sid}: {exc}\n(xvocab_fallback=error stops training; set xvocab_fallback: "
            "student to train on with the student's own log-probs for such samples)"
        ) from exc
    raise exc


def _failed(name: str, weight: float, exc: BaseException, n: int, runtime: _Runtime) -> _Scored:
    """A teacher's failure on one sample: unaligned stats by reason, the redacted error (not yet logged)."""
    if isinstance(exc, NonFiniteCreditError):
        reason = Unaligned.NON_FINITE
    elif isinstance(exc, ByteMismatchError):
        reason = Unaligned.BYTE_MISMATCH
    elif isinstance(exc, SampleError):
        reason = Unaligned.INVALID_SAMPLE
    else:
        reason = Unaligned.TEACHER_FAILED
    dense = _no_dense_targets(runtime.config, n)
    stats = sample_stats(
        Alignment.unaligned(n, reason).stats().as_dict(),
        failed=True,
        latency_s=getattr(exc, "latency_s", 0.0),
        attempts=getattr(exc, "attempts", 0),
        failure=failure_reason(exc),
        dense=dense.stats() if dense is not None else None,
    )
    teacher = runtime.teachers.get(name)
    secret = (teacher.spec.api_key,) if teacher is not None else ()
    where = f" (teacher {name!r})" if len(runtime.teachers) > 1 else ""
    return _Scored(name, weight, None, stats, f"{type(exc).__name__}: {redact_text(str(exc), secret)}{where}", exc)


def _set_scores(
    runtime: _Runtime,
    sample: Any,
    n: int,
    student: np.ndarray | None,
    scored: list[_Scored],
    matched: bool,
    per_teacher: dict,
) -> None:
    """Mix the teachers that answered, or fall back when none did; write values, mask and metadata."""
    ok = [s for s in scored if s.credit is not None]
    for s in scored:
        if s.credit is None:
            _log_failure(runtime, sample, s, fallback=not ok)
    if ok:
        if len(ok) == 1:  # one teacher (or only one answered): its values as they are
            values, mask = ok[0].credit.values, ok[0].credit.scored
        else:
            values, mask = mix_log_probs(
                [s.credit.values for s in ok], [s.credit.scored for s in ok], [s.weight for s in ok], student
            )
        stats, error = _overall_stats(ok, scored, int(mask.sum())), None
    else:  # rollout_log_probs itself may be what is wrong: then zeros, as post_process_rewards fills them.
        values = student if student is not None else np.zeros(n)
        mask = np.zeros(n, dtype=bool)
        stats, error = dict(scored[0].stats), scored[0].error
    stats["unrouted"] = float(not matched)
    sample.teacher_log_probs = _to_tensor(values)
    if runtime.config.unscored == "mask":
        _mask_unscored(sample, mask)
    _update_meta(sample, stats=stats, failed=error is not None, error=error, evaluation=False,
                 route=[s.name for s in scored], teachers=per_teacher)
    if runtime.config.dense:  # one teacher (dense takes one): its targets, or none anywhere on a fallback
        from .dense_transport import set_sample_targets

        dense = ok[0].dense if ok and ok[0].dense is not None else _no_dense_targets(runtime.config, n)
        set_sample_targets(sample, dense)


def _overall_stats(ok: list[_Scored], scored: list[_Scored], signal_tokens: int) -> dict:
    """A sample's overall stats. One teacher: its own. Several: the heaviest answering teacher's alignment
    numbers, the mixture's signal tokens, the slowest answering teacher's latency, every teacher's retries."""
    stats = dict(max(ok, key=lambda s: s.weight).stats)
    if len(scored) == 1:
        return stats
    stats["signal_tokens"] = float(signal_tokens)
    stats["latency_s"] = max(s.stats["latency_s"] for s in ok)
    retries = sum(max(s.stats["attempts"] - 1.0, 0.0) for s in scored)
    stats["attempts"] = 1.0 + retries if any(s.stats["attempts"] for s in scored) else 0.0
    return stats


def _log_failure(runtime: _Runtime, sample: Any, scored: _Scored, *, fallback: bool) -> None:
    runtime.failures_logged += 1
    count = runtime.failures_logged
    if count <= _LOG_FIRST_FAILURES or count % 100 == 0:
        logger.warning(
            "slime-xvocab: sample %s %s (failure #%d): %s",
            _sample_id(sample),
            "falls back to the student's log-probs" if fallback else f"is scored without teacher {scored.name!r}",
            count,
            scored.error,
            exc_info=scored.exc if not isinstance(scored.exc, XVocabError) else None,  # unexpected: keep traceback
        )


def _check_temperature(teacher: _Teacher, scores: Any) -> None:
    """On the first answer: warn once when the teacher did not apply the requested input-logprob temperature.

    A server without sglang#36213 (or a router that drops the field) ignores ``input_logprob_temperature`` and
    answers at T = 1; training goes on with those values.
    """
    if teacher.temperature_checked:
        return
    teacher.temperature_checked = True
    requested, applied = teacher.client.temperature, getattr(scores, "temperature", 1.0)
    if abs(applied - requested) > 1e-6 * requested:
        logger.warning(
            "slime-xvocab: asked the teacher at %s for log-probs at temperature %g (input_logprob_temperature) "
            "but it applied %g: it predates sglang#36213 or a router dropped the field. Teacher log-probs stay "
            "at temperature %g; upgrade the teacher's SGLang or run --rollout-temperature 1.",
            scores.url, requested, applied, applied,
        )


def _mask_unscored(sample: Any, scored: np.ndarray) -> None:
    """``xvocab_unscored: mask``: zero ``sample.loss_mask`` where the teacher gave no value (None -> all ones first)."""
    n = int(sample.response_length)
    mask = getattr(sample, "loss_mask", None)
    mask = [1] * n if mask is None else list(mask)
    if len(mask) != n:  # slime validates this itself; leave a malformed mask for its clearer error
        return
    sample.loss_mask = [int(m) if ok else 0 for m, ok in zip(mask, np.asarray(scored, dtype=bool))]


def _credit(
    runtime: _Runtime, teacher: _Teacher, view: _View, values: np.ndarray, top: Any, student: np.ndarray
) -> CreditResult:
    """One value of ``teacher`` per student position, by the configured credit mode."""
    config = runtime.config
    if teacher.extensions is not None and view.source is not None:
        table = teacher.builder.teacher_table
        return student_token_credit(view.source, values, top, student, teacher.extensions, table)
    exact = teacher.builder.same_tokenizer or config.credit_mode == "exact"
    values = assign_credit(view.alignment, values, student, mode="exact" if exact else "chunk",
                           split=config.chunk_split)
    scored = view.alignment.one_to_one() if exact else view.alignment.student_chunk >= 0
    return CreditResult(values, scored)


def _dense_targets(runtime: _Runtime, teacher: _Teacher, view: _View, values: np.ndarray, top: Any, n: int) -> Any:
    """``xvocab_dense``: the sample's :class:`~slime_xvocab.dense.DenseTargets` (checked: finite, right shape)."""
    from .dense import dense_targets, identity_dense_targets

    config = runtime.config
    if teacher.dense is None or view.source is None:  # one tokenizer: the teacher's top-k are student ids
        targets = identity_dense_targets(top, n, top_k=config.dense_top_k, scored=view.alignment.num_chunks)
    else:
        projection, extensions = teacher.dense
        builder = teacher.builder
        end_ids = sorted(builder.student_end_ids)
        targets = dense_targets(
            view.source, values, top, projection, extensions, builder.teacher_table, top_k=config.dense_top_k,
            teacher_end_ids=builder.teacher_eot_ids, student_end_id=end_ids[0] if end_ids else None,
        )
    try:
        targets.check(n)
    except ValueError as exc:
        raise NonFiniteCreditError(f"dense targets: {exc}") from exc
    return targets


def _no_dense_targets(config: XVocabConfig, n: int) -> Any:
    """``xvocab_dense``: targets of a sample that could not be scored (no target anywhere), else None."""
    if not config.dense:
        return None
    from .dense import DenseTargets

    return DenseTargets.empty(n, config.dense_top_k)


def _load_function(path: str) -> Any:
    module_path, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_path), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"xvocab_inner_rm_path={path!r} cannot be loaded: {type(exc).__name__}: {exc}"
        ) from exc


async def _inner_reward(
    args: Any,
    sample: Any,
    config: XVocabConfig,
    runtime: _Runtime | None,
    kwargs: dict,
    *,
    evaluation: bool = False,
) -> Any:
    """The task reward: user function, slime's rule-based reward, or 0.0 (pure distillation).

    Evaluation samples score like stock slime's ``async_rm`` (this hook being ``--custom-rm-path``): the
    eval dataset's own ``rm_type`` (``sample.metadata["rm_type"]``, set by slime's ``eval_config``) first,
    then ``xvocab_inner_rm_type``, then ``--rm-type``; ``xvocab_inner_rm_path`` replaces all of them, as a
    custom reward function does in slime.
    """
    if config.inner_rm_path:
        result = _load_function(config.inner_rm_path)(args, sample, **kwargs)
        return await result if inspect.isawaitable(result) else result
    rm_type = eval_rm_type(args, sample, config) if evaluation else config.inner_rm_type
    if rm_type:
        _check_remote_rm(args, rm_type, config)
        try:
            from slime.rollout.rm_hub import async_rm
        except ImportError as exc:
            raise ConfigError(
                f"rule-based reward {rm_type!r} (xvocab_inner_rm_type, --rm-type) needs slime.rollout.rm_hub "
                f"(not importable here: {exc}); run inside slime's environment or use "
                "xvocab_inner_rm_path"
            ) from exc
        inner_args = runtime.inner_args if runtime is not None and rm_type == config.inner_rm_type else None
        if inner_args is None:
            inner_args = copy.copy(args)
            inner_args.custom_rm_path, inner_args.rm_type = None, rm_type
        # async_rm tries sample.custom_rm_path first (on eval samples: this very hook); clear it on a copy.
        proxy = copy.copy(sample)
        proxy.custom_rm_path = None
        return await async_rm(inner_args, proxy)
    return 0.0


def eval_rm_type(args: Any, sample: Any, config: XVocabConfig) -> str | None:
    """The rule-based reward type of an evaluation sample, resolved as stock slime's ``async_rm`` does.

    The eval dataset's ``rm_type`` (slime's ``eval_config`` writes it to ``sample.metadata["rm_type"]``)
    wins, then ``xvocab_inner_rm_type``, then slime's ``--rm-type``. None: no rule-based reward (0.0).
    """
    md = sample.metadata if isinstance(getattr(sample, "metadata", None), dict) else {}
    for value in (md.get("rm_type"), config.inner_rm_type, getattr(args, "rm_type", None)):
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def _check_remote_rm(args: Any, rm_type: str, config: XVocabConfig) -> None:
    """``remote_rm`` posts to ``--rm-url``; refuse when that is the teacher (it would crash after retries)."""
    if rm_type != "remote_rm":
        return
    rm_url = getattr(args, "rm_url", None)
    teacher_urls = {u for t in config.teachers for u in t.urls}
    if rm_url and any(u.strip() in teacher_urls for u in str(rm_url).split(",")):
        raise ConfigError(
            f"rm_type 'remote_rm' posts rewards to --rm-url ({rm_url}), which is the teacher server here "
            "(xvocab_teacher_urls defaults to --rm-url). Set xvocab_teacher_urls to the teacher and --rm-url "
            "to the reward server."
        )


# ---------------------------------------------------------------------------------------------- eval hook


def mark_evaluation(
    args: Any, sample: Any, *, rollout_id: int | None = None, evaluation: bool = False
) -> None:
    """slime ``--rollout-sample-hook-path`` hook: record whether ``sample`` is an evaluation sample.

    slime tells sample hooks ``evaluation=`` but not reward functions; :func:`reward_func` reads the flag
    back, so evaluation samples get their task reward and are never sent to the teacher.

    Returns:
        None (slime keeps the same sample object).
    """
    _update_meta(sample, evaluation=bool(evaluation), rollout_id=rollout_id)


# ---------------------------------------------------------------------------------------------- post-process


def _flatten(samples: Sequence[Any]) -> list:
    out = []
    for s in samples:
        out.extend(_flatten(s) if isinstance(s, list) else [s])
    return out


def _reward_value(args: Any, sample: Any) -> float:
    """slime's ``Sample.get_reward_value``; a missing reward counts as 0.0."""
    reward = sample.reward
    key = getattr(args, "reward_key", None)
    if key and isinstance(reward, dict):
        reward = reward[key]
    return 0.0 if reward is None else float(reward)


def normalize_group_rewards(args: Any, raw_rewards: Sequence[float]) -> list[float]:
    """slime's default reward post-processing (``RolloutManager._post_process_rewards``), reimplemented.

    For ``--advantage-estimator`` grpo, gspo, cispo and reinforce_plus_plus_baseline with rewards
    normalisation on (slime's default; ``--disable-rewards-normalization`` turns it off): rewards are
    grouped by ``n_samples_per_prompt`` when the batch is exactly ``rollout_batch_size`` groups (else the
    whole batch is one group), the group mean is subtracted, and for grpo/gspo/cispo (unless
    ``--disable-grpo-std-normalization``) the result is divided by ``std + 1e-6`` (unbiased std, float32).
    One deviation: a group of one sample gives 0.0, where slime's unbiased std gives NaN.

    Returns:
        The normalised rewards, same order and length.
    """
    estimator = getattr(args, "advantage_estimator", None)
    if (
        estimator not in GROUP_ESTIMATORS
        or not getattr(args, "rewards_normalization", True)
        or not raw_rewards
    ):
        return [float(r) for r in raw_rewards]
    n = int(getattr(args, "n_samples_per_prompt", 1) or 1)
    batch = getattr(args, "rollout_batch_size", None)
    per_row = n if batch is not None and len(raw_rewards) == n * int(batch) else len(raw_rewards)
    divide = estimator in STD_ESTIMATORS and getattr(args, "grpo_std_normalization", True) and per_row > 1
    try:
        import torch
    except ImportError:  # pragma: no cover - numpy path, same formula (float32, ddof=1)
        r = np.asarray(raw_rewards, dtype=np.float32).reshape(-1, per_row)
        r = r - r.mean(axis=-1, keepdims=True)
        if divide:
            r = r / (r.std(axis=-1, ddof=1, keepdims=True) + np.float32(1e-6))
        return [float(x) for x in r.reshape(-1)]
    r = torch.tensor(list(raw_rewards), dtype=torch.float).reshape(-1, per_row)
    r = r - r.mean(dim=-1, keepdim=True)
    if divide:
        r = r / (r.std(dim=-1, keepdim=True) + 1e-6)
    return r.flatten().tolist()


def post_process_rewards(args: Any, samples: list) -> tuple[list[float], list[float]]:
    """slime ``--custom-reward-post-process-path`` hook: check/fill ``teacher_log_probs``, normalise rewards.

    Every sample leaves with ``teacher_log_probs`` of length ``response_length`` (slime tensorises the key
    for the whole batch as soon as the first sample has it). A sample without valid values gets the
    student's rollout log-probs (OPD delta 0) and is counted as a fallback; with ``xvocab_fallback: error``
    it stops training instead. More than ``xvocab_max_failed_fraction`` fallbacks also stop training.

    Args:
        args: slime's args.
        samples: the rollout's samples (flat, as slime passes them; nested lists are flattened).

    Returns:
        ``(raw_rewards, rewards)``: the task rewards and their group-normalised values
        (:func:`normalize_group_rewards`); zeros for pure distillation, as slime's OPD hook returns.

    Raises:
        TeacherError / SampleError: too many samples could not be scored, or ``xvocab_fallback: error``.
    """
    config = get_config(args)
    flat = _flatten(samples)
    fallbacks: list[tuple[Any, str]] = []
    for s in flat:
        n = int(s.response_length)
        entry = _meta(s)
        tlp = getattr(s, "teacher_log_probs", None)
        why = None
        if tlp is None:
            why = entry.get("error") or (
                "no teacher_log_probs: slime_xvocab.hooks.reward_func did not score this sample (is it the "
                "--custom-rm-path? a sample whose reward was already set is skipped by slime)"
            )
        elif len(tlp) != n:
            why = f"teacher_log_probs has {len(tlp)} values but response_length is {n}"
        elif not np.isfinite(_as_float_array(tlp)).all():
            why = "NonFiniteCreditError: teacher_log_probs holds NaN or infinite values; never sent to training"
        elif entry.get("failed"):
            fallbacks.append((s, entry.get("error") or "teacher call failed"))
            continue
        if why is None:
            continue
        if config.fallback == "error":
            raise SampleError(f"sample {_sample_id(s)}: {why} (xvocab_fallback=error)")
        lps = getattr(s, "rollout_log_probs", None)
        values = _as_float_array(lps) if lps is not None and len(lps) == n else np.zeros(n)
        s.teacher_log_probs = _to_tensor(values)
        if config.unscored == "mask":
            _mask_unscored(s, np.zeros(n, dtype=bool))
        if config.dense:
            from .dense_transport import set_sample_targets

            set_sample_targets(s, _no_dense_targets(config, n))
        _update_meta(s, failed=True, error=why)
        fallbacks.append((s, why))

    if config.dense:  # slime converts these samples to train data next, in this order
        from .dense_transport import collect

        collect(flat)
    metrics = compute_post_process_metrics(len(flat), len(fallbacks))
    per_teacher = _teacher_failures(flat) if len(config.teachers) > 1 else {}
    for name, (routed, failed) in per_teacher.items():
        for key, value in compute_post_process_metrics(routed, failed).items():
            metrics[f"teacher/{name}/{key}"] = value
    _log_metrics(args, _rollout_id(flat), metrics, what="post-process")
    if flat and metrics["failed_fraction"] > config.max_failed_fraction:
        raise _too_many_failures(config, flat, fallbacks)
    for spec in config.teachers:
        routed, failed = per_teacher.get(spec.name, (0, 0))
        if routed and failed / routed > spec.max_failed_fraction:
            raise _teacher_failed_too_often(spec, routed, failed, flat)
    raw = [_reward_value(args, s) for s in flat]
    return raw, normalize_group_rewards(args, raw)


def _teacher_failures(flat: list) -> dict[str, tuple[int, int]]:
    """Per teacher: ``(samples routed to it, samples it failed to score)`` of the training samples."""
    out: dict[str, tuple[int, int]] = {}
    for entry in map(_meta, flat):
        if entry.get("evaluation"):
            continue
        for name, stats in (entry.get("teachers") or {}).items():
            routed, failed = out.get(name, (0, 0))
            out[name] = (routed + 1, failed + int(bool(stats.get("failed"))))
    return out


def _teacher_failed_too_often(spec: TeacherConfig, routed: int, failed: int, flat: list) -> TeacherError:
    errors = [
        e["error"] for e in map(_meta, flat) if (e.get("teachers") or {}).get(spec.name, {}).get("failed")
        and e.get("error")
    ]
    reasons = Counter(
        k[len("failed/"):] for e in map(_meta, flat) for k in (e.get("teachers") or {}).get(spec.name, {})
        if k.startswith("failed/")
    )
    return TeacherError(
        f"teacher {spec.name!r} could not score {failed} of the {routed} samples routed to it (> its "
        f"max_failed_fraction={spec.max_failed_fraction}); by cause: {dict(reasons)}. Check it at "
        f"{', '.join(map(redact_url, spec.urls))} (curl <url>/health_generate)"
        + (f"; first error: {errors[0][:300]}" if errors else "")
        + ", or raise its max_failed_fraction in xvocab_teachers (1.0 never stops)."
    )


def _too_many_failures(config: XVocabConfig, flat: list, fallbacks: list) -> XVocabError:
    reasons = Counter(why.split(":")[0] for _, why in fallbacks)
    teacher_side = sum(c for r, c in reasons.items() if r.startswith("Teacher"))
    cls = TeacherError if teacher_side * 2 >= len(fallbacks) else SampleError
    examples = "\n".join(f"    sample {_sample_id(s)}: {why[:300]}" for s, why in fallbacks[:3])
    return cls(
        f"{len(fallbacks)} of {len(flat)} samples could not be scored by the teacher "
        f"(> xvocab_max_failed_fraction={config.max_failed_fraction}); by cause: {dict(reasons)}. "
        "First ones:\n"
        f"{examples}\nCheck the teacher at {', '.join(redact_url(u) for t in config.teachers for u in t.urls)} "
        "(curl <url>/health_generate), "
        "the messages in sample.metadata, or raise xvocab_max_failed_fraction (1.0 never stops)."
    )


# ---------------------------------------------------------------------------------------------- logging


def _rollout_id(samples: Sequence[Any]) -> int | None:
    for s in samples:
        rid = _meta(s).get("rollout_id")
        if rid is not None:
            return int(rid)
    try:  # slime keeps the current rollout id for sample hooks (private, so optional)
        from slime.rollout import sample_hooks

        return sample_hooks._current_rollout_id
    except Exception:
        return None


#: Where slime keeps ``log`` and ``compute_rollout_step``: ``slime.observability`` on main since slime #2298,
#: ``slime.utils`` in v0.3.1 and earlier.
SLIME_LOGGING_MODULES = (
    ("slime.observability.logging_utils", "slime.observability.metric_utils"),
    ("slime.utils.logging_utils", "slime.utils.metric_utils"),
)
_SLIME_LOGGING: list = []  # [(log, compute_rollout_step)] or [None] once resolved


def slime_logging() -> tuple[Any, Any] | None:
    """slime's ``(log, compute_rollout_step)`` from whichever layout this slime has, or None (warned once).

    Tried in :data:`SLIME_LOGGING_MODULES` order; the first pair that imports wins and is kept for the process.
    """
    if not _SLIME_LOGGING:
        errors = []
        for log_module, step_module in SLIME_LOGGING_MODULES:
            try:
                log = importlib.import_module(log_module).log
                step = importlib.import_module(step_module).compute_rollout_step
            except Exception as exc:  # ImportError, or wandb/tensorboard failing inside slime's module
                errors.append(f"{log_module}: {type(exc).__name__}: {exc}")
                continue
            _SLIME_LOGGING.append((log, step))
            break
        else:
            _SLIME_LOGGING.append(None)
            logger.warning(
                "slime-xvocab: rollout/xvocab/* metrics go to the python log only: slime's logger is not "
                "importable (%s)",
                "; ".join(errors),
            )
    return _SLIME_LOGGING[0]


def _rollout_step(args: Any, rollout_id: int, found: tuple[Any, Any] | None) -> int:
    if found is not None:
        return found[1](args, rollout_id)
    if getattr(args, "wandb_always_use_train_step", False):  # slime's formula, when slime is not importable
        return rollout_id * args.rollout_batch_size * args.n_samples_per_prompt // args.global_batch_size
    return rollout_id


def _log_metrics(
    args: Any, rollout_id: int | None, metrics: dict[str, float], *, what: str
) -> dict[str, Any]:
    """Log ``rollout/xvocab/<key>`` with ``rollout/step`` through slime's logger (wandb / TensorBoard).

    Only python logging when the step is unknown, when ``args`` is not slime's (no ``use_wandb``), or when
    slime's logger is not importable (warned once by :func:`slime_logging`).
    """
    data: dict[str, Any] = {f"rollout/xvocab/{k}": v for k, v in metrics.items()}
    found = slime_logging() if hasattr(args, "use_wandb") else None
    if rollout_id is not None:
        data["rollout/step"] = _rollout_step(args, rollout_id, found)
    logger.info("slime-xvocab %s, rollout %s: %s", what, rollout_id, data)
    if rollout_id is not None and found is not None:
        found[0](args, data, step_key="rollout/step")
    return data


def log_rollout_data(
    rollout_id: int, args: Any, samples: list, rollout_extra_metrics: dict | None, rollout_time: float
) -> bool:
    """slime ``--custom-rollout-log-function-path`` hook: log ``rollout/xvocab/*`` for one rollout.

    slime calls it after generation and reward, before the reward post-process, so it reports what
    :func:`reward_func` recorded per sample (alignment coverage, chunk widths, teacher latency, failures)
    plus the teacher client's request count since the previous rollout. Evaluation samples are left out.

    Returns:
        False: slime's default rollout logging runs as well.
    """
    flat = _flatten(samples)
    entries = [e for e in map(_meta, flat) if "stats" in e and not e.get("evaluation")]
    runtime = _cached(_RUNTIMES, args)
    client_stats: dict[str, dict] = {}
    if runtime is not None:
        for name, teacher in runtime.teachers.items():
            client_stats[name] = teacher.client.stats()
            teacher.client.reset_stats()
    total = _sum_stats(client_stats.values()) if client_stats else None
    metrics = compute_rollout_metrics([e["stats"] for e in entries], total)
    if runtime is not None and len(runtime.teachers) > 1:
        per_teacher: dict[str, list] = {name: [] for name in runtime.teachers}
        for e in entries:
            for name, stats in (e.get("teachers") or {}).items():
                per_teacher.setdefault(name, []).append(stats)
        metrics.update(compute_teacher_metrics(per_teacher, client_stats))
    _log_metrics(args, rollout_id, metrics, what="rollout")
    return False


def _sum_stats(stats: Any) -> dict[str, float]:
    """Key-wise sum of several clients' counters (their latency percentiles do not add up: left out)."""
    out: dict[str, float] = {}
    for one in stats:
        for key, value in one.items():
            if isinstance(value, (int, float)) and not key.startswith("latency_"):  # counters only
                out[key] = out.get(key, 0.0) + float(value)
    return out
