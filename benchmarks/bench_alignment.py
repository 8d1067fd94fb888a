"""Alignment + statistics cost against the teacher tokenizer's own ``encode`` of the same text.

Encoding the response with the teacher's tokenizer is the floor any correct cross-tokenizer method
pays (the teacher needs its own ids). This script times, in one run and side by side:

* ``encode``: ``teacher_tokenizer(text, return_offsets_mapping=True)`` (batched for the 512-case);
* ``align``: everything slime-xvocab adds on top: spelling the student ids as bytes, the byte check,
  the chunk partition, credit assignment and per-sample statistics;

for one long response (16k student tokens) and for a batch of 512 responses, and prints the ratio.
Target: ``align`` <= 10% of ``encode``.

Usage:
    python benchmarks/bench_alignment.py [--student qwen3] [--teacher llama3_1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from slime_xvocab.alignment import align_lengths_flat
from slime_xvocab.assets import load_tokenizer
from slime_xvocab.token_bytes import PROBE_TEXT, token_bytes

PARAGRAPH = (
    "The derivative of x^3 + 2x is 3x^2 + 2, so at x = 17 the slope is 869. "
    "def solve(n):\n    return sum(i * i for i in range(n))  # 1234567\n"
    "東京タワーの高さは333メートルです。 Emoji 🤖🎉 and naïve café. "
)


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def make_responses(student_tok, n: int, target_tokens: int) -> list[np.ndarray]:
    text = (PARAGRAPH + PROBE_TEXT) * 400
    ids = student_tok(text, add_special_tokens=False)["input_ids"]
    rng = np.random.default_rng(0)
    table = token_bytes(student_tok)
    out = []
    while len(out) < n:  # windows that start or end inside a character are skipped
        start = int(rng.integers(0, len(ids) - target_tokens))
        window = np.asarray(ids[start:start + target_tokens], dtype=np.int64)
        try:
            table.bytes_of(window).decode("utf-8")
        except UnicodeDecodeError:
            continue
        out.append(window)
    return out


def run_case(name: str, responses, s_tok, t_tok, repeats: int) -> None:
    s_tab, t_tab = token_bytes(s_tok), token_bytes(t_tok)
    texts = [s_tab.bytes_of(r).decode("utf-8", errors="replace") for r in responses]

    def encode():
        t_tok(texts, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True)

    # Encode once for the alignment inputs (the teacher view already has them in a real run).
    enc = t_tok(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    teacher_ids = [np.asarray(e, dtype=np.int64) for e in enc]
    rng = np.random.default_rng(1)
    t_lps = [-rng.random(len(e)) for e in teacher_ids]
    s_lps = [-rng.random(len(r)) for r in responses]

    def align():
        # The byte check for the whole batch: equal concatenations and equal per-sample byte counts.
        s_ids, t_ids = np.concatenate(responses), np.concatenate(teacher_ids)
        if s_tab.bytes_of(s_ids) != t_tab.bytes_of(t_ids):
            raise AssertionError("bytes differ")
        s_counts, t_counts = [len(r) for r in responses], [len(t) for t in teacher_ids]
        # also checks every sample's byte count
        batch = align_lengths_flat(s_tab.lengths_of(s_ids), s_counts, t_tab.lengths_of(t_ids), t_counts)
        batch.assign_credit(t_lps, s_lps)
        batch.stats()

    align()  # warm-up
    encode_s, align_s = best_of(encode, repeats), best_of(align, repeats)
    n_tokens = sum(len(r) for r in responses)
    print(
        f"{name:<28} {len(responses):>5} x {n_tokens // len(responses):>6} tok | "
        f"encode {encode_s * 1e3:9.2f} ms | align+stats {align_s * 1e3:9.2f} ms | "
        f"ratio {align_s / encode_s:6.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", default="qwen3")
    parser.add_argument("--teacher", default="llama3_1")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    s_tok, t_tok = load_tokenizer(args.student), load_tokenizer(args.teacher)
    print(f"student {args.student}, teacher {args.teacher}; best of {args.repeats}; target ratio <= 0.10")
    run_case("one long response (16k)", make_responses(s_tok, 1, 16384), s_tok, t_tok, args.repeats)
    run_case("batch of 512 (512 tok)", make_responses(s_tok, 512, 512), s_tok, t_tok, args.repeats)
    run_case("batch of 512 (64 tok)", make_responses(s_tok, 512, 64), s_tok, t_tok, args.repeats)


if __name__ == "__main__":
    main()
