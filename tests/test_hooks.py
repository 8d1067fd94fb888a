"""Contract suite for slime_xvocab.hooks, driven the way slime drives them.

Hooks are loaded by dotted path (slime's load_function), their parameter names are checked against
slime's call sites, and a rollout goes through them in slime's order: the sample hook on every sample,
the async reward function concurrently on one event loop, the rollout log function, the reward
post-process on the whole batch, then slime's OPD advantage ``A = -coef * (student_lp - teacher_lp)``.
The teacher is the reference scoring server (a real subprocess with a tiny random Llama whose vocabulary
covers Qwen3's, Llama-3's and Gemma-3's ids); tokenizers are the real Qwen3 and Llama-3.1 ones. Every case runs
on the stand-in ``Sample`` and, when slime is importable, on slime's own ``Sample`` too.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import pickle
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from slime_standin import (
    SAMPLE_HOOK_KWARGS,
    SIGNATURES,
    Sample,
    apply_opd_kl,
    load_function,
    make_args,
    make_sample,
    real_sample_class,
    slime_group_normalize,
    slime_opd_request,
    slime_opd_teacher_log_probs,
)

from slime_xvocab import hooks
from slime_xvocab.assets import load_tokenizer, tokenizer_dir
from slime_xvocab.credit import DEFAULT_TOP_K, assign_credit
from slime_xvocab.errors import ConfigError, SampleError, TeacherError
from slime_xvocab.teacher_client import SyncTeacherClient
from slime_xvocab.teacher_server import free_port, start_teacher_server
from slime_xvocab.teacher_view import TeacherViewBuilder

ROOT = Path(__file__).resolve().parent.parent
HOOK_PATHS = {
    "custom_rm_path": "slime_xvocab.hooks.reward_func",
    "custom_reward_post_process_path": "slime_xvocab.hooks.post_process_rewards",
    "custom_rollout_log_function_path": "slime_xvocab.hooks.log_rollout_data",
    "rollout_sample_hook_path": "slime_xvocab.hooks.mark_evaluation",
}
SAMPLE_CLASSES = [pytest.param(Sample, id="standin")]
if real_sample_class() is not None:
    SAMPLE_CLASSES.append(pytest.param(real_sample_class(), id="slime"))
else:
    SAMPLE_CLASSES.append(pytest.param(None, id="slime", marks=pytest.mark.skip(reason="no slime here")))

PROMPTS = [
    "What is 347 + 85?",
    "Translate to Chinese: good morning",
    "Write a Python function that adds two numbers.",
    "Name three emoji for a party.",
]
RESPONSES = [
    "347 + 85 = 432.",
    "早上好！ (zǎoshang hǎo) 🌞",
    "def add(a, b):\n    return a + b\n",
    "🎉🥳🎈 — party time!",
]
QWEN_KWARGS = {"enable_thinking": False}


async def task_reward(args, sample, **kwargs) -> float:
    """An inner reward for the tests: 1.0 if the response mentions a digit."""
    return float(any(c.isdigit() for c in sample.response))


async def slow_metadata_reward(args, sample, **kwargs) -> float:
    """An inner reward that rewrites the sample's metadata across an await (read, wait, write back)."""
    metadata = dict(sample.metadata)
    await asyncio.sleep(0.5)  # the teacher has answered by now
    metadata["judge"] = "seen"
    sample.metadata = metadata
    return 1.0


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab = max(len(load_tokenizer(name)) for name in ("qwen3", "llama3_1", "gemma3"))
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # sharper than the 0.02 init so log-probs vary between tokens
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
    path = tmp_path_factory.mktemp("xvocab_teacher")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    with start_teacher_server(teacher_dir) as handle:
        yield handle


@pytest.fixture(scope="module")
def dead_url():
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture(autouse=True)
def _fresh_hook_caches():
    hooks.reset()
    yield
    hooks.reset()


def xargs(url: str, teacher: str = "llama3_1", **overrides):
    """slime args for a Qwen3 student and the given teacher family, pure distillation."""
    values = {
        "hf_checkpoint": str(tokenizer_dir("qwen3")),
        "xvocab_teacher_tokenizer": str(tokenizer_dir(teacher)),
        "xvocab_teacher_urls": url,
        "xvocab_max_retries": 0,
        "xvocab_timeout_s": 30.0,
        "n_samples_per_prompt": 2,
        "rollout_batch_size": 2,
    }
    values.update(overrides)
    return make_args(**values)


def rollout(cls, n: int = 4, *, with_messages: bool = True, seed: int = 0) -> list:
    """n finished Qwen3 rollouts as slime leaves them: student-template prompt ids + response ids + EOT."""
    tok = load_tokenizer("qwen3")
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **QWEN_KWARGS)
        prompt_ids = tok.encode(text, add_special_tokens=False)
        response_ids = tok.encode(RESPONSES[i % len(RESPONSES)], add_special_tokens=False) + [eot]
        lps = (-rng.exponential(1.0, len(response_ids))).astype(np.float32).tolist()
        sample = make_sample(
            cls, prompt_ids=prompt_ids, response_ids=response_ids, rollout_log_probs=lps,
            group_index=i // 2, index=i, prompt=text, response=RESPONSES[i % len(RESPONSES)],
            metadata={"messages": messages} if with_messages else {},
        )
        out.append(sample)
    return out


def run_rollout(args, samples, *, evaluation: bool = False, rollout_id: int = 0):
    """slime's per-sample path: sample hooks (told evaluation=), then the reward, all on one loop."""
    hook = load_function(HOOK_PATHS["rollout_sample_hook_path"])
    rm = load_function(HOOK_PATHS["custom_rm_path"])

    async def one(sample):
        kwargs = {"rollout_id": rollout_id, "evaluation": evaluation}
        params = inspect.signature(hook).parameters
        result = hook(args, sample, **{k: v for k, v in kwargs.items() if k in params})
        if inspect.isawaitable(result):
            result = await result
        sample = result or sample
        sample.reward = await rm(args, sample)  # slime's async_rm passes no evaluation flag
        return sample

    async def main():
        return await asyncio.gather(*(one(s) for s in samples))

    return asyncio.run(main())


def logged(caplog, what: str) -> dict:
    records = [
        r for r in caplog.records
        if r.name == "slime_xvocab.hooks" and isinstance(r.args, tuple) and r.args and r.args[0] == what
    ]
    assert records, f"no {what} metrics were logged"
    return records[-1].args[2]


# ---------------------------------------------------------------------------------------------- contracts


@pytest.mark.parametrize("flag", list(HOOK_PATHS))
def test_hooks_load_by_dotted_path_with_slimes_parameter_names(flag):
    fn = load_function(HOOK_PATHS[flag])
    params = inspect.signature(fn).parameters
    names = tuple(p.name for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
    assert names == SIGNATURES[flag]
    if flag == "custom_rm_path":
        assert inspect.iscoroutinefunction(fn), "slime awaits the custom reward function"
        assert any(p.kind == p.VAR_KEYWORD for p in params.values()), "slime's async_rm passes **kwargs"
    if flag == "rollout_sample_hook_path":
        for kw in SAMPLE_HOOK_KWARGS:
            assert params[kw].kind == params[kw].KEYWORD_ONLY
    if flag == "custom_reward_post_process_path":
        assert not inspect.iscoroutinefunction(fn), "slime calls the post-process synchronously"
        assert tuple(params) == SIGNATURES[flag], "slime's contract test compares the whole parameter list"


def test_public_names_of_hooks_module():
    expected = {"reward_func", "post_process_rewards", "mark_evaluation", "log_rollout_data"}
    assert expected <= set(hooks.__all__)


def test_teacher_view_builder_is_the_one_the_hooks_use(dead_url):
    args = xargs(dead_url, teacher="gemma3", xvocab_end_of_turn="<eos>", xvocab_system_prompt="drop")
    builder = hooks.teacher_view_builder(args)
    assert builder is hooks.teacher_view_builder(args)  # built once per args object
    gemma = load_tokenizer("gemma3")
    assert builder.teacher_eot_ids == (gemma.convert_tokens_to_ids("<eos>"),)
    assert builder.system_prompt == "drop"
    with pytest.raises(ConfigError, match="xvocab_credit_mode"):
        hooks.teacher_view_builder(xargs(dead_url, xvocab_credit_mode="bogus"))


# ---------------------------------------------------------------------------------------------- rollouts


@pytest.mark.parametrize("cls", SAMPLE_CLASSES)
def test_cross_vocab_rollout_through_every_hook(cls, teacher, caplog):
    caplog.set_level(logging.INFO, logger="slime_xvocab.hooks")
    args = xargs(teacher.url, xvocab_credit_mode="chunk")  # the default, student_token, has its own tests
    samples = run_rollout(args, rollout(cls))
    assert [s.reward for s in samples] == [0.0] * 4  # pure distillation: a float, not the teacher's JSON
    for s in samples:
        assert s.metadata["xvocab"]["failed"] is False, s.metadata["xvocab"]["error"]

    # The rollout log runs before the post-process (slime's order) and returns False (keep slime's logging).
    log_fn = load_function(HOOK_PATHS["custom_rollout_log_function_path"])
    assert log_fn(3, args, samples, {}, 1.5) is False
    metrics = logged(caplog, "rollout")
    assert metrics["rollout/step"] == 3
    for key in ("covered_fraction", "one_to_one_fraction", "mean_chunk_width", "max_chunk_width",
                "unaligned_tokens", "eot_mapped_fraction", "teacher_student_token_ratio",
                "teacher_latency_p50_s", "teacher_latency_p99_s", "teacher_retries", "teacher_failures",
                "exact_bytes_fraction", "teacher_requests"):
        assert f"rollout/xvocab/{key}" in metrics, key
    assert metrics["rollout/xvocab/samples"] == 4
    assert metrics["rollout/xvocab/teacher_failures"] == 0
    assert metrics["rollout/xvocab/teacher_requests"] == 4
    assert metrics["rollout/xvocab/eot_mapped_fraction"] == 1.0
    assert metrics["rollout/xvocab/covered_fraction"] == 1.0  # every byte and the EOT find a teacher chunk
    assert metrics["rollout/xvocab/max_chunk_width"] > 1  # Qwen3 splits 347 into digits, Llama-3 does not

    post = load_function(HOOK_PATHS["custom_reward_post_process_path"])
    raw, rewards = post(args, samples)
    assert raw == [0.0] * 4 and rewards == [0.0] * 4
    assert logged(caplog, "post-process")["rollout/xvocab/fallback_samples"] == 0

    # Independently: the same view, scored by a separate client, credited the same way.
    builder = TeacherViewBuilder(load_tokenizer("qwen3"), load_tokenizer("llama3_1"))
    with SyncTeacherClient(teacher.url) as client:
        for s in samples:
            if hasattr(s, "validate"):
                s.validate()
            tlp = s.teacher_log_probs
            assert isinstance(tlp, torch.Tensor) and tlp.dtype == torch.float32
            assert tlp.shape == (s.response_length,) and torch.isfinite(tlp).all()
            view = builder.build(s.metadata["messages"], s.tokens[-s.response_length:])
            scores = client.score(view.input_ids, view.response_start)
            expected = assign_credit(view.alignment, scores.log_probs, np.asarray(s.rollout_log_probs))
            np.testing.assert_array_equal(tlp.numpy(), expected)

    advantages = apply_opd_kl(args, samples)
    for s, adv in zip(samples, advantages, strict=True):
        assert np.isfinite(adv).all() and np.abs(adv).sum() > 0
        restored = pickle.loads(pickle.dumps(s))  # samples cross Ray actors
        assert torch.equal(restored.teacher_log_probs, s.teacher_log_probs)
        assert restored.metadata["xvocab"]["stats"] == s.metadata["xvocab"]["stats"]


@pytest.mark.parametrize("cls", SAMPLE_CLASSES)
def test_unaligned_positions_have_zero_delta(cls, teacher):
    """Gemma-3 (SentencePiece) teacher with a tight context: the tail and specials stay unaligned."""
    args = xargs(teacher.url, teacher="gemma3", xvocab_max_teacher_tokens=28)
    samples = run_rollout(args, rollout(cls))
    builder = TeacherViewBuilder(load_tokenizer("qwen3"), load_tokenizer("gemma3"), max_teacher_tokens=28)
    n_unaligned = 0
    for s, adv in zip(samples, apply_opd_kl(args, samples), strict=True):
        view = builder.build(s.metadata["messages"], s.tokens[-s.response_length:])
        unaligned = view.alignment.student_chunk < 0
        n_unaligned += int(unaligned.sum())
        np.testing.assert_array_equal(
            s.teacher_log_probs.numpy()[unaligned],
            np.asarray(s.rollout_log_probs, dtype=np.float32)[unaligned],
        )
        assert (adv[unaligned] == 0.0).all()
        assert s.metadata["xvocab"]["failed"] is False, s.metadata["xvocab"]["error"]
        stats = s.metadata["xvocab"]["stats"]
        assert stats["unaligned_tokens"] == unaligned.sum()
    assert n_unaligned > 0, "the 28-token teacher context must cut some responses"


@pytest.mark.parametrize("credit_mode", ["student_token", "chunk", "exact"])
def test_unscored_mask_takes_positions_without_a_teacher_value_out_of_the_loss(teacher, credit_mode):
    """xvocab_unscored: mask zeroes loss_mask exactly where the OPD delta is 0 by construction; keep leaves it."""
    common = dict(teacher="gemma3", xvocab_max_teacher_tokens=28, xvocab_credit_mode=credit_mode)
    kept = run_rollout(xargs(teacher.url, **common), rollout(Sample))
    masked = run_rollout(xargs(teacher.url, xvocab_unscored="mask", **common), rollout(Sample))
    builder = TeacherViewBuilder(load_tokenizer("qwen3"), load_tokenizer("gemma3"), max_teacher_tokens=28)
    n_masked = 0
    for k, m in zip(kept, masked, strict=True):
        assert k.loss_mask == [1] * k.response_length
        view = builder.build(m.metadata["messages"], m.tokens[-m.response_length:])
        a = view.alignment
        scored = a.one_to_one() if credit_mode == "exact" else a.student_chunk >= 0
        assert m.loss_mask == scored.astype(int).tolist()
        n_masked += m.response_length - sum(m.loss_mask)
        m.validate()  # slime's invariant: len(loss_mask) == response_length
        np.testing.assert_array_equal(m.teacher_log_probs.numpy(), k.teacher_log_probs.numpy())
    assert n_masked > 0


def test_unscored_mask_covers_samples_that_fall_back(dead_url):
    args = xargs(dead_url, xvocab_startup_probe=False, xvocab_max_failed_fraction=1.0, xvocab_unscored="mask")
    samples = run_rollout(args, rollout(Sample))
    assert all(s.loss_mask == [0] * s.response_length for s in samples)
    late = rollout(Sample, 1)[0]  # never scored by the reward hook: the post-process fills and masks it
    late.metadata["xvocab"] = {}
    hooks.post_process_rewards(args, [late])
    assert late.loss_mask == [0] * late.response_length


def test_student_token_credit_asks_for_top_k_and_conserves_the_teacher_mass(teacher):
    """The default credit: the hooks fetch the teacher's top-k; over a fully aligned answer that ends its turn
    the values telescope to the teacher's log-prob of the whole answer (its own scores, fetched here again)."""
    args = xargs(teacher.url)
    samples = run_rollout(args, rollout(Sample))
    builder = TeacherViewBuilder(load_tokenizer("qwen3"), load_tokenizer("llama3_1"))
    client = SyncTeacherClient(teacher.url, top_logprobs=DEFAULT_TOP_K)
    try:
        for s in samples:
            view = builder.build(s.metadata["messages"], s.tokens[-s.response_length:])
            scores = client.score(view.input_ids, view.response_start)
            got = s.teacher_log_probs.numpy()
            stats = s.metadata["xvocab"]["stats"]
            assert np.isfinite(got).all() and (got <= 1e-6).all()
            assert 0.0 < stats["top_k_mass"] <= 1.0 + 1e-6
            assert view.alignment.stats().covered_fraction == 1.0 and view.eot_mapped
            if stats["clamped_tokens"] == 0:
                assert got.sum() == pytest.approx(float(scores.log_probs.sum()), abs=1e-3)
    finally:
        client.close()


def test_plugin_work_runs_off_slimes_loop_on_two_threads_of_its_own(teacher, monkeypatch):
    """Samples scored together: their requests run on the plugin's event loop thread, their CPU work (view,
    credit, answer decoding) on its one worker thread; slime's loop only writes the results to each sample
    (benchmarks/README.md measures what that does to the loop's stalls)."""
    from slime_xvocab import sglang_wire, teacher_client

    monkeypatch.setattr(teacher_client, "OFFLOAD_ENTRIES", 0)  # decode every top-k answer off the loop
    threads: dict[str, set] = {"view": set(), "credit": set(), "decode": set(), "requests": set(), "writes": set()}

    def recorded(what, func):
        def run(*args, **kwargs):
            threads[what].add(threading.current_thread().name)
            return func(*args, **kwargs)
        return run

    monkeypatch.setattr(hooks, "_build_view", recorded("view", hooks._build_view))
    monkeypatch.setattr(hooks, "_credit", recorded("credit", hooks._credit))
    monkeypatch.setattr(hooks, "_score_with", recorded("requests", hooks._score_with))
    monkeypatch.setattr(hooks, "_set_scores", recorded("writes", hooks._set_scores))
    monkeypatch.setattr(teacher_client, "parse_answer", recorded("decode", sglang_wire.parse_answer))
    samples = run_rollout(xargs(teacher.url), rollout(Sample, 6))
    assert all(not s.metadata["xvocab"]["failed"] for s in samples)
    cpu = {hooks._THREADS.pool._thread_name_prefix + "_0"}
    assert threads["view"] == threads["credit"] == threads["decode"] == cpu
    assert threads["requests"] == {"xvocab-io"}
    assert threads["writes"] == {threading.main_thread().name}  # the sample is written on slime's loop


async def _thread_name() -> str:
    return threading.current_thread().name


def _plugin_threads_in_child(out, executor) -> None:
    async def main():
        return await hooks._on_plugin_loop(_thread_name())

    cpu = executor.submit(lambda: threading.current_thread().name).result(timeout=10)
    out.put((asyncio.run(main()), cpu))


def test_hand_overs_of_one_iteration_wake_the_plugin_loop_once_and_finish_each_on_its_own(monkeypatch):
    """64 samples handed over together cost one wake-up of the plugin's loop (each wake-up can keep slime's
    loop waiting for the GIL); each result still comes back as soon as its own work ends, and cancelling a
    caller cancels its work on the plugin's loop."""
    plugin_loop = hooks._THREADS.loop
    wakeups = []
    original = plugin_loop.call_soon_threadsafe

    def counted(callback, *args, **kwargs):
        wakeups.append(callback)
        return original(callback, *args, **kwargs)

    monkeypatch.setattr(plugin_loop, "call_soon_threadsafe", counted)
    release, cancelled = threading.Event(), threading.Event()

    async def quick(i):
        return i, threading.current_thread().name

    async def slow():
        while not release.is_set():
            await asyncio.sleep(0.01)
        return "slow"

    async def stuck():
        try:
            await asyncio.sleep(60)
        finally:
            cancelled.set()

    async def main():
        slow_task = asyncio.ensure_future(hooks._on_plugin_loop(slow()))
        stuck_task = asyncio.ensure_future(hooks._on_plugin_loop(stuck()))
        quick_results = await asyncio.gather(*(hooks._on_plugin_loop(quick(i)) for i in range(64)))
        assert not slow_task.done()  # the quick ones did not wait for it
        release.set()
        stuck_task.cancel()
        return quick_results, await slow_task

    quick_results, slow_result = asyncio.run(main())
    assert quick_results == [(i, "xvocab-io") for i in range(64)] and slow_result == "slow"
    assert cancelled.wait(5)
    starts = [w for w in wakeups if getattr(w, "__name__", "") == "_start"]
    assert len(starts) == 1 and len(starts) + 1 == len(wakeups)  # 66 hand-overs in one iteration; one cancel


def test_a_forked_child_gets_plugin_threads_of_its_own():
    """A fork copies no thread: a child that reused its parent's plugin loop would wait on it forever."""
    import multiprocessing as mp

    parent_loop = hooks._THREADS.loop
    assert asyncio.run(hooks._on_plugin_loop(_thread_name())) == "xvocab-io"
    executor = hooks._CpuExecutor()  # what a teacher client built before the fork holds
    assert executor.submit(lambda: threading.current_thread().name).result() == "xvocab-cpu_0"
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_plugin_threads_in_child, args=(out, executor))
    child.start()
    try:
        name, cpu = out.get(timeout=30)
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
    assert name == "xvocab-io" and cpu == "xvocab-cpu_0" and child.exitcode == 0
    assert hooks._THREADS.loop is parent_loop  # the parent's stay as they were


@pytest.mark.parametrize("cls", SAMPLE_CLASSES)
def test_same_tokenizer_reproduces_slimes_opd_exactly(cls, teacher):
    args = xargs(teacher.url, teacher="qwen3")
    samples = run_rollout(args, rollout(cls, with_messages=False))  # slime's OPD needs no messages either
    with httpx.Client(trust_env=False) as http:
        for s in samples:
            answer = http.post(teacher.url + "/generate", json=slime_opd_request(s)).json()
            expected = slime_opd_teacher_log_probs(answer, s.response_length)
            np.testing.assert_array_equal(s.teacher_log_probs.numpy(), expected)
            assert s.metadata["xvocab"]["stats"]["one_to_one_fraction"] == 1.0


@pytest.mark.parametrize("cls", SAMPLE_CLASSES)
def test_evaluation_samples_never_reach_the_teacher(cls, dead_url):
    args = xargs(dead_url, xvocab_inner_rm_path="test_hooks.task_reward")
    marked = rollout(cls, 2)
    run_rollout(args, marked, evaluation=True)  # told by the sample hook
    heuristic = rollout(cls, 2)
    for s in heuristic:  # slime sets custom_rm_path on eval samples (from the eval dataset config)
        s.custom_rm_path = "slime_xvocab.hooks.reward_func"

    async def score(samples):
        return await asyncio.gather(*(hooks.reward_func(args, s) for s in samples))

    rewards = asyncio.run(score(heuristic))
    for s, r in zip(marked + heuristic, [m.reward for m in marked] + rewards, strict=True):
        assert r == float(any(c.isdigit() for c in s.response))  # the task reward, from the inner rm
        assert s.teacher_log_probs is None and s.metadata["xvocab"]["evaluation"] is True
    assert hooks._cached(hooks._RUNTIMES, args) is None, "no tokenizer or teacher client was even created"

    # Without an inner reward, eval gets 0.0; the sample hook's evaluation=False beats the heuristic.
    hooks.reset()
    args = xargs(dead_url, xvocab_startup_probe=False, xvocab_max_failed_fraction=1.0)
    train = rollout(cls, 1)
    train[0].custom_rm_path = "slime_xvocab.hooks.reward_func"
    run_rollout(args, train, evaluation=False)
    assert train[0].metadata["xvocab"]["failed"] is True  # it was sent (to a dead teacher)
    assert asyncio.run(hooks.reward_func(args, rollout(cls, 1)[0], evaluation=True)) == 0.0


@pytest.mark.parametrize("cls", SAMPLE_CLASSES)
def test_inner_reward_combines_with_distillation(cls, teacher):
    args = xargs(teacher.url, xvocab_inner_rm_path="test_hooks.task_reward")
    samples = run_rollout(args, rollout(cls))
    assert [s.reward for s in samples] == [1.0, 0.0, 0.0, 0.0]
    assert all(s.teacher_log_probs is not None for s in samples)
    raw, rewards = hooks.post_process_rewards(args, samples)
    assert raw == [1.0, 0.0, 0.0, 0.0]
    assert rewards == slime_group_normalize(args, raw)


def test_an_inner_reward_that_rewrites_metadata_keeps_the_plugins_results(teacher):
    """The plugin writes its results to the sample after the inner reward returns, on slime's loop, so a
    reward function that rewrites sample.metadata meanwhile neither loses its keys nor the plugin's."""
    args = xargs(teacher.url, xvocab_inner_rm_path="test_hooks.slow_metadata_reward")
    samples = run_rollout(args, rollout(Sample, 2))
    for s in samples:
        assert s.reward == 1.0 and s.metadata["judge"] == "seen"
        assert not s.metadata["xvocab"]["failed"] and s.metadata["xvocab"]["stats"]["signal_tokens"] > 0


def test_a_process_that_scored_exits_without_unclosed_connections(teacher):
    """The teacher clients' pools live on the plugin's loop thread; at exit they are closed there, so aiohttp
    reports no unclosed session or connector on the way out."""
    script = (
        "import asyncio, sys\n"
        "import test_hooks as T\n"
        "from slime_xvocab import hooks\n"
        "sample = T.rollout(T.Sample, 1)[0]\n"
        "asyncio.run(hooks.reward_func(T.xargs(sys.argv[1]), sample))\n"
        "print('failed', sample.metadata['xvocab']['failed'])\n"
    )
    tests_dir = str(Path(__file__).resolve().parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", script, teacher.url], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "failed False" in done.stdout
    assert "Unclosed" not in done.stderr, done.stderr[-2000:]


def test_group_rm_passes_a_list(teacher):
    args = xargs(teacher.url, group_rm=True)
    samples = rollout(Sample, 2)
    rewards = asyncio.run(hooks.reward_func(args, samples))
    assert rewards == [0.0, 0.0] and all(s.teacher_log_probs is not None for s in samples)


def test_missing_messages_fall_back_and_are_counted(teacher, caplog):
    caplog.set_level(logging.INFO, logger="slime_xvocab.hooks")
    args = xargs(teacher.url, xvocab_max_failed_fraction=1.0)
    samples = run_rollout(args, rollout(Sample, 2, with_messages=False))
    for s in samples:
        assert s.metadata["xvocab"]["failed"] is True
        assert "metadata has no 'messages'" in s.metadata["xvocab"]["error"]
        np.testing.assert_array_equal(s.teacher_log_probs.numpy(), np.float32(s.rollout_log_probs))
    hooks.log_rollout_data(0, args, samples, None, 0.0)
    metrics = logged(caplog, "rollout")
    assert metrics["rollout/xvocab/teacher_failures"] == 2
    assert metrics["rollout/xvocab/unaligned/invalid_sample"] == sum(s.response_length for s in samples)
    assert metrics["rollout/xvocab/covered_fraction"] == 0.0


# ---------------------------------------------------------------------------------------------- failures


def test_dead_teacher_falls_back_to_student_log_probs(dead_url, caplog):
    caplog.set_level(logging.INFO, logger="slime_xvocab.hooks")
    args = xargs(dead_url, xvocab_startup_probe=False, xvocab_max_failed_fraction=1.0)
    samples = run_rollout(args, rollout(Sample))
    for s, adv in zip(samples, apply_opd_kl(args, samples), strict=True):
        assert s.metadata["xvocab"]["failed"] is True
        assert "TeacherUnavailable" in s.metadata["xvocab"]["error"]
        assert (adv == 0.0).all()
    hooks.log_rollout_data(1, args, samples, None, 0.0)
    assert logged(caplog, "rollout")["rollout/xvocab/teacher_failures"] == 4
    raw, rewards = hooks.post_process_rewards(args, samples)
    assert logged(caplog, "post-process")["rollout/xvocab/fallback_samples"] == 4
    assert rewards == [0.0] * 4


def test_dead_teacher_beyond_max_failed_fraction_stops_with_a_clear_error(dead_url):
    args = xargs(dead_url, xvocab_startup_probe=False, xvocab_max_failed_fraction=0.25)
    samples = run_rollout(args, rollout(Sample))
    with pytest.raises(TeacherError, match=r"4 of 4 samples could not be scored") as info:
        hooks.post_process_rewards(args, samples)
    assert dead_url in str(info.value) and "health_generate" in str(info.value)


def test_dead_teacher_with_fallback_error_raises_naming_the_sample(dead_url):
    args = xargs(dead_url, xvocab_startup_probe=False, xvocab_fallback="error")
    with pytest.raises(TeacherError, match=r"(?s)sample \(group_index=0, index=0\).*xvocab_fallback=error"):
        run_rollout(args, rollout(Sample, 1))


def test_post_process_fills_samples_the_reward_hook_skipped(teacher):
    args = xargs(teacher.url, xvocab_max_failed_fraction=0.5)
    samples = run_rollout(args, rollout(Sample, 4))
    skipped = samples[0]
    skipped.teacher_log_probs = None  # e.g. a sample whose reward was set before slime called us
    hooks.post_process_rewards(args, samples)
    np.testing.assert_array_equal(skipped.teacher_log_probs.numpy(), np.float32(skipped.rollout_log_probs))
    with pytest.raises(SampleError, match="no teacher_log_probs"):
        skipped.teacher_log_probs = None
        hooks.post_process_rewards(xargs(teacher.url, xvocab_fallback="error"), samples)


def test_bad_config_is_one_clear_error(dead_url):
    args = xargs(
        dead_url,
        xvocab_teacher_tokenzier="/x",
        xvocab_credit_mode="chunks",
        xvocab_timeout_s="soon",
        use_opd=False,
    )
    with pytest.raises(ConfigError) as info:
        asyncio.run(hooks.reward_func(args, rollout(Sample, 1)[0]))
    message = str(info.value)
    assert "4 problem(s)" in message
    assert "did you mean 'xvocab_teacher_tokenizer'" in message
    assert "did you mean 'chunk'" in message and "xvocab_timeout_s" in message and "--use-opd" in message


# ---------------------------------------------------------------------------------------------- rewards


@pytest.mark.parametrize(
    "overrides",
    [
        {"advantage_estimator": "grpo"},
        {"advantage_estimator": "gspo"},
        {"advantage_estimator": "cispo", "grpo_std_normalization": False},
        {"advantage_estimator": "reinforce_plus_plus_baseline"},
        {"advantage_estimator": "reinforce_plus_plus"},
        {"advantage_estimator": "grpo", "rewards_normalization": False},
        {"advantage_estimator": "grpo", "rollout_batch_size": 5},  # uneven batch: one group
    ],
)
def test_reward_normalisation_matches_slimes_default(overrides, dead_url):
    args = xargs(dead_url, **{"n_samples_per_prompt": 4, "rollout_batch_size": 3, **overrides})
    raw = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.25, 1.0, 0.0]
    samples = []
    for i, r in enumerate(raw):
        s = Sample(index=i, response_length=1, rollout_log_probs=[-0.5], reward=r)
        s.teacher_log_probs = torch.tensor([-1.0])
        samples.append(s)
    got_raw, got = hooks.post_process_rewards(args, samples)
    assert got_raw == raw
    assert got == slime_group_normalize(args, raw)


def test_dict_rewards_use_reward_key(dead_url):
    args = xargs(dead_url, reward_key="acc", advantage_estimator="reinforce_plus_plus")
    s = Sample(response_length=1, rollout_log_probs=[-0.5], reward={"acc": 1.0, "len": 3})
    s.teacher_log_probs = torch.tensor([-1.0])
    assert hooks.post_process_rewards(args, [s]) == ([1.0], [1.0])


# ---------------------------------------------------------------------------------------------- examples


EXAMPLE_SCRIPTS = sorted(
    [*ROOT.glob("examples/**/*.sh"), *ROOT.glob("scripts/*.sh")], key=lambda p: str(p)
)


@pytest.mark.parametrize("script", EXAMPLE_SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_scripts_parse_with_bash_n(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_hook_path_in_examples_resolves_with_the_right_parameters():
    flag_of = {f"--{k.replace('_', '-')}": k for k in HOOK_PATHS}
    found = 0
    for path in [*ROOT.glob("examples/**/*.sh"), *ROOT.glob("examples/**/*.md"), *ROOT.glob("docs/*.md")]:
        for flag, dotted in re.findall(r"(--[a-z-]+)[ =]+(slime_xvocab\.[\w.]+)", path.read_text()):
            fn = load_function(dotted)
            if flag in flag_of:
                params = inspect.signature(fn).parameters
                names = tuple(p.name for p in params.values() if p.kind == p.POSITIONAL_OR_KEYWORD)
                assert names == SIGNATURES[flag_of[flag]], f"{path}: {flag} {dotted}"
                found += 1
    assert found >= 12, "the example launch scripts should name all four hooks"


def test_launch_teacher_script_starts_waits_and_stops_only_its_server(teacher_dir, tmp_path):
    """scripts/launch_teacher.sh with the reference engine (CPU): health wait, printed URL, detach, stop."""
    port = free_port()
    pid_file = tmp_path / "teacher.pid"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [str(ROOT / "scripts" / "launch_teacher.sh"), "--model", str(teacher_dir), "--engine", "reference",
         "--gpus", "", "--host", "127.0.0.1", "--port", str(port), "--timeout", "120",
         "--log", str(tmp_path / "t.log"), "--detach", "--pid-file", str(pid_file), "--", "--num-threads", "1"],
        capture_output=True, text=True, env=env, timeout=180,
    )
    assert result.returncode == 0, result.stderr
    url = result.stdout.strip()
    assert url == f"http://127.0.0.1:{port}"
    pid = int(pid_file.read_text())
    try:
        with SyncTeacherClient(url) as client:
            assert len(client.score([1, 2, 3, 4], 2).log_probs) == 2
    finally:
        os.killpg(pid, 15)  # what the run scripts do: the server's own process group
    for _ in range(100):
        if subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the teacher did not stop")


# ---------------------------------------------------------------------------------------------- fit to slime today


@pytest.fixture
def fake_rm_hub(monkeypatch):
    """slime's ``rm_hub.async_rm`` stand-in: resolves the type as stock slime does and records each call."""
    import sys
    import types

    calls = []

    async def async_rm(args, sample, **kwargs):
        md = sample.metadata if isinstance(sample.metadata, dict) else {}
        rm_type = (md.get("rm_type") or args.rm_type or "").strip()  # stock slime's order
        calls.append({"rm_type": rm_type, "args_rm_type": args.rm_type, "args_custom_rm_path": args.custom_rm_path,
                      "sample_custom_rm_path": sample.custom_rm_path})
        return {"math": 1, "f1": 0.5, "deepscaler": 0.25}[rm_type]

    for name in ("slime", "slime.rollout"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    hub = types.ModuleType("slime.rollout.rm_hub")
    hub.async_rm = async_rm
    monkeypatch.setitem(sys.modules, "slime.rollout.rm_hub", hub)
    return calls


def eval_sample(metadata: dict) -> Sample:
    sample = rollout(Sample, 1)[0]
    sample.metadata = {**sample.metadata, **metadata}
    sample.custom_rm_path = None  # slime copies the eval dataset's custom_rm_path: none here
    hooks.mark_evaluation(None, sample, rollout_id=0, evaluation=True)
    return sample


def test_eval_sample_honours_its_datasets_rm_type_before_the_run_wide_ones(dead_url, fake_rm_hub):
    """slime's eval_config puts a per-dataset rm_type in sample.metadata; stock async_rm reads it first."""
    reward = hooks.reward_func
    args = xargs(dead_url, rm_type="deepscaler", xvocab_inner_rm_type="f1")
    assert asyncio.run(reward(args, eval_sample({"rm_type": "math"}))) == 1
    assert asyncio.run(reward(args, eval_sample({}))) == 0.5  # xvocab_inner_rm_type
    hooks.reset()
    args = xargs(dead_url, rm_type="deepscaler")
    assert asyncio.run(reward(args, eval_sample({}))) == 0.25  # --rm-type
    assert asyncio.run(reward(args, eval_sample({"rm_type": " math "}))) == 1
    assert [c["rm_type"] for c in fake_rm_hub[:4]] == ["math", "f1", "deepscaler", "math"]
    assert all(c["args_rm_type"] == c["rm_type"] for c in fake_rm_hub)
    assert all(c["args_custom_rm_path"] is None and c["sample_custom_rm_path"] is None for c in fake_rm_hub)
    no_lps = eval_sample({"rm_type": "math"})
    no_lps.rollout_log_probs = None  # a custom generate that records none: eval never needs them
    assert asyncio.run(reward(args, no_lps)) == 1
    hooks.reset()
    assert asyncio.run(reward(xargs(dead_url), eval_sample({}))) == 0.0  # no reward type anywhere
    assert len(fake_rm_hub) == 5
    assert hooks._cached(hooks._RUNTIMES, args) is None, "eval samples never load tokenizers or reach the teacher"


def test_remote_rm_on_the_teacher_url_is_refused_for_eval_samples(dead_url, fake_rm_hub):
    args = xargs(dead_url, xvocab_teacher_urls=None, rm_url=dead_url)  # the teacher URL defaults to --rm-url
    with pytest.raises(ConfigError, match="remote_rm' posts rewards to --rm-url"):
        asyncio.run(hooks.reward_func(args, eval_sample({"rm_type": "remote_rm"})))
    assert fake_rm_hub == []


def test_slime_logger_is_found_in_either_layout_and_its_absence_is_warned_once(monkeypatch, caplog):
    import sys
    import types

    caplog.set_level(logging.WARNING, logger="slime_xvocab.hooks")
    for name in ("slime.observability.logging_utils", "slime.utils.logging_utils"):
        monkeypatch.setitem(sys.modules, name, None)  # importing it raises ImportError
    hooks.reset()
    assert hooks.slime_logging() is None and hooks.slime_logging() is None
    warnings_ = [r for r in caplog.records if "slime's logger is not importable" in r.getMessage()]
    assert len(warnings_) == 1 and "slime.utils.logging_utils" in warnings_[0].getMessage()

    logged = []  # slime v0.3.1 and earlier: slime.utils.{logging_utils,metric_utils}
    log_mod, step_mod = types.ModuleType("slime.utils.logging_utils"), types.ModuleType("slime.utils.metric_utils")
    log_mod.log = lambda args, data, step_key: logged.append((data, step_key))
    step_mod.compute_rollout_step = lambda args, rollout_id: rollout_id * 10
    for name, mod in (("slime", types.ModuleType("slime")), ("slime.utils", types.ModuleType("slime.utils")),
                      ("slime.utils.logging_utils", log_mod), ("slime.utils.metric_utils", step_mod)):
        monkeypatch.setitem(sys.modules, name, mod)
    hooks.reset()
    args = make_args(use_wandb=False)
    hooks.log_rollout_data(2, args, [], {}, 0.1)
    ((data, step_key),) = logged
    assert step_key == "rollout/step" and data["rollout/step"] == 20 and data["rollout/xvocab/samples"] == 0.0


def test_teacher_temperature_reaches_the_server_and_a_server_ignoring_it_is_warned_once(teacher, caplog):
    caplog.set_level(logging.WARNING, logger="slime_xvocab.hooks")
    cold = run_rollout(xargs(teacher.url, rollout_temperature=0.5, xvocab_credit_mode="exact"), rollout(Sample, 2))
    hooks.reset()
    plain = run_rollout(xargs(teacher.url, xvocab_credit_mode="exact"), rollout(Sample, 2))
    hook_warnings = [r for r in caplog.records if r.name == "slime_xvocab.hooks"]
    assert not any("input_logprob_temperature" in r.getMessage() for r in hook_warnings)
    for c, p in zip(cold, plain, strict=True):
        assert not np.allclose(np.asarray(c.teacher_log_probs), np.asarray(p.teacher_log_probs))

    class _Client:
        temperature = 0.5

    teacher = hooks._Teacher(spec=None, builder=None, client=_Client())
    ignored = type("Scores", (), {"temperature": 1.0, "url": "http://old-sglang/generate"})()
    hooks._check_temperature(teacher, ignored)
    hooks._check_temperature(teacher, ignored)
    (record,) = [
        r for r in caplog.records if r.name == "slime_xvocab.hooks" and "input_logprob_temperature" in r.getMessage()
    ]
    assert "http://old-sglang/generate" in record.getMessage() and "applied 1" in record.getMessage()


# ---------------------------------------------------------------------------------------------- hardening


@pytest.mark.parametrize("bad", [None, "missing", "short"])
def test_bad_rollout_log_probs_are_a_counted_fallback_not_a_crash(teacher, caplog, bad):
    caplog.set_level(logging.INFO, logger="slime_xvocab.hooks")
    args = xargs(teacher.url, xvocab_max_failed_fraction=1.0)
    samples = rollout(Sample, 2)
    broken = samples[0]
    if bad == "short":
        broken.rollout_log_probs = broken.rollout_log_probs[:-1]
    elif bad == "missing":
        del broken.rollout_log_probs
    else:
        broken.rollout_log_probs = None
    samples = run_rollout(args, samples)
    entry = samples[0].metadata["xvocab"]
    assert entry["failed"] is True and "rollout_log_probs" in entry["error"] and "index=0" in entry["error"]
    assert len(samples[0].teacher_log_probs) == samples[0].response_length
    assert samples[1].metadata["xvocab"]["failed"] is False
    hooks.log_rollout_data(0, args, samples, None, 0.0)
    metrics = logged(caplog, "rollout")
    assert metrics["rollout/xvocab/failures/invalid_sample"] == 1 and metrics["rollout/xvocab/teacher_failures"] == 1
    hooks.post_process_rewards(args, samples)
    assert logged(caplog, "post-process")["rollout/xvocab/fallback_samples"] == 1
    samples = rollout(Sample, 1)
    samples[0].rollout_log_probs = None
    with pytest.raises(SampleError, match=r"(?s)sample \(group_index=0, index=0\).*rollout_log_probs is None"):
        run_rollout(xargs(teacher.url, xvocab_fallback="error"), samples)


def test_retries_of_failed_samples_are_counted(dead_url, caplog):
    caplog.set_level(logging.INFO, logger="slime_xvocab.hooks")
    args = xargs(
        dead_url, xvocab_startup_probe=False, xvocab_max_failed_fraction=1.0, xvocab_max_retries=2,
        xvocab_retry_budget_s=30.0,
    )
    samples = run_rollout(args, rollout(Sample))
    hooks.log_rollout_data(0, args, samples, None, 0.0)
    metrics = logged(caplog, "rollout")
    assert metrics["rollout/xvocab/teacher_retries"] == 4 * 2  # was 0: failed samples' retries were dropped
    assert metrics["rollout/xvocab/teacher_requests"] == 4 * 3
    assert metrics["rollout/xvocab/teacher_attempt_failures/connection"] == 4 * 3
    assert metrics["rollout/xvocab/failures/teacher_unavailable"] == 4


def test_startup_probe_stops_a_dead_teacher_at_the_first_call(dead_url):
    args = xargs(dead_url, xvocab_retry_budget_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(TeacherError, match=r"start-up probe: no teacher endpoint answered /health_generate"):
        run_rollout(args, rollout(Sample, 4))
    assert time.monotonic() - t0 < 10


def test_startup_probe_checks_the_context_limit_against_the_server(teacher):
    info = httpx.get(teacher.url + "/server_info").json()
    args = xargs(teacher.url, xvocab_max_teacher_tokens=info["max_req_input_len"] + 1)
    with pytest.raises(ConfigError, match=r"xvocab_max_teacher_tokens=\d+ is more than the teacher accepts"):
        run_rollout(args, rollout(Sample, 1))


def test_url_credentials_never_reach_logs_or_sample_errors(caplog):
    caplog.set_level(logging.INFO)
    url = f"http://bob:hunter22@127.0.0.1:{free_port()}"
    args = xargs(url, xvocab_startup_probe=False, xvocab_max_failed_fraction=0.0)
    samples = run_rollout(args, rollout(Sample, 2))
    with pytest.raises(TeacherError) as info:
        hooks.post_process_rewards(args, samples)
    assert "hunter22" not in str(info.value) and "http://***@127.0.0.1" in str(info.value)
    assert all("hunter22" not in s.metadata["xvocab"]["error"] for s in samples)
    assert "hunter22" not in caplog.text and "***@127.0.0.1" in caplog.text


def test_bad_tokenizer_path_is_a_config_error_at_the_first_call(teacher):
    args = xargs(teacher.url, xvocab_teacher_tokenizer="/nonexistent/teacher-tokenizer")
    with pytest.raises(ConfigError, match=r"could not load the teacher tokenizer .*xvocab_teacher_tokenizer"):
        run_rollout(args, rollout(Sample, 2))
