"""Credit against an exact oracle, through the public reward hook, and under random Unicode.

The oracle (tests/oracle_teacher.py) is a teacher whose whole distribution is a handful of designed
responses in real tokenizers; the right value of every student token follows by brute-force
marginalisation over those responses in the student's own canonical tokens. No plugin code computes it.
"""

from __future__ import annotations

import asyncio
import itertools
import unicodedata

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from oracle_teacher import CanonicalTeacher, OracleServer, canonical_ids, oracle_values, spells
from slime_standin import Sample, make_args, make_sample

from slime_xvocab import hooks
from slime_xvocab.assets import load_tokenizer, tokenizer_dir
from slime_xvocab.credit import assign_credit, student_extensions, student_token_credit
from slime_xvocab.teacher_view import TeacherViewBuilder

# Families whose tokenizers decide a token boundary from the token and the next teacher token (GPT-2 merges
# digit runs and byte pieces by what comes later: its errors are reported by benchmarks/bench_credit.py).
LOCAL = ("qwen3", "llama3_1", "gemma3", "deepseek_v3", "mistral_tekken")
RESPONSE_SETS = {
    "english": {" the cat": 2, " the dog": 3, " there": 3, " then": 2, " theory": 1, " them all": 1},
    "digits": {"26": 7, "2": 1, "27": 1, "3": 1, "2614": 2, "261": 1, "12345": 1, "1234": 1},
    "cjk": {" 你们好": 3, " 你好": 2, "你好吗": 2, " 你们": 1, "你": 1},
    "emoji": {"🎉🥳": 2, "🎉": 1, "🎈 party": 2, "🥳": 1, "👨‍👩‍👧": 1},
    "indent": {"def f():\n    return 1\n": 3, "def f():\n        return 1\n": 1, "def f():\n\treturn 1\n": 1,
               "def f(): pass\n": 1},
    "crossing": {"347 + 85 = 432": 3, "347 + 85 = 43": 1, "3478": 1, "34 + 85": 1},
    "hello": {"Hello, world!": 2, "Hello world": 1, "Hell": 1, "Hello, worlds": 1},
}
# Where the student's tokenization depends on bytes past the teacher's next token: Mistral Tekken writes
# "你好" as one token but "你好吗" as "你", "好吗"; a top-k sees only "好". Documented in docs/alignment.md.
KNOWN_LIMITS = {("mistral_tekken", "cjk", "你")}


def builder_for(student: str, teacher: str) -> TeacherViewBuilder:
    kwargs: dict = {"probe_next": True}
    if not load_tokenizer(teacher).chat_template:
        kwargs["prompt_format"] = "completion"
    if teacher == "qwen3":
        kwargs["template_kwargs"] = {"enable_thinking": False}
    return TeacherViewBuilder(load_tokenizer(student), load_tokenizer(teacher), **kwargs)


def student_eot(builder: TeacherViewBuilder) -> int:
    return min(builder.student_end_ids)


def usable(builder: TeacherViewBuilder, responses) -> bool:
    """Both tokenizers spell every response exactly with their plain encode (else the oracle is off)."""
    return all(
        spells(builder.teacher_table, canonical_ids(builder.teacher_tokenizer, w), w)
        and spells(builder.student_table, canonical_ids(builder.student_tokenizer, w), w)
        for w in responses
    )


def default_credit(builder, responses, text: str, ends: bool, k: int | None = None):
    s_ids = canonical_ids(builder.student_tokenizer, text) + ([student_eot(builder)] if ends else [])
    view = builder.build("Say something.", s_ids)
    teacher = CanonicalTeacher(builder.teacher_tokenizer, responses, builder.teacher_eot_ids[0])
    lps, top = teacher.score(view.response_ids, k)
    ext = student_extensions(builder.student_tokenizer, builder.student_table)
    return view, lps, top, student_token_credit(view, lps, top, np.full(len(s_ids), -0.7), ext, builder.teacher_table)


# ---------------------------------------------------------------------------------------------- oracle


@pytest.mark.parametrize("student,teacher", list(itertools.permutations(LOCAL, 2)))
def test_default_matches_the_exact_oracle_with_full_support(student, teacher):
    builder = builder_for(student, teacher)
    checked = 0
    for name, responses in RESPONSE_SETS.items():
        if not usable(builder, responses):
            continue
        for text in responses:
            for ends in (True, False):
                if (student, name, text) in KNOWN_LIMITS:
                    continue
                _, _, _, got = default_credit(builder, responses, text, ends)
                want = oracle_values(builder.student_tokenizer, responses, text, ends)
                assert got.scored.all()
                np.testing.assert_allclose(got.values, want, atol=1e-6, err_msg=f"{name} {text!r} ends={ends}")
                assert got.clamped == 0
                checked += 1
    assert checked >= 40


def test_the_worked_cases():
    """docs/alignment.md's cases, Qwen3 student <- Llama-3.1 teacher."""
    builder = builder_for("qwen3", "llama3_1")
    the_cat = {" the cat": 0.5 * 0.4, " the dog": 0.5 * 0.6, " there": 0.3, " then": 0.2}
    np.testing.assert_allclose(default_credit(builder, the_cat, " the cat", True)[3].values,
                               [np.log(0.5), np.log(0.4), 0.0], atol=1e-6)
    digits = {"26": 0.7, "2": 0.1, "27": 0.1, "3": 0.1}
    np.testing.assert_allclose(default_credit(builder, digits, "26", True)[3].values,
                               [np.log(0.9), np.log(0.7 / 0.9), 0.0], atol=1e-6)
    np.testing.assert_allclose(default_credit(builder, digits, "2", False)[3].values, [np.log(0.9)], atol=1e-6)


def test_a_realized_token_outside_the_top_k_still_gets_its_value():
    builder = builder_for("qwen3", "llama3_1")
    responses = {" the cat": 0.5, " there": 0.3, " then": 0.2}
    view, lps, top, got = default_credit(builder, responses, " then", True, k=2)  # top-2: " the", " there"
    assert builder.teacher_tokenizer.convert_tokens_to_ids("Ġthen") not in top[0][0]
    np.testing.assert_allclose(got.values, oracle_values(builder.student_tokenizer, responses, " then", True),
                               atol=1e-6)
    assert got.top_mass < 1.0  # the tail is reported


def test_an_unscored_end_of_turn_charges_nothing_to_the_last_token():
    builder = TeacherViewBuilder(load_tokenizer("qwen3"), load_tokenizer("llama3_1"), end_of_turn="unscored",
                                 probe_next=True)
    the_cat = {" the cat": 0.2, " the dog": 0.3, " there": 0.3, " then": 0.2}
    s_ids = canonical_ids(builder.student_tokenizer, " the cat") + [student_eot(builder)]
    view = builder.build("Say something.", s_ids)
    assert not view.eot_mapped and len(view.probe_ids) == 1
    llama = builder.teacher_tokenizer
    lps, top = CanonicalTeacher(llama, the_cat, llama.convert_tokens_to_ids("<|eot_id|>")).score(view.response_ids)
    ext = student_extensions(builder.student_tokenizer, builder.student_table)
    got = student_token_credit(view, lps, top, np.full(3, -0.7), ext, builder.teacher_table)
    np.testing.assert_allclose(got.values, [np.log(0.5), np.log(0.4), -0.7], atol=1e-6)
    assert got.scored.tolist() == [True, True, False]


class _NeverExtends:
    """The byte-level conditional (the old prefix split's target): no student token is ever extended."""

    def __call__(self, student_ids, cand_ids, offset, rem_start, rem_len):
        return np.zeros(len(student_ids), dtype=bool)


def mode_errors(builder, responses, text, ends, k) -> dict[str, float]:
    """Mean |value - oracle| per student token for every mode; the student's own log-probs (what `chunk` splits
    by and every mode keeps where it has no value) are a fixed random draw."""
    view, lps, top, got = default_credit(builder, responses, text, ends, k)
    want = oracle_values(builder.student_tokenizer, responses, text, ends)
    student = -np.random.default_rng(len(want)).exponential(0.7, len(want))
    byte = student_token_credit(view, lps, top, student, _NeverExtends(), builder.teacher_table).values
    out = {"student_token": got.values, "byte_prefix": byte}
    for mode, split in (("chunk", "uniform"), ("chunk", "proportional"), ("exact", "uniform")):
        name = mode if mode == "exact" else f"chunk/{split}"
        out[name] = assign_credit(view.alignment, lps, student, mode=mode, split=split)
    return {name: float(np.abs(v - want).mean()) for name, v in out.items()}


def wide_teacher(rng) -> dict[str, float]:
    """Many continuations (more than 20 candidates at the first positions): top-20 truncates."""
    words = ["the", "then", "there", "theory", "them", "these", "thesis", "theme", "thermal", "cat", "car",
             "cart", "carbon", "care", "cargo", "2", "26", "27", "261", "2614", "3", "30", "300", "你", "你们",
             "你好", "🎉", "party", "part", "partial", "on", "one", "once", "only", "onto", "x", "xy", "Hello"]
    out = {}
    for _ in range(80):
        text = " ".join(rng.choice(words, size=int(rng.integers(1, 4))))
        out[text] = out.get(text, 0.0) + float(rng.exponential())
    return out


def test_default_is_the_closest_mode_under_top_20_truncation():
    rng = np.random.default_rng(0)
    totals: dict[str, list[float]] = {}
    for student, teacher in [("qwen3", "llama3_1"), ("llama3_1", "qwen3"), ("gemma3", "deepseek_v3"),
                             ("deepseek_v3", "gemma3"), ("mistral_tekken", "llama3_1"), ("llama3_1", "gemma3")]:
        builder = builder_for(student, teacher)
        responses = wide_teacher(rng)
        assert usable(builder, responses)
        for text in list(responses)[:12]:
            for name, err in mode_errors(builder, responses, text, True, 20).items():
                totals.setdefault(name, []).append(err)
    mean = {name: float(np.mean(v)) for name, v in totals.items()}
    assert min(mean, key=mean.get) == "student_token", mean


# ---------------------------------------------------------------------------------------------- hooks


def oracle_args(url: str, **overrides):
    values = {
        "hf_checkpoint": str(tokenizer_dir("qwen3")),
        "xvocab_teacher_tokenizer": str(tokenizer_dir("llama3_1")),
        "xvocab_teacher_urls": url,
        "xvocab_max_retries": 0,
    }
    values.update(overrides)
    return make_args(**values)


def score_through_reward_func(responses: dict[str, float], text: str, ends: bool) -> np.ndarray:
    """One Qwen3 sample scored by the public reward hook against the oracle teacher on loopback."""
    qwen, llama = load_tokenizer("qwen3"), load_tokenizer("llama3_1")
    teacher = CanonicalTeacher(llama, responses, llama.convert_tokens_to_ids("<|eot_id|>"))
    messages = [{"role": "user", "content": "Say something."}]
    prompt = qwen.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    response = canonical_ids(qwen, text) + ([qwen.convert_tokens_to_ids("<|im_end|>")] if ends else [])
    sample = make_sample(
        Sample, prompt_ids=qwen.encode(prompt, add_special_tokens=False), response_ids=response,
        rollout_log_probs=[-1.0] * len(response), metadata={"messages": messages}, index=0, group_index=0,
    )
    with OracleServer(teacher) as server:
        args = oracle_args(server.url)
        hooks.reset()
        try:
            asyncio.run(hooks.reward_func(args, sample))
        finally:
            hooks.reset()
        assert server.requests == 1
    assert not sample.metadata["xvocab"]["failed"], sample.metadata["xvocab"]["error"]
    return sample.teacher_log_probs.numpy()


def test_reward_func_gives_the_worked_case_values():
    the_cat = {" the cat": 0.5 * 0.4, " the dog": 0.5 * 0.6, " there": 0.3, " then": 0.2}
    np.testing.assert_allclose(score_through_reward_func(the_cat, " the cat", True), [-0.693147, -0.916291, 0.0],
                               atol=1e-5)
    cut = score_through_reward_func({"26": 0.7, "2": 0.1, "27": 0.1, "3": 0.1}, "2", False)
    np.testing.assert_allclose(cut, [np.log(0.9)], atol=1e-5)  # -0.105: no charge for "the text ends here"


def test_non_finite_credit_becomes_a_counted_fallback(monkeypatch, caplog):
    the_cat = {" the cat": 0.2, " the dog": 0.3, " there": 0.3, " then": 0.2}
    real = hooks._credit

    def broken(*a, **k):
        result = real(*a, **k)
        values = result.values.copy()
        values[0] = np.nan
        return type(result)(values, result.scored, result.top_mass, result.clamped)

    monkeypatch.setattr(hooks, "_credit", broken)
    qwen = load_tokenizer("qwen3")
    teacher = CanonicalTeacher(load_tokenizer("llama3_1"), the_cat, 128009)
    messages = [{"role": "user", "content": "Say something."}]
    response = canonical_ids(qwen, " the cat")
    sample = make_sample(Sample, prompt_ids=[1, 2], response_ids=response, rollout_log_probs=[-1.0, -2.0],
                         metadata={"messages": messages}, index=3, group_index=1)
    with OracleServer(teacher) as server:
        args = oracle_args(server.url, xvocab_max_failed_fraction=1.0)
        hooks.reset()
        asyncio.run(hooks.reward_func(args, sample))
        meta = sample.metadata["xvocab"]
        assert meta["failed"] and meta["error"].startswith("NonFiniteCreditError")
        assert meta["stats"]["unaligned/non_finite"] == len(response)
        np.testing.assert_array_equal(sample.teacher_log_probs.numpy(), np.float32([-1.0, -2.0]))
        assert "index=3" in caplog.text
        # Values that turn non-finite after the hook (someone else's code) never pass the post-process.
        sample.teacher_log_probs[1] = float("inf")
        sample.metadata["xvocab"] = {}
        hooks.post_process_rewards(args, [sample])
        np.testing.assert_array_equal(sample.teacher_log_probs.numpy(), np.float32([-1.0, -2.0]))
        assert sample.metadata["xvocab"]["failed"]
        hooks.reset()


# ---------------------------------------------------------------------------------------------- properties

ALPHABET = st.sampled_from(
    list("aZ09 .,-'\t\n\r") + ["\r\n", "  ", "    ", "\u0301", "\u0300", "\u200d", "\u200f", "\u202e", "\x81", "\x84",
                               "\x00", "\u02a9", "\uff5c", "\u2581", "é", "你", "们", "東京", "🤖", "🎉", "👨‍👩‍👧",
                               "🇫🇷", "<|eot_id|>", "<|im_end|>", "<｜end▁of▁sentence｜>", "<end_of_turn>",
                               "\U0001F916", "\U00010348", "ﬁ", "Ⅻ", "２"]
)
PROPERTY_PAIRS = list(itertools.permutations(LOCAL, 2))


def random_top_k(rng, response_ids, vocab: int, k: int = 20):
    """A teacher answer: the observed token plus random candidates, log-probs summing to at most 1."""
    lps, top = [], []
    for tok in response_ids:
        ids = np.unique(np.append(rng.integers(0, vocab, size=k - 1), tok))[:k]
        p = rng.dirichlet(np.full(len(ids) + 1, 0.5))[: len(ids)]  # leave some tail mass
        p = np.maximum(p, 1e-12)
        top.append((ids.astype(np.int64), np.log(p)))
        lps.append(float(np.log(p[ids == tok][0])))
    return np.array(lps), top


@pytest.mark.parametrize("student,teacher", PROPERTY_PAIRS)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pieces=st.lists(ALPHABET, min_size=0, max_size=14), cut=st.integers(0, 40), ends=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
@example(pieces=["Cafe", "\u0301", " ", "\U0001F916", " ok"], cut=40, ends=True, seed=0)
@example(pieces=["\x81", "A", "\u0300"], cut=40, ends=True, seed=1)
@example(pieces=["\u02a9", "A", "\u0300"], cut=40, ends=False, seed=2)
@example(pieces=["\x84", "<｜end▁of▁sentence｜>"], cut=40, ends=True, seed=3)
@example(pieces=["Hi there! 早上好 🌞 flags 🇫🇷🇯🇵."], cut=12, ends=False, seed=4)
def test_every_mode_gives_finite_log_probs_of_the_right_length(student, teacher, pieces, cut, ends, seed):
    builder = builder_for(student, teacher)
    text = "".join(pieces)
    ids = canonical_ids(builder.student_tokenizer, text)
    rng = np.random.default_rng(seed)
    if cut < len(ids) and not ends:  # cut by length, possibly inside a character
        ids = ids[:cut]
    ids = ids + ([student_eot(builder)] if ends else [])
    view = builder.build("Q?", ids)
    lps, top = random_top_k(rng, view.response_ids, builder.teacher_table.vocab_size)
    student_lp = -rng.exponential(1.0, len(ids))
    ext = student_extensions(builder.student_tokenizer, builder.student_table)
    result = student_token_credit(view, lps, top, student_lp, ext, builder.teacher_table)
    values = {"student_token": result.values}
    for mode, split in (("chunk", "uniform"), ("chunk", "proportional"), ("exact", "uniform")):
        values[f"{mode}/{split}"] = assign_credit(view.alignment, lps, student_lp, mode=mode, split=split)
    for name, v in values.items():
        assert v.shape == (len(ids),) and np.isfinite(v).all(), name
        unscored = view.alignment.student_chunk < 0
        np.testing.assert_array_equal(v[unscored], student_lp[unscored].astype(np.float32))
    assert (result.values[result.scored] <= 0).all()  # log-probs, as documented
    fully = view.exact_bytes and result.scored.all() and view.eot_mapped and view.alignment.num_chunks
    if fully and result.clamped == 0 and len(view.probe_ids) == 0:
        # Documented: over an aligned answer that ends its turn the values telescope to the teacher's total.
        assert float(result.values.astype(np.float64).sum()) == pytest.approx(float(lps.sum()), abs=1e-3)


@pytest.mark.parametrize("words_above", [0, 1 << 30])
def test_match_lengths_equal_a_plain_count(words_above, monkeypatch):
    """_match_lengths (eight bytes at a time, or byte by byte for few bytes: both forced here) against a plain
    count of the leading bytes each candidate shares with the text from its position's start, on random blobs
    and texts with long tokens, candidates that run past the text's end, empty tokens and positions at the end."""
    from slime_xvocab import credit
    from slime_xvocab.credit import _Candidates, _match_lengths

    monkeypatch.setattr(credit, "_WORDS_ABOVE", words_above)

    rng = np.random.default_rng(9)
    for _ in range(300):
        text = rng.integers(0, 3, size=rng.integers(0, 60)).astype(np.uint8)  # 3 symbols: long agreements
        pieces = [rng.integers(0, 3, size=rng.integers(0, 26)).astype(np.uint8) for _ in range(40)]
        for piece in pieces[:10]:  # some candidates copy the text, some run past its end
            at = int(rng.integers(0, len(text) + 1))
            piece[: max(0, min(len(piece), len(text) - at))] = text[at:at + len(piece)]
        blob = np.concatenate(pieces)
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in pieces])])
        n_pos = int(rng.integers(1, 8))
        starts = np.sort(rng.integers(0, len(text) + 1, size=n_pos))
        ids = rng.integers(0, len(pieces), size=int(rng.integers(0, 50)))
        pos = np.sort(rng.integers(0, n_pos, size=len(ids)))
        cands = _Candidates(pos, ids, np.zeros(len(ids)), np.zeros(len(ids), bool), offsets[ids],
                            offsets[ids + 1] - offsets[ids], np.searchsorted(pos, np.arange(n_pos + 1)), 1.0)
        want = []
        for p, i in zip(pos.tolist(), ids.tolist()):
            piece, rest = pieces[i], text[starts[p]:]
            k = 0
            while k < len(piece) and k < len(rest) and piece[k] == rest[k]:
                k += 1
            want.append(k)
        assert _match_lengths(cands, starts, text, blob).tolist() == want


REWRITTEN_SEEN: list[bool] = []  # which generated views had rewritten text (checked below)


def _plan_rewritten_per_chunk(data, alignment, s_spans, text_aligned, t_start, t_end, text, m):
    """The per-chunk loop credit._plan_rewritten replaced: one direct entry per chunk whose bytes match."""
    s_chunk = np.where(text_aligned, alignment.student_chunk, -1)
    t_chunk = np.where(np.arange(alignment.n_teacher) < m, alignment.teacher_chunk, -1)
    direct, uniform = [], []
    for c in range(alignment.num_chunks):
        toks, tpos = np.flatnonzero(s_chunk == c), np.flatnonzero(t_chunk == c)
        if not len(toks) or not len(tpos):
            continue
        ya, yb = int(t_start[tpos[0]]), int(t_end[tpos[-1]])
        xa, xb = int(s_spans[toks[0], 0]), int(s_spans[toks[-1], 1])
        if data[xa:xb] == text.tobytes()[ya:yb]:
            direct.append((toks, s_spans[toks, 0] - xa + ya, s_spans[toks, 1] - xa + ya))
        else:
            uniform.append((toks, ya, yb))
    return direct, uniform


@pytest.mark.parametrize("student,teacher", [("llama3_1", "qwen3"), ("qwen3", "gemma3"), ("gemma3", "llama3_1")])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pieces=st.lists(ALPHABET, min_size=1, max_size=14), ends=st.booleans())
@example(pieces=["Cafe", "\u0301", " na", "i", "\u0308", "ve"], ends=True)
def test_rewritten_plan_equals_the_per_chunk_plan(student, teacher, pieces, ends):
    """Where a teacher normaliser rewrote text, _plan_rewritten values all matching chunks in one vectorised
    pass: same tokens, byte positions and uniform chunks as a loop over the chunks, and _plan reads the same
    query positions with the same student tokens as it did with one entry per chunk."""
    from slime_xvocab.credit import _plan, _plan_rewritten

    builder = builder_for(student, teacher)
    ids = canonical_ids(builder.student_tokenizer, "".join(pieces)) + ([student_eot(builder)] if ends else [])
    view = builder.build("Q?", ids)
    REWRITTEN_SEEN.append(not view.exact_bytes)
    a, table = view.alignment, builder.teacher_table
    m = a.n_teacher - len(view.eot_ids) - len(view.probe_ids)
    t_ids = np.asarray(view.response_ids[:m], dtype=np.int64)
    text = np.frombuffer(table.bytes_of(t_ids), dtype=np.uint8)
    t_end = np.cumsum(table.lengths_of(t_ids))
    t_start = t_end - table.lengths_of(t_ids)
    s_ids, s_spans = view.student_ids, view.student_spans
    text_aligned = (s_spans[:, 1] > s_spans[:, 0]) & (a.student_chunk >= 0)
    prev = [max([j for j in range(i) if s_spans[j, 1] > s_spans[j, 0]], default=-1) for i in range(len(s_ids))]
    ext_before = np.array([s_ids[p] if p >= 0 else -1 for p in prev], dtype=np.int64)
    want_direct, want_uniform = _plan_rewritten_per_chunk(view.response_bytes, a, s_spans, text_aligned, t_start,
                                                          t_end, text, m)
    direct, uniform, _ = _plan_rewritten(view.response_bytes, a, s_spans, text_aligned, t_start, t_end, text, m,
                                         ext_before, s_ids)
    want_flat = [np.concatenate([entry[i] for entry in want_direct]).tolist() if want_direct else [] for i in range(3)]
    assert [direct[0][i].tolist() if direct else [] for i in range(3)] == want_flat
    got_uniform = [(uniform.positions[a:b].tolist(), y0, y1) for a, b, y0, y1 in zip(
        uniform.offsets[:-1].tolist(), uniform.offsets[1:].tolist(), uniform.y0.tolist(), uniform.y1.tolist())]
    assert got_uniform == [(t.tolist(), y0, y1) for t, y0, y1 in want_uniform]
    # _plan's first read of each position names its student token exactly as the per-chunk reads did.
    reads = [(y0, ext_before[p], y1, s_ids[p]) for p, y0, y1 in want_direct]
    reads += [(np.array([y0]), ext_before[p[:1]], np.array([y1]), s_ids[p[-1:]]) for p, y0, y1 in want_uniform]
    plan = _plan(view, a, s_spans, text_aligned, t_start, t_end, text, np.array(prev), s_ids, m)
    if reads and not view.exact_bytes:
        pos = np.concatenate([np.concatenate([r[0], r[2]]) for r in reads])
        ext = np.concatenate([np.concatenate([r[1], r[3]]) for r in reads])
        for y, e in zip(plan.queries.tolist(), plan.query_ext.tolist()):
            if y in pos.tolist():
                assert e == ext[pos.tolist().index(y)], (y, e)


@pytest.mark.parametrize("student", ["llama3_1", "gemma3"])
def test_rewritten_chunks_split_their_mass_evenly_chunk_by_chunk(student, teacher="qwen3"):
    """Each rewritten chunk (all valued at once) gets its teacher mass T, whatever the student's log-probs,
    split as value_j = s_j + (T - sum s) / n: checked one chunk at a time, with two student vectors. Qwen3's
    normaliser (NFC) rewrites the decomposed accents."""
    from slime_xvocab.credit import _plan

    builder = builder_for(student, teacher)
    ext = student_extensions(builder.student_tokenizer, builder.student_table)
    rng = np.random.default_rng(0)
    seen = 0
    texts = ["Café naïve résumé déjà vu", "Zoë's coöperative fiancée, über-ñandú. Ångström!", "e\u0301e\u0301 a\u0308"]
    for text in texts:
        ids = canonical_ids(builder.student_tokenizer, unicodedata.normalize("NFD", text))
        view = builder.build("Q?", ids + [student_eot(builder)])
        # A diffuse teacher: the observed token and 19 others at every position, Dirichlet probabilities.
        top = []
        for tok in view.response_ids:
            cands = np.unique(np.append(rng.integers(0, builder.teacher_table.vocab_size, 19), tok))
            top.append((cands.astype(np.int64), np.log(rng.dirichlet(np.ones(len(cands) + 1))[:-1])))
        lps = np.array([lp[ids == tok][0] for tok, (ids, lp) in zip(view.response_ids, top)])
        s1, s2 = -rng.exponential(1.0, len(view.student_ids)), -rng.exponential(1.0, len(view.student_ids))
        got1 = student_token_credit(view, lps, top, s1, ext, builder.teacher_table).values.astype(np.float64)
        got2 = student_token_credit(view, lps, top, s2, ext, builder.teacher_table).values.astype(np.float64)
        a, table = view.alignment, builder.teacher_table
        m = a.n_teacher - len(view.eot_ids) - len(view.probe_ids)
        t_ids = np.asarray(view.response_ids[:m], dtype=np.int64)
        t_end = np.cumsum(table.lengths_of(t_ids))
        s_spans = view.student_spans
        text_aligned = (s_spans[:, 1] > s_spans[:, 0]) & (a.student_chunk >= 0)
        prev = np.array([max([j for j in range(i) if s_spans[j, 1] > s_spans[j, 0]], default=-1)
                         for i in range(len(view.student_ids))])
        plan = _plan(view, a, s_spans, text_aligned, t_end - table.lengths_of(t_ids), t_end,
                     np.frombuffer(table.bytes_of(t_ids), dtype=np.uint8), prev, view.student_ids, m)
        chunks = plan.uniform
        for lo, hi in zip(chunks.offsets[:-1].tolist(), chunks.offsets[1:].tolist()):
            p = chunks.positions[lo:hi]
            if (got1[p] == 0).any() or (got2[p] == 0).any():
                continue  # a value above 0 was clamped: the split is checked where nothing was
            total = got1[p].sum()
            assert got2[p].sum() == pytest.approx(total, abs=1e-5)  # T does not depend on the student
            for got, s in ((got1, s1), (got2, s2)):
                np.testing.assert_allclose(got[p], s[p] + (total - s[p].sum()) / len(p), atol=1e-5)
            seen += 1
    assert seen >= 3  # the texts above do have rewritten chunks


def test_the_rewritten_plan_test_saw_rewritten_text():
    """The generated texts above include combining accents that a normalising teacher rewrites."""
    if not REWRITTEN_SEEN:
        pytest.skip("run together with test_rewritten_plan_equals_the_per_chunk_plan")
    assert any(REWRITTEN_SEEN)
