"""Dense targets against an exact oracle, and under random Unicode.

The oracle (tests/oracle_teacher.py) is a teacher whose whole distribution is a handful of designed responses
in real tokenizers; the teacher's distribution over the student's next token follows by brute-force
marginalisation over those responses in the student's own canonical tokens (``oracle_next_distribution``).
No plugin code computes it.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from oracle_teacher import CanonicalTeacher, canonical_ids, oracle_next_distribution
from test_credit import ALPHABET, KNOWN_LIMITS, LOCAL, RESPONSE_SETS, builder_for, random_top_k, student_eot, usable

from slime_xvocab.credit import student_extensions, student_token_credit
from slime_xvocab.dense import DenseTargets, dense_targets, identity_dense_targets, student_projection

PAIRS = list(itertools.permutations(LOCAL, 2))
# Sets where every teacher candidate spells its student token whatever follows it: there the projection is
# exact and the targets must equal the oracle up to the tail. On the other sets (digits, CJK, indentation) a
# candidate off the observed path can grow into a longer student token with bytes the teacher never scored;
# benchmarks/bench_dense.py measures that first-order error.
EXACT_SETS = ("english", "hello", "crossing", "emoji")


def targets_for(builder, responses, text: str, ends: bool, k: int | None = None, top_k: int = 64):
    s_ids = canonical_ids(builder.student_tokenizer, text) + ([student_eot(builder)] if ends else [])
    view = builder.build("Say something.", s_ids)
    teacher = CanonicalTeacher(builder.teacher_tokenizer, responses, builder.teacher_eot_ids[0])
    lps, top = teacher.score(view.response_ids, k)
    ext = student_extensions(builder.student_tokenizer, builder.student_table)
    proj = student_projection(builder.student_tokenizer, builder.student_table)
    got = dense_targets(view, lps, top, proj, ext, builder.teacher_table, top_k=top_k,
                        teacher_end_ids=builder.teacher_eot_ids, student_end_id=student_eot(builder))
    return s_ids, view, lps, top, got


def as_dict(targets: DenseTargets, j: int) -> dict[int, float]:
    return {int(t): float(np.exp(lp)) for t, lp in zip(targets.ids[j], targets.log_probs[j]) if t >= 0}


def distance(got: dict, want: dict) -> tuple[float, float]:
    """(total absolute difference, largest over-claim of a listed token)."""
    keys = set(got) | set(want)
    return (sum(abs(got.get(t, 0.0) - want.get(t, 0.0)) for t in keys),
            max([got[t] - want.get(t, 0.0) for t in got] + [0.0]))


@pytest.mark.parametrize("student,teacher", PAIRS)
def test_targets_match_the_exact_oracle_up_to_the_tail(student, teacher):
    """Full support: every position has a target, the listed tokens never claim more than the oracle, and
    all that differs from the oracle is in the tail bucket (exact when the tail is empty)."""
    builder = builder_for(student, teacher)
    eot = student_eot(builder)
    checked = 0
    for name in EXACT_SETS:
        responses = RESPONSE_SETS[name]
        if not usable(builder, responses):
            continue
        for text in responses:
            s_ids, _, _, _, got = targets_for(builder, responses, text, True)
            got.check(len(s_ids))
            assert got.valid.all()
            for j in range(len(s_ids)):
                want = oracle_next_distribution(builder.student_tokenizer, responses, text, j, eot)
                mine = as_dict(got, j)
                assert sum(mine.values()) + float(got.tail[j]) == pytest.approx(1.0, abs=1e-5)
                err, over = distance(mine, want)
                assert over < 1e-5 and err <= float(got.tail[j]) + 1e-5, (name, text, j, mine, want)
                checked += 1
    assert checked >= 30


@pytest.mark.parametrize("student,teacher", PAIRS)
def test_the_token_the_student_wrote_gets_the_oracle_probability_and_the_credit_value(student, teacher):
    """On every set, the realized token's target is the oracle's probability of it, and exp of its
    student_token credit: the dense and the sampled-token signals agree where both exist."""
    builder = builder_for(student, teacher)
    eot = student_eot(builder)
    ext = student_extensions(builder.student_tokenizer, builder.student_table)
    checked = 0
    for name, responses in RESPONSE_SETS.items():
        if not usable(builder, responses):
            continue
        for text in responses:
            if (student, name, text) in KNOWN_LIMITS or (student == "mistral_tekken" and name == "cjk"):
                continue
            s_ids, view, lps, top, got = targets_for(builder, responses, text, True)
            credit = student_token_credit(view, lps, top, np.full(len(s_ids), -0.7), ext, builder.teacher_table)
            for j, tok in enumerate(s_ids):
                want = oracle_next_distribution(builder.student_tokenizer, responses, text, j, eot).get(tok, 0.0)
                assert as_dict(got, j).get(tok, 0.0) == pytest.approx(want, abs=1e-5), (name, text, j)
                assert np.log(max(want, 1e-30)) == pytest.approx(float(credit.values[j]), abs=1e-4)
                checked += 1
    assert checked >= 40


def test_the_worked_case():
    """docs/dense.md: Qwen3 student <- Llama-3.1 teacher, " the cat"."""
    builder = builder_for("qwen3", "llama3_1")
    tok = builder.student_tokenizer
    the_cat = {" the cat": 0.5 * 0.4, " the dog": 0.5 * 0.6, " there": 0.3, " then": 0.2}
    s_ids, _, _, _, got = targets_for(builder, the_cat, " the cat", True)
    first = {tok.decode([t]): round(p, 6) for t, p in as_dict(got, 0).items()}
    assert first == {" the": 0.5, " there": 0.3, " then": 0.2}
    second = {tok.decode([t]): round(p, 6) for t, p in as_dict(got, 1).items()}
    assert second == {" cat": 0.4, " dog": 0.6}
    assert as_dict(got, 2) == pytest.approx({student_eot(builder): 1.0})
    assert got.tail.max() < 1e-6


def test_digits_inside_a_teacher_token():
    """Qwen3 writes "26" as "2", "6"; Llama-3.1 as one token. Between "2" and "6" the target comes from the
    teacher's candidates at the token that crosses the point; "2" then end of turn is another path whose
    next token the teacher never scored: tail."""
    builder = builder_for("qwen3", "llama3_1")
    tok = builder.student_tokenizer
    digits = {"26": 0.7, "2": 0.1, "27": 0.1, "3": 0.1}
    _, _, _, _, got = targets_for(builder, digits, "26", True)
    assert {tok.decode([t]): round(p, 6) for t, p in as_dict(got, 0).items()} == {"2": 0.9, "3": 0.1}
    assert {tok.decode([t]): round(p, 6) for t, p in as_dict(got, 1).items()} == {"6": round(7 / 9, 6),
                                                                                  "7": round(1 / 9, 6)}
    assert float(got.tail[1]) == pytest.approx(1 / 9, abs=1e-6)


def test_a_rarely_taken_prefix_is_not_read_as_certain():
    """The student wrote "2", "6" where the teacher mostly says "3"; its top-1 lists "3" only, so the observed
    "26" is the one path through "2" the answer shows. Unlisted tokens that start with "2" ("2" + end of turn,
    "27") may carry up to the unlisted mass: it joins the tail, and "6" is not claimed above the oracle (read
    from the observed path alone it would get probability 1)."""
    builder = builder_for("qwen3", "llama3_1")
    tok = builder.student_tokenizer
    digits = {"3": 0.6, "2": 0.3, "26": 0.05, "27": 0.05}
    s_ids, _, _, _, got = targets_for(builder, digits, "26", True, k=1)
    want = oracle_next_distribution(tok, digits, "26", 1, student_eot(builder))
    mine = as_dict(got, 1)
    six = tok.convert_tokens_to_ids("6")
    assert mine.keys() == {six}
    assert mine[six] <= want[six] + 1e-6
    # the bound: unlisted mass 1 - 0.6 - 0.05 at the first position, all of which could start with "2"
    assert mine[six] == pytest.approx(0.05 / (0.05 + 0.35), abs=1e-5)
    assert float(got.tail[1]) == pytest.approx(0.35 / 0.4, abs=1e-5)


@pytest.mark.parametrize("family", ["llama3_1", "gemma3"])
def test_token_prefix_counts_match_a_scan_of_the_vocabulary(family):
    from slime_xvocab.dense import token_prefixes

    builder = builder_for("qwen3", family)
    table = builder.teacher_table
    blob = table.blob.tobytes()
    spelled = {blob[table.offsets[i]:table.offsets[i + 1]] for i in range(table.vocab_size)} - {b""}
    rng = np.random.default_rng(0)
    words = sorted(spelled)
    prefixes = [b"4", b"43", b" the", b" th", b"\xff", b"\xe4\xbd", b"zzzzzzzzzz", b"\xff\xff"]
    prefixes += [w[: int(rng.integers(1, len(w) + 1))] for w in rng.choice(words, 40)]
    want = [sum(w.startswith(p) for w in spelled) for p in prefixes]  # brute force: scan every token
    counter = token_prefixes(table)
    assert counter.count(prefixes).tolist() == want
    assert counter.count(prefixes[::-1]).tolist() == want[::-1]  # the second time from the cache


def test_top_k_keeps_the_most_likely_and_the_rest_joins_the_tail():
    builder = builder_for("qwen3", "llama3_1")
    the_cat = {" the cat": 0.2, " the dog": 0.3, " there": 0.3, " then": 0.2}
    _, _, _, _, got = targets_for(builder, the_cat, " the cat", True, top_k=2)
    assert got.k == 2
    assert sorted(as_dict(got, 0).values()) == pytest.approx([0.3, 0.5])
    assert float(got.tail[0]) == pytest.approx(0.2, abs=1e-6)


def test_teacher_top_k_truncation_moves_mass_to_the_tail():
    builder = builder_for("llama3_1", "qwen3")
    responses = RESPONSE_SETS["english"]
    _, _, _, _, got = targets_for(builder, responses, " the cat", True, k=2)
    got.check()
    assert got.valid.all()
    assert float(got.tail[0]) > 0.2  # four first tokens, two listed
    np.testing.assert_allclose(np.exp(got.log_probs).sum(1, where=got.ids >= 0) + got.tail, 1.0, atol=1e-5)


def test_a_response_cut_by_length_has_targets_on_every_text_position():
    builder = builder_for("qwen3", "llama3_1")
    responses = RESPONSE_SETS["english"]
    s_ids, view, _, _, got = targets_for(builder, responses, " the cat", False)
    assert len(view.probe_ids) == 1 and got.valid.all()


def test_no_targets_without_top_k_or_for_rewritten_text():
    builder = builder_for("qwen3", "llama3_1")
    s_ids, view, lps, _, _ = targets_for(builder, RESPONSE_SETS["english"], " the cat", True)
    ext = student_extensions(builder.student_tokenizer, builder.student_table)
    proj = student_projection(builder.student_tokenizer, builder.student_table)
    none = dense_targets(view, lps, None, proj, ext, builder.teacher_table, top_k=4)
    assert not none.valid.any() and (none.ids == -1).all() and (none.tail == 1).all()
    none.check(len(s_ids))


def test_identity_targets_are_the_teacher_top_k():
    top = [(np.array([5, 7]), np.log([0.6, 0.3])), (np.array([1]), np.log([1.0]))]
    got = identity_dense_targets(top, 3, top_k=4)
    got.check(3)
    assert got.valid.tolist() == [True, True, False]
    assert as_dict(got, 0) == pytest.approx({5: 0.6, 7: 0.3})
    assert float(got.tail[0]) == pytest.approx(0.1, abs=1e-6)


@pytest.mark.parametrize("student,teacher", [("qwen3", "llama3_1"), ("llama3_1", "gemma3"),
                                             ("gemma3", "deepseek_v3"), ("mistral_tekken", "qwen3"),
                                             ("deepseek_v3", "mistral_tekken")])
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pieces=st.lists(ALPHABET, min_size=0, max_size=12), cut=st.integers(0, 40), ends=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
@example(pieces=["Cafe", "\u0301", " ", "\U0001F916", " ok"], cut=40, ends=True, seed=0)
@example(pieces=["Hi there! 早上好 🌞 flags 🇫🇷🇯🇵."], cut=12, ends=False, seed=4)
def test_targets_are_finite_distributions_of_the_right_shape(student, teacher, pieces, cut, ends, seed):
    builder = builder_for(student, teacher)
    ids = canonical_ids(builder.student_tokenizer, "".join(pieces))
    if cut < len(ids) and not ends:
        ids = ids[:cut]
    ids = ids + ([student_eot(builder)] if ends else [])
    view = builder.build("Q?", ids)
    lps, top = random_top_k(np.random.default_rng(seed), view.response_ids, builder.teacher_table.vocab_size)
    ext = student_extensions(builder.student_tokenizer, builder.student_table)
    proj = student_projection(builder.student_tokenizer, builder.student_table)
    got = dense_targets(view, lps, top, proj, ext, builder.teacher_table, top_k=8,
                        teacher_end_ids=builder.teacher_eot_ids, student_end_id=student_eot(builder))
    got.check(len(ids))
    listed = np.where(got.ids >= 0, np.exp(got.log_probs.astype(np.float64)), 0.0).sum(1)
    np.testing.assert_allclose((listed + got.tail)[got.valid], 1.0, atol=1e-5)
    for row in got.ids[got.valid]:
        row = row[row >= 0]
        assert len(np.unique(row)) == len(row) and (row < builder.student_table.vocab_size).all()
