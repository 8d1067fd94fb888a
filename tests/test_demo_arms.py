"""The demo's dense arms: the teacher distributions they train on and the loss, each against a direct computation.

* :func:`plugin_buckets` (the ``dense`` arm: the plugin's targets in the demo's compact vocabulary) against a
  per-token sum over the listed real ids.
* :func:`dense_update` (``ceiling`` and ``dense``, one loss) against the reverse KL written out over the full
  softmax in float64: ``sum_y pi(y) (log pi(y) - log q(y))`` over the listed tokens plus the tail bucket.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slime_xvocab.demo.arms import dense_update, exact_buckets, plugin_buckets
from slime_xvocab.demo.exact import ExactTeacher
from slime_xvocab.demo.models import ModelSize
from slime_xvocab.demo.opd import OPDSettings, _new_lm
from slime_xvocab.demo.sample import Sample, make_samples, prompt_ids, response_ids
from slime_xvocab.demo.task import all_problems
from slime_xvocab.demo.vocab import CompactVocab
from slime_xvocab.dense import DenseTargets
from slime_xvocab.dense_transport import set_sample_targets


def _random_targets(rng: np.random.Generator, n: int, k: int, real_pool: np.ndarray) -> DenseTargets:
    ids = np.full((n, k), -1, dtype=np.int32)
    lps = np.zeros((n, k), dtype=np.float32)
    tail = np.ones(n, dtype=np.float32)
    valid = rng.random(n) < 0.8
    for j in np.flatnonzero(valid):
        m = int(rng.integers(0, k + 1))
        ids[j, :m] = rng.choice(real_pool, size=m, replace=False)
        p = rng.dirichlet(np.ones(m + 1))
        lps[j, :m] = np.log(p[:m])
        tail[j] = p[m]
    return DenseTargets(ids, lps, tail, valid)


def test_plugin_buckets_are_the_listed_mass_per_compact_token_and_the_rest_as_tail():
    rng = np.random.default_rng(0)
    vocab = CompactVocab([11, 15, 16, 17, 151645])
    pool = np.array([11, 15, 16, 17, 151645, 5, 6, 7, 99, 1000])  # half of them outside the compact vocabulary
    samples = []
    for i in range(40):
        s = Sample(index=i, response_length=int(rng.integers(1, 7)), metadata={})
        s.tokens = [1] * (3 + s.response_length)
        set_sample_targets(s, _random_targets(rng, s.response_length, 4, pool))
        samples.append(s)
    for s, b in zip(samples, plugin_buckets(samples, vocab)):
        t = s.metadata["xvocab_dense"]
        assert b["positions"].tolist() == np.flatnonzero(t.valid).tolist()
        for row, j in enumerate(b["positions"]):
            want = {}  # brute force: sum the listed probabilities per compact token
            for real, lp in zip(t.ids[j], t.log_probs[j]):
                if real >= 0 and int(real) in vocab.real_ids.tolist():
                    k = vocab.real_ids.tolist().index(int(real))
                    want[k] = want.get(k, 0.0) + float(np.exp(lp))
            got = {int(k): float(np.exp(lq)) for k, lq in zip(b["ids"][row], b["log_q"][row]) if k >= 0}
            assert got.keys() == want.keys()
            for k in want:
                assert got[k] == pytest.approx(want[k], rel=1e-6)
            assert b["tail"][row] == pytest.approx(1.0 - sum(want.values()), abs=1e-6)


def test_a_sample_without_targets_is_an_error_naming_it():
    s = Sample(index=7, response_length=2, metadata={})
    with pytest.raises(RuntimeError, match="sample 7"):
        plugin_buckets([s], CompactVocab([1, 2]))


def _brute_force_reverse_kl(student, samples, targets) -> float:
    """The per-sample mean over target positions of the bucketed reverse KL, full softmax in float64."""
    per_sample = []
    with torch.no_grad():
        for s, t in zip(samples, targets):
            if not len(t["positions"]):
                continue
            ids = torch.from_numpy(student.vocab.to_model(s.tokens))[None]
            logits = student.model(input_ids=ids).logits[0].double()
            P = len(s.tokens) - s.response_length
            kls = []
            for row, j in enumerate(t["positions"]):
                log_pi = torch.log_softmax(logits[P - 1 + j, : student.vocab.other], -1)
                listed = [(int(k), float(lq)) for k, lq in zip(t["ids"][row], t["log_q"][row]) if k >= 0]
                q = np.array([np.exp(lq) for _, lq in listed] + [max(float(t["tail"][row]), 1e-6)])
                q = q / q.sum()
                p_listed = [float(log_pi[k].exp()) for k, _ in listed]
                p = np.array(p_listed + [1.0 - sum(p_listed)])
                kls.append(float(np.sum(p * (np.log(p) - np.log(q)))))
            per_sample.append(np.mean(kls))
    return float(np.mean(per_sample))


@pytest.mark.parametrize("student_family,teacher_family", [("qwen3", "llama3_1"), ("llama3_1", "qwen3")])
def test_dense_update_is_the_reverse_kl_to_the_exact_teacher(student_family, teacher_family):
    problems = all_problems(0, 9)
    size = ModelSize(32, 1, 2, 64)
    student = _new_lm(student_family, problems, size, seed=4)
    ref = _new_lm(student_family, problems, size, seed=4)
    teacher = _new_lm(teacher_family, problems, size, seed=3)
    samples = make_samples(student, problems[:12], 4, torch.Generator().manual_seed(0), "messages")
    samples = [s for s in samples if s.response_length > 0]
    targets = exact_buckets(ExactTeacher(teacher, student).dense_targets(
        [s.metadata["messages"] for s in samples], [response_ids(s) for s in samples]))
    assert sum(len(t["positions"]) for t in targets) > 0
    want = _brute_force_reverse_kl(student, samples, targets)
    opt = torch.optim.SGD(student.model.parameters(), lr=0.0)  # a step that leaves the model as it is
    got = dense_update(student, ref, opt, samples, targets, OPDSettings(kl_to_start_coef=0.0))
    assert got["loss"] == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert all(len(prompt_ids(s)) > 0 for s in samples)
