"""Credit: error of every mode against the exact oracle, and the cost of the default as the hooks run it.

    python benchmarks/bench_credit.py            # both parts (about 2 minutes on 2 cores)
    python benchmarks/bench_credit.py --errors   # only the oracle table
    python benchmarks/bench_credit.py --speed    # only the timing

Part 1 (docs/alignment.md's table): for every ordered pair of the six test families, the designed response
sets of tests/test_credit.py plus a wide teacher (80 continuations, more than 20 candidates per position),
every student response scored by each mode; mean |value - oracle| per student token, with the full teacher
support and with its top-20. The oracle (tests/oracle_teacher.py) marginalises over the teacher's responses
in the student's canonical tokens by brute force.

Part 2: one process, CPU time, per student token: the floor (the teacher's fast tokenizer encoding the
response, no offsets), the default credit (``student_token_credit`` on the hooks' view, top-20 candidates
drawn from the teacher's own token frequencies), the uniform chunk split, and the ratio to the floor;
cold (first pass, empty extension cache) and warm.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from oracle_teacher import canonical_ids  # noqa: E402
from test_credit import RESPONSE_SETS, builder_for, mode_errors, usable, wide_teacher  # noqa: E402

from slime_xvocab.assets import TEST_FAMILIES, load_tokenizer  # noqa: E402
from slime_xvocab.credit import StudentExtensions, assign_credit, student_token_credit  # noqa: E402
from slime_xvocab.sglang_wire import TopK  # noqa: E402

MODES = ["student_token", "byte_prefix", "chunk/uniform", "chunk/proportional", "exact"]


def error_table() -> None:
    rng = np.random.default_rng(0)
    rows = {}
    for student, teacher in itertools.permutations(TEST_FAMILIES, 2):
        builder = builder_for(student, teacher)
        sets = dict(RESPONSE_SETS, wide=wide_teacher(rng))
        for k, label in ((None, "full"), (20, "top-20")):
            errs: dict[str, list[float]] = {m: [] for m in MODES}
            for responses in sets.values():
                if not usable(builder, responses):
                    continue
                for text in list(responses)[:12]:
                    for ends in (True, False):
                        for mode, e in mode_errors(builder, responses, text, ends, k).items():
                            errs[mode].append(e)
            rows[(student, teacher, label)] = {m: float(np.mean(v)) for m, v in errs.items()}
    print("Mean |value - oracle| per student token (nats); the student's own log-probs are a seeded random draw\n")
    print("| support | pairs | " + " | ".join(MODES) + " | pairs where student_token is exact (< 1e-6) |")
    print("|---|---|" + "---|" * len(MODES) + "---|")
    for label in ("full", "top-20"):
        for group, fams in (("5 families without GPT-2", [f for f in TEST_FAMILIES if f != "gpt2"]),
                            ("GPT-2 as student or teacher", TEST_FAMILIES)):
            keys = [k for k in rows if k[2] == label and (("gpt2" in k[:2]) == (group.startswith("GPT-2")))
                    and k[0] in fams and k[1] in fams]
            means = [np.mean([rows[k][m] for k in keys]) for m in MODES]
            exact = sum(rows[k]["student_token"] < 1e-6 for k in keys)
            print(f"| {label} | {group} ({len(keys)}) | " + " | ".join(f"{x:.4f}" for x in means)
                  + f" | {exact} of {len(keys)} |")
    print()
    worst = sorted((v["student_token"], k) for k, v in rows.items() if k[2] == "full")[-5:]
    print("largest student_token errors with full support:", [(k, round(e, 4)) for e, k in worst])


CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 9:30, isn't it? Then they went home.",
    "def add(a, b):\n    if a:\n        return a + b  # sum\n    return b\n\n",
    "In 2024 the team shipped 347 features; revenue grew 12.5% to $1,234,567 over the year.",
    "Distillation moves knowledge from a teacher to a student; the student learns the teacher's choices.",
    "你好，世界。東京タワーに行きました。 Mixed text with émojis 🎉🤖 and accents: café, naïve.",
    "Step 1: read the question. Step 2: compute 47 + 35 = 82. Step 3: answer with the number only.",
]


def realistic_top_k(rng, teacher_ids, freq_ids, freq_p, k=20):
    """The observed token plus k - 1 candidates drawn from the teacher's own token frequencies."""
    lps, top = [], []
    for tok in teacher_ids:
        cands = np.unique(np.append(rng.choice(freq_ids, size=k - 1, p=freq_p), tok))[:k]
        p = rng.dirichlet(np.full(len(cands) + 1, 0.3))[: len(cands)] + 1e-9
        top.append((cands.astype(np.int64), np.log(p)))
        lps.append(float(np.log(p[cands == tok][0])))
    return np.array(lps), top


def timing_case(student: str, teacher: str, text: str, rng):
    """``(builder, teacher tokenizer, student ids, view, teacher log-probs, top-k)`` for one response that ends
    its turn, the top-k drawn from the teacher's own token frequencies and held flat as the teacher client
    returns it (``sglang_wire.TopK``; shared with bench_dense.py)."""
    builder = builder_for(student, teacher)
    t_tok = load_tokenizer(teacher)
    ids = canonical_ids(builder.student_tokenizer, text) + [min(builder.student_end_ids)]
    view = builder.build("Q?", ids)
    corpus_ids = np.asarray(canonical_ids(t_tok, " ".join(CORPUS)))
    freq_ids, counts = np.unique(corpus_ids, return_counts=True)
    lps, top = realistic_top_k(rng, view.response_ids, freq_ids, counts / counts.sum())
    flat = TopK(np.concatenate([c for c, _ in top]), np.concatenate([lp for _, lp in top]).astype(np.float32),
                np.concatenate([[0], np.cumsum([len(c) for c, _ in top])]))
    return builder, t_tok, ids, view, lps, flat


def _time_pair(student: str, teacher: str, text: str, rng) -> str:
    builder, t_tok, ids, view, lps, top = timing_case(student, teacher, text, rng)
    student_lp = np.full(len(ids), -0.7)
    ext = StudentExtensions(builder.student_tokenizer, builder.student_table)  # empty caches: a cold start

    def clock(fn) -> float:
        t0 = time.process_time()
        fn()
        return (time.process_time() - t0) / len(ids) * 1e6

    def credit() -> None:
        student_token_credit(view, lps, top, student_lp, ext, builder.teacher_table)

    floor = min(clock(lambda: t_tok(text, add_special_tokens=False)) for _ in range(5))
    cold = clock(credit)
    warm = min(clock(credit) for _ in range(5))
    uniform = min(clock(lambda: assign_credit(view.alignment, lps, student_lp)) for _ in range(5))
    return (f"| {student} -> {teacher} | {len(ids)} | {floor:.2f} | {cold:.2f} | {warm:.2f} | {uniform:.2f} |"
            f" {warm / floor:.2f}x |")


def speed() -> None:
    print("CPU time per student token (µs), as the hooks run the credit; ratio to the floor encode")
    print("| pair | tokens | floor encode | student_token cold | student_token warm | uniform chunk |"
          " warm / floor |")
    print("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    text = " ".join(CORPUS * 12)
    for student, teacher in [("qwen3", "llama3_1"), ("llama3_1", "qwen3"), ("qwen3", "gemma3"),
                             ("gemma3", "deepseek_v3")]:
        print(_time_pair(student, teacher, text, rng))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--errors", action="store_true")
    parser.add_argument("--speed", action="store_true")
    args = parser.parse_args()
    both = not (args.errors or args.speed)
    if args.errors or both:
        error_table()
    if args.speed or both:
        speed()


if __name__ == "__main__":
    main()

