"""The dense loss against a brute-force full-softmax computation, and sharded over two gloo processes.

The oracle computes the student's softmax over the whole vocabulary in float64 with explicit loops over the
buckets; its gradient comes from autograd through that plain formula. The sharded case runs two real
processes (torch.distributed, gloo, loopback), each holding half the vocabulary, and must give the
single-process values and gradients.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from slime_standin import make_args

from slime_xvocab import dense_loss, hooks
from slime_xvocab.assets import tokenizer_dir
from slime_xvocab.dense import DIVERGENCES, DenseTargets
from slime_xvocab.dense_loss import TARGETS_ATTR, DenseTargetsMissing, bucket_divergence, dense_term
from slime_xvocab.teacher_server import free_port

HERE = Path(__file__).resolve().parent
VOCAB, K = 24, 4
ENV_VAR = "SLIME_XVOCAB_SLIME_CHECKOUTS"
CHECKOUTS = [Path(p) for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p.strip()]
PARAMS = ([pytest.param(p, id=p.name) for p in CHECKOUTS] if CHECKOUTS else
          [pytest.param(None, id="no-slime", marks=pytest.mark.skip(reason=f"{ENV_VAR} is not set"))])


def random_targets(rng, n: int, valid_fraction: float = 0.8) -> DenseTargets:
    ids = np.full((n, K), -1, dtype=np.int32)
    lps = np.zeros((n, K), dtype=np.float32)
    tail = np.ones(n, dtype=np.float32)
    valid = rng.random(n) < valid_fraction
    for j in np.flatnonzero(valid):
        k = int(rng.integers(1, K + 1))
        ids[j, :k] = rng.choice(VOCAB, size=k, replace=False)
        p = rng.dirichlet(np.ones(k + 1))
        if rng.random() < 0.3:  # an empty tail: full support
            p[-1] = 0.0
            p /= p.sum()
        lps[j, :k] = np.log(np.maximum(p[:k], 1e-12))
        tail[j] = p[-1]
    return DenseTargets(ids, lps, tail, valid)


def brute_force(logits: torch.Tensor, targets: DenseTargets, kind: str) -> torch.Tensor:
    """The divergence per position from the full softmax, one position and one bucket at a time."""
    out = []
    for j in range(targets.n):
        if not targets.valid[j]:
            out.append(logits.new_zeros(()))
            continue
        p_all = torch.softmax(logits[j], dim=0)
        listed = [int(t) for t in targets.ids[j] if t >= 0]
        p = [p_all[t] for t in listed]
        p.append(1 - sum(p))
        q = [math.exp(float(lp)) for t, lp in zip(targets.ids[j], targets.log_probs[j]) if t >= 0]
        q.append(max(float(targets.tail[j]), dense_loss.TAIL_FLOOR))
        z = sum(q)
        q = [v / z for v in q]
        terms = []
        for pb, qb in zip(p, q):
            if kind == "reverse_kl":
                terms.append(pb * (torch.log(pb) - math.log(qb)))
            elif kind == "forward_kl":
                terms.append(qb * (math.log(qb) - torch.log(pb)))
            else:
                m = (pb + qb) / 2
                terms.append(0.5 * pb * (torch.log(pb) - torch.log(m)) + 0.5 * qb * (math.log(qb) - torch.log(m)))
        out.append(sum(terms))
    return torch.stack(out)


def packed_batch(rng, lengths=((7, 4), (5, 3), (9, 6))):
    """slime's packed layout: samples back to back, row t of the logits predicts token t + 1."""
    total = sum(t for t, _ in lengths)
    logits = torch.from_numpy(rng.normal(0, 2.0, size=(1, total, VOCAB))).float()
    targets = [random_targets(rng, r) for _, r in lengths]
    return logits, targets, [t for t, _ in lengths], [r for _, r in lengths]


def response_rows(logits, total_lengths, response_lengths):
    rows, end = [], 0
    for t, r in zip(total_lengths, response_lengths):
        end += t
        rows.append(logits[0, end - r - 1:end - 1])
    return torch.cat(rows)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_value_and_gradient_match_the_full_softmax_oracle(kind):
    rng = np.random.default_rng(0)
    logits, targets, totals, responses = packed_batch(rng)
    weights = torch.from_numpy(rng.random(sum(responses))).float()
    mine = logits.clone().requires_grad_(True)
    terms = dense_term(mine, targets, totals, responses, kind=kind, temperature=0.7)
    (terms["divergence"] * weights).sum().backward()

    ref = logits.double().clone().requires_grad_(True)
    rows = response_rows(ref / 0.7, totals, responses)
    flat = DenseTargets(*(np.concatenate([getattr(t, f) for t in targets]) for f in ("ids", "log_probs", "tail",
                                                                                      "valid")))
    want = brute_force(rows, flat, kind)
    (want * weights.double()).sum().backward()
    np.testing.assert_allclose(terms["divergence"].detach().numpy(), want.detach().numpy(), atol=2e-5)
    np.testing.assert_allclose(mine.grad.numpy(), ref.grad.numpy(), atol=2e-5)
    assert (terms["divergence"][~torch.from_numpy(flat.valid)] == 0).all()


def test_row_chunks_with_recompute_give_the_same_value_and_gradient():
    rng = np.random.default_rng(5)
    logits, targets, totals, responses = packed_batch(rng)
    grads, values = [], []
    for chunk in (-1, 2, 5):
        mine = logits.clone().requires_grad_(True)
        div = dense_term(mine, targets, totals, responses, chunk_rows=chunk)["divergence"]
        (div * torch.arange(len(div))).sum().backward()
        grads.append(mine.grad)
        values.append(div.detach())
    for g, v in zip(grads[1:], values[1:]):
        torch.testing.assert_close(v, values[0])
        torch.testing.assert_close(g, grads[0])


def test_the_divergence_is_zero_when_the_student_is_the_teacher():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    p = torch.softmax(logits, -1)[0]
    ids = torch.tensor([[0, 1]])
    log_q = torch.log(p[:2])[None]
    tail = (1 - p[:2].sum())[None]
    for kind in DIVERGENCES:
        div, student_tail = bucket_divergence(logits, ids, log_q, tail, kind=kind)
        assert abs(float(div)) < 1e-6
        assert float(student_tail) == pytest.approx(float(tail), abs=1e-6)


@pytest.mark.parametrize("kind,chunk_rows", [("reverse_kl", -1), ("jsd", -1), ("reverse_kl", 4)])
def test_two_gloo_processes_with_half_the_vocabulary_each_match_one_process(tmp_path, kind, chunk_rows):
    rng = np.random.default_rng(1)
    logits, targets, totals, responses = packed_batch(rng)
    weights = torch.from_numpy(rng.random(sum(responses))).float()
    torch.save({"logits": logits, "targets": targets, "total_lengths": totals, "response_lengths": responses,
                "kind": kind, "temperature": 1.3, "weights": weights, "chunk_rows": chunk_rows}, tmp_path / "inputs.pt")
    proc = subprocess.run([sys.executable, str(HERE / "dense_tp_worker.py"), str(tmp_path / "inputs.pt"),
                           str(tmp_path), str(free_port())], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    mine = logits.clone().requires_grad_(True)
    terms = dense_term(mine, targets, totals, responses, kind=kind, temperature=1.3)
    (terms["divergence"] * weights).sum().backward()
    for got in ranks:  # every rank holds the whole (replicated) loss
        np.testing.assert_allclose(got["divergence"].numpy(), terms["divergence"].detach().numpy(), atol=1e-5)
        np.testing.assert_allclose(got["student_tail"].numpy(), terms["student_tail"].numpy(), atol=1e-5)
    sharded = torch.cat([r["grad"] for r in ranks], dim=-1)
    np.testing.assert_allclose(sharded.numpy(), mine.grad.numpy(), atol=1e-5)


# ---------------------------------------------------------------------------------------------- slime entry


def loss_args(**overrides):
    values = {"hf_checkpoint": str(tokenizer_dir("qwen3")), "xvocab_teacher_tokenizer": str(tokenizer_dir("llama3_1")),
              "xvocab_teacher_urls": "http://127.0.0.1:1", "xvocab_dense": True, "xvocab_dense_coef": 0.5}
    values.update(overrides)
    return make_args(**values)


def slime_batch(rng, attach: bool = True):
    logits, targets, totals, responses = packed_batch(rng)
    masks = []
    for t, r in zip(targets, responses):
        mask = torch.ones(r, dtype=torch.int)
        if attach:
            setattr(mask, TARGETS_ATTR, t)
        masks.append(mask)
    return logits, {"loss_masks": masks, "total_lengths": totals, "response_lengths": responses}


def per_sample_mean(batch):
    """slime's sum_of_sample_mean with calculate_per_token_loss off: the mean over each sample, summed."""
    def reduce(x):
        out, start = x.new_zeros(()), 0
        for mask in batch["loss_masks"]:
            part = x[start:start + len(mask)]
            out = out + (part * mask).sum() / mask.sum().clamp_min(1)
            start += len(mask)
        return out
    return reduce


def test_slime_entry_point_adds_the_dense_term_to_slimes_policy_loss(monkeypatch):
    rng = np.random.default_rng(2)
    logits, batch = slime_batch(rng)
    pg = torch.tensor(0.25)
    seen = {}

    def policy_loss(args, batch_, logits_, reduce):  # stands in for slime's policy_loss_function
        seen["called"] = (batch_ is batch, logits_ is logits)
        return pg + 0 * logits_.sum(), {"loss": pg, "pg_loss": pg}

    monkeypatch.setattr(dense_loss, "_slime_policy_loss", lambda: policy_loss)
    args = loss_args()
    hooks.reset()
    logits.requires_grad_(True)
    loss, metrics = dense_loss.dense_distill_loss(args, batch, logits, per_sample_mean(batch))
    hooks.reset()
    assert seen["called"] == (True, True)
    terms = dense_term(logits, [getattr(m, TARGETS_ATTR) for m in batch["loss_masks"]], batch["total_lengths"],
                       batch["response_lengths"])
    dense = per_sample_mean(batch)(terms["divergence"])
    assert float(loss.detach()) == pytest.approx(0.25 + 0.5 * float(dense.detach()), abs=1e-6)
    assert set(metrics) == {"loss", "pg_loss", "dense_kl", "dense_teacher_tail", "dense_student_tail", "dense_valid"}
    assert all(m.ndim == 0 and torch.isfinite(m) for m in metrics.values())
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_a_sample_without_targets_stops_training(monkeypatch):
    logits, batch = slime_batch(np.random.default_rng(3), attach=False)
    monkeypatch.setattr(dense_loss, "_slime_policy_loss", lambda: lambda *a: (torch.tensor(0.0), {}))
    hooks.reset()
    with pytest.raises(DenseTargetsMissing, match="dense_transport"):
        dense_loss.dense_distill_loss(loss_args(), batch, logits, per_sample_mean(batch))
    hooks.reset()


@pytest.mark.parametrize("checkout", PARAMS)
def test_slimes_own_loss_function_dispatches_to_the_dense_loss(checkout):
    """slime's loss_function with --loss-type custom_loss (its loader, reducer and rescaling) runs the plugin's
    loss, whose value is slime's own policy loss plus xvocab_dense_coef x the dense term."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("XVOCAB_")}
    env["PYTHONPATH"] = os.pathsep.join([str(checkout), str(HERE.parent), str(HERE)])
    proc = subprocess.run([sys.executable, str(HERE / "dense_loss_checks.py")], env=env, capture_output=True,
                          text=True, timeout=600, cwd=HERE.parent)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("DENSE_LOSS_RESULT ")]
    assert proc.returncode == 0 and lines, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    got = json.loads(lines[-1].split(" ", 1)[1])
    if "skip" in got:
        pytest.skip(got["skip"])
    assert got["loss"] == pytest.approx(got["policy_loss"] + 0.5 * got["dense"], abs=1e-5)
    assert got["keys"][:len(got["pg_keys"])] == got["pg_keys"]
    assert got["keys"][len(got["pg_keys"]):] == ["dense_kl", "dense_teacher_tail", "dense_student_tail",
                                                 "dense_valid"]
    assert got["grad_finite"] and got["grad_norm"] > 0
