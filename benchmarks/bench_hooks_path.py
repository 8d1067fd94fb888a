"""The reward hook's own per-sample CPU path, against the floor every correct method pays.

    python benchmarks/bench_hooks_path.py            # about 2 minutes on 2 cores
    python benchmarks/bench_hooks_path.py --quick    # one pair, fewer rounds

What is timed is what ``slime_xvocab.hooks.reward_func`` runs per sample apart from the HTTP call, through the
hooks' own runtime and default settings (``credit_mode: student_token``, top-20): ``hooks._build_view`` (teacher
prompt from the cache a GRPO group shares, the response's bytes, the teacher's encode, the alignment, the
end of turn), ``hooks._credit`` and the statistics. The teacher's answer is precomputed (the observed tokens
plus 19 candidates drawn from the teacher's own token frequencies), held flat as the teacher client returns it
(``sglang_wire.TopK``), so no network or model time is counted.

Per pair, CPU time (``time.process_time``) per student token, best of ``--rounds`` interleaved rounds over a
set of varied chat responses:

* floor: the teacher's fast tokenizer encoding the same response texts (no offsets);
* view: ``_build_view``; credit: ``_credit`` with the extension cache warm (cold: the first round);
* stats: ``alignment.stats()`` + ``sample_stats``; whole: view + credit + stats.

Then the scaling of the whole path from 1k to 64k tokens, byte-exact and with a normalising teacher (NFD
text into a Qwen3 teacher), and the peak memory of one 64k-token sample (tracemalloc).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc
import unicodedata
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from slime_standin import Sample, make_args, make_sample  # noqa: E402

from slime_xvocab import hooks  # noqa: E402
from slime_xvocab.assets import load_tokenizer, tokenizer_dir  # noqa: E402
from slime_xvocab.metrics import sample_stats  # noqa: E402
from slime_xvocab.sglang_wire import TopK  # noqa: E402

PAIRS = [("qwen3", "llama3_1"), ("llama3_1", "qwen3"), ("qwen3", "gemma3"), ("gemma3", "deepseek_v3")]
RESPONSES = [
    "The quick brown fox jumps over the lazy dog. It's 9:30, isn't it? Then they went home together.",
    "def add(a, b):\n    if a:\n        return a + b  # sum\n    return b\n\nprint(add(2, 3))\n",
    "In 2024 the team shipped 347 features; revenue grew 12.5% to $1,234,567 over the year.",
    "Step 1: read the question. Step 2: compute 47 + 35 = 82. Step 3: answer with the number only: 82.",
    "你好，世界。東京タワーに行きました。 Mixed text with émojis 🎉🤖 and accents: café, naïve.",
    "Distillation moves knowledge from a teacher to a student; the student learns the teacher's choices, "
    "token by token, on its own samples.",
    "| a | b |\n|---|---|\n| 1 | 2 |\n\n- item one\n- item two\n  - nested **bold** and `code`\n",
    "Sure! Here are three ideas:\n1. Go for a walk.\n2. Read a book.\n3. Call a friend. 😊",
]


def teacher_answer(rng, view, freq_ids, freq_p, k=20):
    """Log-probs of the teacher's response ids and a top-k per position, like an SGLang answer (a list of
    ``(ids, log-probs)`` pairs; :func:`as_wire_top` turns it into what the client hands the hooks)."""
    lps, top = [], []
    for tok in view.input_ids[view.response_start:]:
        cands = np.unique(np.append(rng.choice(freq_ids, size=k - 1, p=freq_p), tok))[:k]
        p = rng.dirichlet(np.full(len(cands) + 1, 0.3))[: len(cands)] + 1e-9
        top.append((cands.astype(np.int64), np.log(p).astype(np.float32)))
        lps.append(np.log(p[cands == tok][0]))
    return np.asarray(lps, dtype=np.float32), top


def as_wire_top(top) -> TopK:
    """The flat :class:`~slime_xvocab.sglang_wire.TopK` the teacher client returns for the same top-k lists."""
    counts = np.fromiter((len(ids) for ids, _ in top), dtype=np.int64, count=len(top))
    ids = np.concatenate([ids for ids, _ in top]).astype(np.int64)
    lps = np.concatenate([lps for _, lps in top]).astype(np.float32)
    return TopK(ids, lps, np.concatenate([[0], np.cumsum(counts)]))


class PairBench:
    """The hooks' runtime for one pair and a set of samples with precomputed teacher answers."""

    def __init__(self, student: str, teacher: str, texts: list[str], seed: int = 0) -> None:
        self.args = make_args(
            hf_checkpoint=str(tokenizer_dir(student)), xvocab_teacher_tokenizer=str(tokenizer_dir(teacher)),
            xvocab_teacher_urls="http://127.0.0.1:9", xvocab_startup_probe=False,
        )
        try:
            self.runtime = hooks._runtime(self.args)
        except Exception:  # a branch without xvocab_startup_probe
            delattr(self.args, "xvocab_startup_probe")
            self.runtime = hooks._runtime(self.args)
        s_tok, t_tok = load_tokenizer(student), load_tokenizer(teacher)
        self.t_tok, self.texts = t_tok, texts
        rng = np.random.default_rng(seed)
        corpus = np.asarray(t_tok(" ".join(RESPONSES), add_special_tokens=False)["input_ids"])
        freq_ids, counts = np.unique(corpus, return_counts=True)
        end = s_tok.convert_tokens_to_ids(s_tok.eos_token) if s_tok.eos_token else None
        end_ids = sorted(self.runtime.builder.student_end_ids) or ([end] if end is not None else [])
        messages = [{"role": "user", "content": "Answer briefly."}]
        prompt = s_tok.encode("Answer briefly.", add_special_tokens=False)
        self.samples, self.answers = [], []
        for i, text in enumerate(texts):
            response = s_tok(text, add_special_tokens=False)["input_ids"] + end_ids[:1]
            sample = make_sample(Sample, prompt_ids=prompt, response_ids=response,
                                 rollout_log_probs=[-0.7] * len(response), metadata={"messages": messages},
                                 index=i, group_index=0)
            view = hooks._build_view(self.runtime.config, self.runtime.first, sample, len(response), str(i))
            self.samples.append(sample)
            lps, top = teacher_answer(rng, view, freq_ids, counts / counts.sum())
            self.answers.append((lps, as_wire_top(top)))
        self.tokens = sum(s.response_length for s in self.samples)

    def floor(self) -> float:
        t0 = time.process_time()
        for text in self.texts:
            self.t_tok(text, add_special_tokens=False)
        return time.process_time() - t0

    def stages(self) -> tuple[float, float, float]:
        view_s = credit_s = stats_s = 0.0
        for sample, (lps, top) in zip(self.samples, self.answers):
            n = sample.response_length
            t0 = time.process_time()
            view = hooks._build_view(self.runtime.config, self.runtime.first, sample, n, "0")
            t1 = time.process_time()
            credit = hooks._credit(self.runtime, self.runtime.first, view, lps, top, np.full(n, -0.7))
            t2 = time.process_time()
            sample_stats(view.alignment.stats().as_dict(), signal_tokens=int(credit.scored.sum()),
                         top_k_mass=credit.top_mass, clamped_tokens=credit.clamped)
            t3 = time.process_time()
            view_s, credit_s, stats_s = view_s + t1 - t0, credit_s + t2 - t1, stats_s + t3 - t2
        return view_s, credit_s, stats_s


def per_token(seconds: float, tokens: int) -> float:
    return seconds / tokens * 1e6


def pair_table(rounds: int, pairs) -> None:
    print("## Per-sample path, CPU µs per student token (ratio to the floor)\n")
    print("| pair | tokens | floor | view | credit cold | credit warm | stats | whole (warm) |")
    print("|---|---|---|---|---|---|---|---|")
    texts = RESPONSES * 4
    for student, teacher in pairs:
        hooks.reset()
        bench = PairBench(student, teacher, texts)
        _, cold, _ = bench.stages()
        best = [np.inf] * 4
        for _ in range(rounds):  # interleaved: every stage sees the same machine state
            f = bench.floor()
            v, c, s = bench.stages()
            best = [min(a, b) for a, b in zip(best, (f, v, c, s))]
        f, v, c, s = (per_token(x, bench.tokens) for x in best)
        cold_t = per_token(cold, bench.tokens)
        print(f"| {student} -> {teacher} | {bench.tokens} | {f:.2f} | {v:.2f} ({v / f:.1f}x) | {cold_t:.2f} "
              f"| {c:.2f} ({c / f:.1f}x) | {s:.2f} | {v + c + s:.2f} ({(v + c + s) / f:.1f}x) |")


def scaling_table(quick: bool) -> None:
    print("\n## Scaling of the whole path (qwen3 / llama3_1 student), CPU µs per student token (ratio to the floor)\n")
    # 64k / 1k: the cost per token, and the same over the floor of each size (measured beside it, so it does
    # not move when the machine's speed does between the two sizes).
    print("| input | 1k | 4k | 16k | 64k | 64k / 1k | same, floor-relative |")
    print("|---|---|---|---|---|---|---|")
    sizes = (1000, 4000, 16000) if quick else (1000, 4000, 16000, 64000)
    cases = [("byte-exact, qwen3 -> llama3_1", "qwen3", "llama3_1", " ".join(RESPONSES[:4])),
             ("NFD text, llama3_1 -> qwen3 (normalising teacher)", "llama3_1", "qwen3",
              unicodedata.normalize("NFD", "Café naïve résumé déjà vu, the quick brown fox. "))]
    for label, student, teacher, unit in cases:
        hooks.reset()
        row, floors = [], []
        for size in sizes:
            s_tok = load_tokenizer(student)
            reps = unit * (size // max(1, len(s_tok(unit, add_special_tokens=False)["input_ids"])) + 1)
            ids = s_tok(reps, add_special_tokens=False)["input_ids"][:size]
            text = s_tok.decode(ids)
            bench = PairBench(student, teacher, [text])
            bench.stages()  # warm
            best = floor = np.inf
            for _ in range(2):  # interleaved, as in the pair table
                floor = min(floor, bench.floor())
                best = min(best, sum(bench.stages()))
            row.append(per_token(best, bench.tokens))
            floors.append(per_token(floor, bench.tokens))
        cells = " | ".join(f"{x:.2f} ({x / f:.1f}x)" for x, f in zip(row, floors)) + (" | -" if quick else "")
        relative = (row[-1] / floors[-1]) / (row[0] / floors[0])
        print(f"| {label} | {cells} | {row[-1] / row[0]:.2f}x | {relative:.2f}x |")


def memory_line() -> None:
    hooks.reset()
    s_tok = load_tokenizer("qwen3")
    ids = s_tok(" ".join(RESPONSES) * 200, add_special_tokens=False)["input_ids"][:64000]
    bench = PairBench("qwen3", "llama3_1", [s_tok.decode(ids)])
    tracemalloc.start()
    bench.stages()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"\nPeak Python/numpy memory of one 64k-token sample (view + credit + stats): {peak / 2**20:.1f} MiB")


class _FrequencyTeacher:
    """Answers any response with the observed tokens plus top-k drawn from token frequencies (no model)."""

    def __init__(self, freq_ids, freq_p, seed: int = 0) -> None:
        self.freq_ids, self.freq_p, self.rng = freq_ids, freq_p, np.random.default_rng(seed)

    def score(self, response_ids, k=None):
        class _View:
            input_ids, response_start = list(response_ids), 0
        lps, top = teacher_answer(self.rng, _View, self.freq_ids, self.freq_p, k or 20)
        return lps.astype(np.float64), top


def _serve_frequency_teacher(freq_ids, freq_p, urls, stop) -> None:
    from oracle_teacher import OracleServer

    with OracleServer(_FrequencyTeacher(freq_ids, freq_p)) as server:
        urls.put(server.url)
        stop.wait(600)


class _FullCollections:
    """Wall-clock spans of the interpreter's full (generation-2) collections while installed."""

    def __init__(self) -> None:
        self.spans: list[tuple[float, float]] = []
        self._start = 0.0

    def __enter__(self) -> _FullCollections:
        gc.callbacks.append(self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._note)

    def _note(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        elif info["generation"] == 2:
            self.spans.append((self._start, time.perf_counter()))

    def overlaps(self, t0: float, t1: float) -> bool:
        return any(a < t1 and b > t0 for a, b in self.spans)


def stall_line(n_samples: int = 64, runs: int = 3) -> None:
    """Longest delay of a 1 ms heartbeat on the event loop while reward_func scores samples concurrently
    (the teacher answers from another process, so only the hooks' own work shares this process).

    A delay during which the interpreter ran a full collection is reported apart: its length is set by
    everything the process holds (torch alone makes a full collection cost ~150 ms here), not by the hooks.
    """
    import asyncio
    import multiprocessing as mp

    hooks.reset()
    t_tok = load_tokenizer("llama3_1")
    corpus = np.asarray(t_tok(" ".join(RESPONSES), add_special_tokens=False)["input_ids"])
    freq_ids, counts = np.unique(corpus, return_counts=True)
    ctx = mp.get_context("fork")
    urls, stop = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=_serve_frequency_teacher, args=(freq_ids, counts / counts.sum(), urls, stop))
    server.start()
    results = []
    try:
        url = urls.get(timeout=60)
        bench = PairBench("qwen3", "llama3_1", (RESPONSES * 40)[:n_samples])
        args = bench.args
        args.xvocab_teacher_urls = url
        hooks.reset()

        async def heartbeat(work, collections: _FullCollections) -> tuple[float, float]:
            """Longest delay of a 1 ms sleep while ``work`` runs: all of them, and those without a full
            collection in them."""
            worst = worst_clean = 0.0
            task = asyncio.ensure_future(work)
            while not task.done():
                t0 = time.perf_counter()
                await asyncio.sleep(0.001)
                t1 = time.perf_counter()
                worst = max(worst, t1 - t0 - 0.001)
                if not collections.overlaps(t0, t1):
                    worst_clean = max(worst_clean, t1 - t0 - 0.001)
            await task
            return worst, worst_clean

        async def run() -> tuple[float, float, int, float]:
            runtime = await asyncio.to_thread(hooks._runtime, args)  # start-up is not the steady state
            await hooks.reward_func(args, bench.samples[0])
            gc.collect()  # the set-up's garbage is not the steady state either
            with _FullCollections() as collections:
                t0 = time.perf_counter()
                worst, worst_clean = await heartbeat(
                    asyncio.gather(*(hooks.reward_func(args, s) for s in bench.samples)), collections
                )
                busy_s = time.perf_counter() - t0
                # The floor: the same heartbeat, as long, on a loop with nothing else to do (the machine's noise).
                _, idle = await heartbeat(asyncio.sleep(busy_s), collections)
            for teacher in runtime.teachers.values():
                await teacher.client.aclose()
            return worst, worst_clean, len(collections.spans), idle

        for _ in range(runs):
            results.append(asyncio.run(run()))
        failed = sum(s.metadata["xvocab"]["failed"] for s in bench.samples)
        gc.collect()
        t0 = time.perf_counter()
        gc.collect()
        full_ms = (time.perf_counter() - t0) * 1e3
    finally:
        stop.set()
        server.join(10)
        if server.is_alive():
            server.kill()
    ms = lambda values: ", ".join(f"{v * 1e3:.1f}" for v in values)  # noqa: E731
    print(f"\nLongest stall of slime's event loop while {n_samples} samples were scored concurrently through "
          f"reward_func (teacher in another process, no model), {runs} runs, ms: {ms(r[0] for r in results)}; "
          f"outside full collections: {ms(r[1] for r in results)}; floor (the same heartbeat on an idle loop, "
          f"as long, right after): {ms(r[3] for r in results)}. Full collections during the runs: "
          f"{sum(r[2] for r in results)} (one costs {full_ms:.0f} ms in this process, {len(gc.get_objects())} "
          f"tracked objects); {failed} fallbacks")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    pair_table(2 if args.quick else args.rounds, PAIRS[:1] if args.quick else PAIRS)
    scaling_table(args.quick)
    if not args.quick:
        memory_line()
    stall_line(16 if args.quick else 64, 2 if args.quick else 5)


if __name__ == "__main__":
    main()
