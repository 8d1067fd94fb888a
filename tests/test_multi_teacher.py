"""Several teachers with different tokenizers, routed per sample, through the public hooks.

Two oracle teachers (tests/oracle_teacher.py) run on loopback behind SGLang's scoring protocol: a Llama-3.1
teacher and a Gemma-3 teacher, each with its own designed distribution over the same responses. A Qwen3
student's samples carry ``metadata["source"]``; routes send them to one teacher, or to the 3:1 token-level
mixture of both. The mixture's right values come from brute force: the mixed teacher's probability of every
full student-token sequence is enumerated (the product of the weighted per-teacher next-token probabilities,
each marginalised over that teacher's responses in the student's canonical tokens), then marginalised over
the sequences that share each prefix. No plugin code computes them.
"""

from __future__ import annotations

import asyncio
import logging
import math

import numpy as np
import pytest
from oracle_teacher import CanonicalTeacher, OracleServer, canonical_ids, oracle_values, spells
from slime_standin import Sample, make_args, make_sample

from slime_xvocab import hooks
from slime_xvocab.assets import load_tokenizer, tokenizer_dir
from slime_xvocab.errors import TeacherError, TeacherUnavailable
from slime_xvocab.teacher_server import free_port
from slime_xvocab.teacher_view import TeacherViewBuilder

LLAMA_P = {" the cat": 2, " the dog": 3, " there": 3, " then": 2, " theory": 1, " them all": 1}
GEMMA_P = {" the cat": 1, " the dog": 1, " there": 1, " then": 4, " theory": 2, " them all": 3}
WEIGHTS = {"llama": 3.0, "gemma": 1.0}
ROUTES = {"math": "llama", "chat": "gemma", "mix": WEIGHTS}
EOT = -1  # the student's end of turn in the oracle's sequences


def eot_of(teacher: str) -> int:
    return TeacherViewBuilder(load_tokenizer("qwen3"), load_tokenizer(teacher)).teacher_eot_ids[0]


@pytest.fixture(scope="module")
def servers():
    llama = CanonicalTeacher(load_tokenizer("llama3_1"), LLAMA_P, eot_of("llama3_1"))
    gemma = CanonicalTeacher(load_tokenizer("gemma3"), GEMMA_P, eot_of("gemma3"))
    with OracleServer(llama) as a, OracleServer(gemma) as b:
        yield {"llama": a, "gemma": b}


@pytest.fixture(autouse=True)
def _fresh_hook_caches():
    hooks.reset()
    yield
    hooks.reset()


def margs(llama_url: str, gemma_url: str, gemma: dict | None = None, **overrides):
    teachers = [
        {"name": "llama", "tokenizer": str(tokenizer_dir("llama3_1")), "urls": llama_url},
        {"name": "gemma", "tokenizer": str(tokenizer_dir("gemma3")), "urls": [gemma_url], **(gemma or {})},
    ]
    values = {
        "hf_checkpoint": str(tokenizer_dir("qwen3")),
        "xvocab_teachers": teachers,
        "xvocab_teacher_route_key": "source",
        "xvocab_teacher_routes": ROUTES,
        "xvocab_max_retries": 0,
        "xvocab_max_failed_fraction": 1.0,
    }
    values.update(overrides)
    return make_args(**values)


def sample_of(text: str, ends: bool, source: str | None, index: int) -> Sample:
    qwen = load_tokenizer("qwen3")
    messages = [{"role": "user", "content": "Say something."}]
    prompt = qwen.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    response = canonical_ids(qwen, text) + ([qwen.convert_tokens_to_ids("<|im_end|>")] if ends else [])
    metadata = {"messages": messages} | ({"source": source} if source is not None else {})
    return make_sample(
        Sample, prompt_ids=qwen.encode(prompt, add_special_tokens=False), response_ids=response,
        rollout_log_probs=[-1.0] * len(response), metadata=metadata, index=index, group_index=index // 2,
    )


def score_all(args, samples: list) -> list:
    async def main():
        await asyncio.gather(*(hooks.reward_func(args, s) for s in samples))

    asyncio.run(main())
    return samples


def values_of(sample) -> np.ndarray:
    return sample.teacher_log_probs.numpy().astype(np.float64)


# ---------------------------------------------------------------------------------------------- the oracle


def mixture_oracle(student_tok, teachers: list[tuple[dict, float]], text: str, ends: bool) -> np.ndarray:
    """Student-token values of the token-level mixture teacher, by enumerating its sequence distribution."""
    texts = list(teachers[0][0])
    seqs = {w: tuple(canonical_ids(student_tok, w)) + (EOT,) for w in texts}
    probs = [({w: p / sum(resp.values()) for w, p in resp.items()}, weight) for resp, weight in teachers]
    total_w = sum(w for _, w in teachers)

    def teacher_mass(p: dict, prefix: tuple) -> float:
        return sum(q for w, q in p.items() if seqs[w][: len(prefix)] == prefix)

    def mixed_next(prefix: tuple, token: int) -> float:
        return sum(
            weight / total_w * teacher_mass(p, prefix + (token,)) / teacher_mass(p, prefix) for p, weight in probs
        )

    mixed = {}  # the mixture teacher's probability of each full student-token sequence
    for seq in set(seqs.values()):
        mixed[seq] = math.prod(mixed_next(seq[:j], seq[j]) for j in range(len(seq)))
    assert sum(mixed.values()) == pytest.approx(1.0, abs=1e-12)  # no mass leaves the enumerated support

    target = tuple(canonical_ids(student_tok, text)) + ((EOT,) if ends else ())

    def prefix_mass(j: int) -> float:
        return sum(q for seq, q in mixed.items() if seq[:j] == target[:j])

    return np.array([math.log(prefix_mass(j + 1) / prefix_mass(j)) for j in range(len(target))])


def test_the_responses_are_spelled_exactly_by_every_tokenizer():
    from slime_xvocab.token_bytes import token_bytes

    for name in ("qwen3", "llama3_1", "gemma3"):
        tok = load_tokenizer(name)
        table = token_bytes(tok)
        assert all(spells(table, canonical_ids(tok, w), w) for w in LLAMA_P), name


# ---------------------------------------------------------------------------------------------- routing


CASES = [(text, ends) for text in (" the cat", " then", " them all", " theory") for ends in (True, False)]


def test_routes_single_teachers_and_the_mixture_against_the_oracles(servers, caplog):
    qwen = load_tokenizer("qwen3")
    before = {k: s.requests for k, s in servers.items()}
    args = margs(servers["llama"].url, servers["gemma"].url)
    samples = []
    for source in ("math", "chat", "mix", "poetry", None):
        samples += [sample_of(text, ends, source, len(samples) + i) for i, (text, ends) in enumerate(CASES)]
    score_all(args, samples)
    for s in samples:
        meta = s.metadata["xvocab"]
        assert not meta["failed"], meta["error"]
    for s, (text, ends) in zip(samples, CASES * 5):
        source = s.metadata.get("source")
        got = values_of(s)
        llama_want = oracle_values(qwen, LLAMA_P, text, ends)
        gemma_want = oracle_values(qwen, GEMMA_P, text, ends)
        if source == "chat":
            np.testing.assert_allclose(got, gemma_want, atol=1e-5, err_msg=f"{source} {text!r} {ends}")
            assert s.metadata["xvocab"]["route"] == ["gemma"]
        elif source == "mix":
            want = mixture_oracle(qwen, [(LLAMA_P, 3.0), (GEMMA_P, 1.0)], text, ends)
            np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"{source} {text!r} {ends}")
            assert s.metadata["xvocab"]["route"] == ["llama", "gemma"]
        else:  # math, and the unrouted ones through the default teacher (the first)
            np.testing.assert_allclose(got, llama_want, atol=1e-5, err_msg=f"{source} {text!r} {ends}")
            assert s.metadata["xvocab"]["route"] == ["llama"]
        assert s.metadata["xvocab"]["stats"]["unrouted"] == float(source not in ROUTES)
        assert (got <= 0).all() and np.isfinite(got).all()
    # The mixture is neither teacher: on " then" the teachers disagree (llama 2/12, gemma 4/12 of the mass).
    mixed = next(s for s in samples if s.metadata.get("source") == "mix")
    assert not np.allclose(values_of(mixed), oracle_values(qwen, LLAMA_P, " the cat", True), atol=1e-3)
    n = len(CASES)
    assert servers["llama"].requests - before["llama"] == 4 * n  # math, mix, poetry, None
    assert servers["gemma"].requests - before["gemma"] == 2 * n  # chat, mix

    with caplog.at_level(logging.INFO, logger="slime_xvocab.hooks"):
        hooks.log_rollout_data(0, args, samples, None, 1.0)
        raw, _ = hooks.post_process_rewards(args, samples)
    rollout = logged(caplog, "rollout")
    assert rollout["rollout/xvocab/samples"] == 5 * n and rollout["rollout/xvocab/unrouted_samples"] == 2 * n
    assert rollout["rollout/xvocab/teacher/llama/samples"] == 4 * n
    assert rollout["rollout/xvocab/teacher/gemma/samples"] == 2 * n
    assert rollout["rollout/xvocab/teacher/gemma/teacher_requests"] == 2 * n
    assert rollout["rollout/xvocab/teacher_requests"] == 6 * n
    assert rollout["rollout/xvocab/teacher/gemma/covered_fraction"] == 1.0
    assert rollout["rollout/xvocab/teacher/llama/teacher_latency_p50_s"] > 0
    post = logged(caplog, "post-process")
    assert post["rollout/xvocab/teacher/gemma/failed_fraction"] == 0.0 and post["rollout/xvocab/fallback_samples"] == 0
    assert raw == [0.0] * len(samples)


def logged(caplog, what: str) -> dict:
    records = [
        r for r in caplog.records
        if r.name == "slime_xvocab.hooks" and isinstance(r.args, tuple) and r.args and r.args[0] == what
    ]
    assert records, f"no {what} metrics were logged"
    return records[-1].args[2]


# ---------------------------------------------------------------------------------------------- faults


def test_one_teacher_down_falls_back_its_samples_and_leaves_the_other_alone(servers, caplog):
    qwen = load_tokenizer("qwen3")
    dead = f"http://127.0.0.1:{free_port()}"
    args = margs(servers["llama"].url, dead, {"retry_budget_s": 0, "max_failed_fraction": 1.0},
                 xvocab_startup_probe=False)
    samples = [sample_of(" then", True, source, i) for i, source in enumerate(["math", "chat", "mix", "chat"])]
    score_all(args, samples)
    math_s, chat_s, mix_s, _ = samples
    llama_want = oracle_values(qwen, LLAMA_P, " then", True)
    np.testing.assert_allclose(values_of(math_s), llama_want, atol=1e-5)
    # The mixed sample is scored by the teacher that answered (weights renormalised), not a fallback.
    np.testing.assert_allclose(values_of(mix_s), llama_want, atol=1e-5)
    assert not mix_s.metadata["xvocab"]["failed"] and mix_s.metadata["xvocab"]["teachers"]["gemma"]["failed"] == 1.0
    for s in (chat_s, samples[3]):
        meta = s.metadata["xvocab"]
        assert meta["failed"] and meta["error"].startswith("TeacherUnavailable") and "'gemma'" in meta["error"]
        np.testing.assert_array_equal(values_of(s), -1.0)  # the student's own log-probs: OPD delta 0
    with caplog.at_level(logging.INFO, logger="slime_xvocab.hooks"):
        hooks.log_rollout_data(0, args, samples, None, 1.0)
        hooks.post_process_rewards(args, samples)
    rollout, post = logged(caplog, "rollout"), logged(caplog, "post-process")
    assert rollout["rollout/xvocab/teacher/gemma/teacher_failures"] == 3
    assert rollout["rollout/xvocab/teacher/gemma/failures/teacher_unavailable"] == 3
    assert rollout["rollout/xvocab/teacher/llama/teacher_failures"] == 0
    assert rollout["rollout/xvocab/teacher_failures"] == 2  # samples that fell back
    assert post["rollout/xvocab/fallback_samples"] == 2 and post["rollout/xvocab/failed_fraction"] == 0.5
    assert post["rollout/xvocab/teacher/gemma/failed_fraction"] == 1.0
    assert post["rollout/xvocab/teacher/llama/failed_fraction"] == 0.0

    # Its own max_failed_fraction stops training, naming the teacher, even when the overall limit holds.
    hooks.reset()
    args = margs(servers["llama"].url, dead, {"retry_budget_s": 0, "max_failed_fraction": 0.5},
                 xvocab_startup_probe=False)
    samples = [sample_of(" then", True, source, i) for i, source in enumerate(["math", "math", "math", "mix"])]
    score_all(args, samples)
    assert not any(s.metadata["xvocab"]["failed"] for s in samples)
    with pytest.raises(TeacherError, match=r"teacher 'gemma' could not score 1 of the 1 samples routed to it"):
        hooks.post_process_rewards(args, samples)


def test_the_start_up_probe_names_the_teacher_that_is_down(servers):
    dead = f"http://127.0.0.1:{free_port()}"
    args = margs(servers["llama"].url, dead, {"retry_budget_s": 0})
    with pytest.raises(TeacherUnavailable, match=r"teacher 'gemma' \(xvocab_teachers\): start-up probe"):
        score_all(args, [sample_of(" then", True, "math", 0)])


def test_fallback_error_stops_on_a_teacher_failure(servers):
    dead = f"http://127.0.0.1:{free_port()}"
    args = margs(servers["llama"].url, dead, {"retry_budget_s": 0}, xvocab_startup_probe=False,
                 xvocab_fallback="error")
    with pytest.raises(TeacherUnavailable, match=r"sample \(group_index=0, index=0\)"):
        score_all(args, [sample_of(" then", True, "mix", 0)])


def test_each_teacher_has_its_own_view_builder_and_client(servers):
    args = margs(servers["llama"].url, servers["gemma"].url, {"max_concurrency": 3, "max_teacher_tokens": 512})
    llama, gemma = hooks.teacher_view_builder(args, "llama"), hooks.teacher_view_builder(args, "gemma")
    assert len(llama.teacher_tokenizer) == len(load_tokenizer("llama3_1"))
    assert len(gemma.teacher_tokenizer) == len(load_tokenizer("gemma3"))
    assert llama.student_tokenizer is gemma.student_tokenizer  # loaded once per process
    assert gemma.max_teacher_tokens == 512 and llama.max_teacher_tokens is None
    runtime = hooks._runtime(args)
    assert runtime.teachers["gemma"].client is not runtime.teachers["llama"].client
    assert runtime.teachers["gemma"].client.max_concurrency == 3
    assert runtime.teachers["llama"].extensions is runtime.teachers["gemma"].extensions  # built once
    assert hooks.teacher_view_builder(args) is llama


def test_a_teacher_without_a_value_at_a_position_abstains_there(servers):
    """Gemma's context ends inside the response: past its cut the mixture is Llama's value exactly, before it
    the 3:1 mixture of both; the scored positions come back as loss_mask with ``xvocab_unscored: mask``."""
    qwen, gemma_tok = load_tokenizer("qwen3"), load_tokenizer("gemma3")
    probe = sample_of(" them all", True, None, 0)
    n = probe.response_length
    full = TeacherViewBuilder(qwen, gemma_tok).build(probe.metadata["messages"], list(probe.tokens[-n:]))
    limit = len(full.input_ids) - 2  # the last teacher tokens do not fit
    args = margs(servers["llama"].url, servers["gemma"].url, {"max_teacher_tokens": limit}, xvocab_unscored="mask")
    samples = [sample_of(" them all", True, source, i) for i, source in enumerate(["math", "chat", "mix"])]
    score_all(args, samples)
    llama_s, gemma_s, mix_s = samples
    assert not any(s.metadata["xvocab"]["failed"] for s in samples)
    gemma_scored = np.array(gemma_s.loss_mask, dtype=bool)
    assert gemma_scored.any() and not gemma_scored.all()
    assert all(llama_s.loss_mask) and all(mix_s.loss_mask)  # the mixture scores where any teacher did
    lv, gv = values_of(llama_s), values_of(gemma_s)
    want = np.where(gemma_scored, np.log(0.75 * np.exp(lv) + 0.25 * np.exp(gv)), lv)
    np.testing.assert_allclose(values_of(mix_s), want, atol=1e-6)
    assert gemma_s.metadata["xvocab"]["stats"]["unaligned/teacher_context"] > 0
