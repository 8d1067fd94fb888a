"""The demo's ceiling teacher (exact marginalisation over every teacher path) and its deterministic start.

Untrained tiny models keep the teacher diffuse, so every teacher path (``12`` as one Llama-3 token or as ``1``
then ``2``) carries mass and the checks below are not trivially satisfied by one dominant path.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from slime_xvocab.demo.exact import ExactTeacher
from slime_xvocab.demo.models import ModelSize, build_model
from slime_xvocab.demo.opd import _new_lm
from slime_xvocab.demo.task import Problem, all_problems

SIZE = ModelSize(32, 1, 2, 64)
MSGS = Problem(3, 9).messages()


@pytest.fixture(scope="module", params=[("qwen3", "llama3_1"), ("llama3_1", "qwen3")],
                ids=["qwen3<-llama", "llama<-qwen3"])
def pair(request):
    student_family, teacher_family = request.param
    problems = all_problems(0, 9)
    teacher = _new_lm(teacher_family, problems, SIZE, seed=3)
    student = _new_lm(student_family, problems, SIZE, seed=4)
    with torch.no_grad():  # a flatter, less random teacher: scale its head so that several paths matter
        teacher.model.get_output_embeddings().weight.mul_(20.0)
    return student, teacher, ExactTeacher(teacher, student)


def _digit_tokens(lm) -> dict[str, int]:
    out = {}
    for real in lm.vocab.real_ids.tolist():
        piece = lm.tokenizer.decode([real])
        if piece.isascii() and piece.isdigit():
            out[piece] = real
    return out


def _segmentations(text: str, tokens: dict[str, int]):
    if not text:
        yield []
        return
    for w in range(1, min(3, len(text)) + 1):
        if text[:w] in tokens:
            for rest in _segmentations(text[w:], tokens):
                yield [tokens[text[:w]]] + rest


def test_values_sum_to_the_teachers_probability_of_the_answer_over_all_its_tokenizations(pair):
    student, teacher, exact = pair
    s_digits, t_digits = _digit_tokens(student), _digit_tokens(teacher)
    prompt = teacher.prompt_ids(MSGS)
    for answer in ("12", "7", "105"):
        resp = student.tokenizer.encode(answer, add_special_tokens=False) + [student.eot_id]
        assert all(student.tokenizer.decode([t]) in s_digits for t in resp[:-1])
        paths = list(_segmentations(answer, t_digits))
        with torch.no_grad():
            lps, mask = teacher.response_logprobs([prompt] * len(paths), [p + [teacher.eot_id] for p in paths])
        brute = float(torch.logsumexp((lps * mask).sum(-1).double(), 0))
        (score,) = exact.score([MSGS], [resp])
        assert len(paths) >= (2 if len(answer) > 1 and len(t_digits) > 10 else 1)
        assert np.isfinite(score.values).all()
        assert score.text_logprob == pytest.approx(brute, abs=1e-5)
        assert float(np.sum(score.values)) == pytest.approx(brute, abs=1e-5)


@pytest.mark.parametrize("prefix", ["", "4"])
def test_values_form_the_teachers_distribution_over_the_students_next_token(pair, prefix):
    """Summed over every token the student can write next (digits, end of turn, one non-digit standing for the
    rest), exp(value) is 1: the ceiling's target is a distribution over the student's tokens."""
    student, _, exact = pair
    s_digits = _digit_tokens(student)
    head = student.tokenizer.encode(prefix, add_special_tokens=False) if prefix else []
    if head and len(prefix) < 3 and any(len(s) > 1 for s in s_digits):
        head = [s_digits["400"]]  # a Llama-3 student: after "4" another digit would merge; use a 3-digit token
    nexts = [[t] for t in s_digits.values()] + [[student.eot_id]]
    junk = next(r for r in student.vocab.real_ids.tolist()
                if r != student.eot_id and not student.tokenizer.decode([r]).isdigit())
    nexts.append([junk])
    scores = exact.score([MSGS] * len(nexts), [head + n for n in nexts])
    total = sum(math.exp(sc.values[len(head)]) for sc in scores)
    assert total == pytest.approx(1.0, abs=1e-6)


def test_initialisation_depends_only_on_the_seed():
    """Recorded values: transformers' own init changed between minor versions; the demo's must not."""
    m = build_model("qwen3", 30, ModelSize(64, 1, 4, 256), 0)
    with torch.no_grad():
        total = sum(float(p.double().abs().sum()) for _, p in sorted(m.named_parameters()))
        first = m.get_input_embeddings().weight[0, :4].tolist()
    assert total == pytest.approx(1330.6387922048793, rel=1e-9)
    assert first == pytest.approx([-0.018340997397899628, -0.013997995294630527, 0.021975237876176834,
                                   0.03886635601520538], abs=1e-9)
    again = build_model("qwen3", 30, ModelSize(64, 1, 4, 256), 0)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), again.state_dict().values()))


def test_tiny_start_is_deterministic(tmp_path):
    """The tiny student (init + SFT) built twice from nothing is the same model, bit for bit."""
    from dataclasses import replace

    from slime_xvocab.demo.opd import TINY, DemoConfig, prepare_model

    cfg = replace(DemoConfig(), **TINY)
    torch.set_num_threads(1)
    a, _, cached_a = prepare_model(cfg, "student", tmp_path / "a", lambda s: None)
    b, _, cached_b = prepare_model(cfg, "student", tmp_path / "b", lambda s: None)
    assert not cached_a and not cached_b
    for (na, pa), (nb, pb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na


def test_dense_targets_are_distributions_that_agree_with_the_sampled_token_values(pair):
    student, _, exact = pair
    s_digits = _digit_tokens(student)
    resps = [student.tokenizer.encode(a, add_special_tokens=False) + [student.eot_id] for a in ("12", "7", "105")]
    resps.append([s_digits["4"], s_digits["2"]])  # truncated; for a Llama-3 student a non-canonical split
    dense = exact.dense_targets([MSGS] * len(resps), resps)
    scores = exact.score([MSGS] * len(resps), resps)
    for resp, d, sc in zip(resps, dense, scores):
        assert d["positions"] == list(range(len(resp)))
        for row, j in enumerate(d["positions"]):
            q = d["logq"][row]
            total = np.exp(q[~np.isnan(q)]).sum() + np.exp(d["log_tail"][row])
            assert total == pytest.approx(1.0, abs=1e-6), (resp, j)
            k = int(student.vocab.to_model([resp[j]])[0])
            if np.isfinite(q[k]):
                assert q[k] == pytest.approx(sc.values[j], abs=1e-5), (resp, j)


def test_off_format_answers_are_scored_along_the_teachers_tokenization(pair):
    """Junk cannot lower the measured reverse KL: its score is the teacher's own path (a lower bound), never
    the loose upper bound its training value uses."""
    student, _, exact = pair
    junk = next(r for r in student.vocab.real_ids.tolist()
                if r != student.eot_id and not student.tokenizer.decode([r]).isdigit())
    (sc,) = exact.score([MSGS], [[junk, student.eot_id]])
    assert sc.off_format
    assert np.isfinite(sc.text_logprob) and sc.text_logprob <= sc.values[0] + 1e-9


def test_teacher_distributions_do_not_depend_on_the_batch_they_were_computed_in():
    """A run must not depend on what its process computed before: the exact teacher caches each context's
    distribution, so the stored values have to be the same whichever batch (padding, shapes) computed them."""
    problems = all_problems(0, 9)
    teacher = _new_lm("llama3_1", problems, ModelSize(64, 2, 4, 256), seed=3)
    student = _new_lm("qwen3", problems, SIZE, seed=4)
    digit = int(teacher.vocab.real_ids[5])
    contexts = [teacher.prompt_ids(p.messages()) + extra for p in problems[:40] for extra in ([], [digit])]
    together = ExactTeacher(teacher, student)._next_logprobs(contexts)
    reversed_in_sevens = ExactTeacher(teacher, student, batch=7)._next_logprobs(contexts[::-1])[::-1]
    alone = np.stack([ExactTeacher(teacher, student)._next_logprobs([c])[0] for c in contexts[:4]])
    assert np.array_equal(together, reversed_in_sevens)
    assert np.array_equal(together[:4], alone)
