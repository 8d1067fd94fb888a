"""Dense distillation: the first-order error of the targets, what they cost to ship, build and train on.

    python benchmarks/bench_dense.py              # all parts (a few minutes on 2 cores)
    python benchmarks/bench_dense.py --errors     # 1. error of the targets against the exact oracle
    python benchmarks/bench_dense.py --bytes      # 2. bytes per token: the teacher's answer, the targets
    python benchmarks/bench_dense.py --targets    # 3. CPU per token to build the targets (vs the credit)
    python benchmarks/bench_dense.py --loss       # 4. CPU per token of the loss vs slime-style policy loss

1. For every ordered pair of the test families and every designed response set of tests/test_credit.py, the
   total variation between the targets and the oracle's next-token distribution (tests/oracle_teacher.py),
   mean over student positions, full teacher support; and how much of it sits in the tail bucket.
2. Bytes per teacher position of SGLang's ``input_top_logprobs`` JSON at k = 20 and 64 (realistic
   log-probs, full float repr as SGLang's JSON carries them), and of the stored targets per student token
   (``DenseTargets.nbytes``) at 20 and 64 listed ids.
3. CPU time per student token: ``dense_targets`` as the hooks run it (top-20 from the teacher's own token
   frequencies), cold and warm, next to ``student_token_credit`` on the same view.
4. CPU time per response token, forward + backward, Qwen3's vocabulary (151,936), one process: the dense term
   (reverse KL over 20 listed ids + tail) against a policy loss computed as slime's does (log-softmax gather,
   PPO clip, plus the entropy slime computes for its metrics). Ratios printed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_credit import CORPUS, timing_case  # noqa: E402
from oracle_teacher import CanonicalTeacher, canonical_ids, oracle_next_distribution  # noqa: E402
from test_credit import LOCAL, RESPONSE_SETS, builder_for, student_eot, usable  # noqa: E402

from slime_xvocab.credit import StudentExtensions, student_token_credit  # noqa: E402
from slime_xvocab.dense import StudentProjection, dense_targets  # noqa: E402
from slime_xvocab.dense_loss import dense_term  # noqa: E402


def error_table() -> None:
    print("Total variation |targets - oracle| per student position, mean (of which in the tail), full support")
    sets = list(RESPONSE_SETS)
    print("| student -> teacher | " + " | ".join(sets) + " |")
    print("|---|" + "---|" * len(sets))
    for student, teacher in itertools.permutations(LOCAL, 2):
        builder = builder_for(student, teacher)
        ext = StudentExtensions(builder.student_tokenizer, builder.student_table)
        proj = StudentProjection(builder.student_tokenizer, builder.student_table)
        eot = student_eot(builder)
        cells = []
        for name in sets:
            responses = RESPONSE_SETS[name]
            if not usable(builder, responses):
                cells.append("n/a")
                continue
            teacher_m = CanonicalTeacher(builder.teacher_tokenizer, responses, builder.teacher_eot_ids[0])
            errs, tails = [], []
            for text in responses:
                s_ids = canonical_ids(builder.student_tokenizer, text) + [eot]
                view = builder.build("Say something.", s_ids)
                lps, top = teacher_m.score(view.response_ids, None)
                got = dense_targets(view, lps, top, proj, ext, builder.teacher_table, top_k=64,
                                    teacher_end_ids=builder.teacher_eot_ids, student_end_id=eot)
                for j in range(len(s_ids)):
                    want = oracle_next_distribution(builder.student_tokenizer, responses, text, j, eot)
                    mine = {int(t): float(np.exp(lp)) for t, lp in zip(got.ids[j], got.log_probs[j]) if t >= 0}
                    errs.append(sum(abs(mine.get(t, 0.0) - want.get(t, 0.0)) for t in set(mine) | set(want)))
                    tails.append(float(got.tail[j]))
            cells.append(f"{np.mean(errs):.3f} ({np.mean(tails):.3f})")
        print(f"| {student} -> {teacher} | " + " | ".join(cells) + " |")


def answer_bytes() -> None:
    rng = np.random.default_rng(0)
    vocab = 151_936
    print("Bytes per teacher position of SGLang's input_top_logprobs (JSON) and of the stored targets per token")
    print("| k | teacher answer (JSON) | targets (DenseTargets) |")
    print("|---|---|---|")
    for k in (20, 64):
        rows = []
        for _ in range(200):
            p = np.sort(rng.dirichlet(np.full(k + 1, 0.3)))[::-1][:k]
            rows.append([[float(np.log(x + 1e-12)), int(t), None] for x, t in zip(p, rng.integers(0, vocab, k))])
        per_position = len(json.dumps(rows).encode()) / len(rows)
        ids = np.zeros((1, k), np.int32)
        stored = ids.nbytes + np.zeros((1, k), np.float32).nbytes + 4 + 1
        print(f"| {k} | {per_position:,.0f} | {stored} |")


def _time_targets(student: str, teacher: str, text: str, rng) -> str:
    builder, _, ids, view, lps, top = timing_case(student, teacher, text, rng)
    ext = StudentExtensions(builder.student_tokenizer, builder.student_table)  # empty caches: a cold start
    proj = StudentProjection(builder.student_tokenizer, builder.student_table)

    def clock(fn) -> float:
        t0 = time.process_time()
        fn()
        return (time.process_time() - t0) / len(ids) * 1e6

    def dense() -> None:
        dense_targets(view, lps, top, proj, ext, builder.teacher_table, top_k=20,
                      teacher_end_ids=builder.teacher_eot_ids)

    def credit() -> None:
        student_token_credit(view, lps, top, np.full(len(ids), -0.7), ext, builder.teacher_table)

    cold = clock(dense)
    warm = min(clock(dense) for _ in range(3))
    credit_warm = min(clock(credit) for _ in range(3))
    return (f"| {student} -> {teacher} | {len(ids)} | {cold:.1f} | {warm:.1f} | {credit_warm:.1f} | "
            f"{warm / credit_warm:.1f}x |")


def targets_speed() -> None:
    print("CPU time per student token (µs) to build dense targets from a top-20 answer, and the credit")
    print("| pair | tokens | dense cold | dense warm | student_token credit warm | dense / credit |")
    print("|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    text = " ".join(CORPUS * 12)
    for student, teacher in [("qwen3", "llama3_1"), ("llama3_1", "qwen3"), ("gemma3", "deepseek_v3")]:
        print(_time_targets(student, teacher, text, rng))


def slime_style_policy_loss(logits: torch.Tensor, tokens: torch.Tensor, old: torch.Tensor,
                            adv: torch.Tensor) -> torch.Tensor:
    """What slime's policy loss computes per token on the logits: log-prob of the sampled token and the
    entropy over the vocabulary, then the PPO clip."""
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(1, tokens[:, None])[:, 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    ratio = torch.exp(logp - old)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.28))
    return pg.mean() - 0.0 * entropy.mean()


def loss_speed(rows: int = 256, vocab: int = 151_936, k: int = 20, repeats: int = 3) -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    from slime_xvocab.dense import DenseTargets

    base = torch.randn(1, rows + 1, vocab) * 2
    ids = np.stack([rng.choice(vocab, size=k, replace=False) for _ in range(rows)]).astype(np.int32)
    p = rng.dirichlet(np.ones(k + 1), size=rows)
    targets = [DenseTargets(ids, np.log(p[:, :k]).astype(np.float32), p[:, k].astype(np.float32),
                            np.ones(rows, dtype=bool))]
    tokens = torch.from_numpy(ids[:, 0].astype(np.int64))
    old, adv = torch.full((rows,), -1.0), torch.randn(rows)

    def run_dense() -> None:
        logits = base.clone().requires_grad_(True)
        dense_term(logits, targets, [rows + 1], [rows])["divergence"].mean().backward()

    def run_pg() -> None:
        logits = base.clone().requires_grad_(True)
        slime_style_policy_loss(logits[0, :rows], tokens, old, adv).backward()

    def clock(fn) -> float:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best / rows * 1e6

    torch.set_num_threads(1)
    dense_us, pg_us = clock(run_dense), clock(run_pg)
    print(f"Loss CPU time per response token, forward + backward, vocabulary {vocab:,}, {rows} tokens, 1 thread")
    print("| loss | µs / token | ratio |")
    print("|---|---|---|")
    print(f"| policy loss as slime computes it (log-softmax, entropy, PPO clip) | {pg_us:.0f} | 1.00 |")
    print(f"| dense reverse KL, {k} ids + tail | {dense_us:.0f} | {dense_us / pg_us:.2f} |")
    print(f"| dense_distill_loss = policy loss + dense term | {pg_us + dense_us:.0f} | "
          f"{(pg_us + dense_us) / pg_us:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for flag in ("errors", "bytes", "targets", "loss"):
        parser.add_argument(f"--{flag}", action="store_true")
    args = parser.parse_args()
    every = not (args.errors or args.bytes or args.targets or args.loss)
    if args.bytes or every:
        answer_bytes()
    if args.loss or every:
        loss_speed()
    if args.targets or every:
        targets_speed()
    if args.errors or every:
        error_table()


if __name__ == "__main__":
    main()
