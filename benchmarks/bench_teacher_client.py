"""Client-side cost of TeacherClient: sequences/s and bytes on the wire, against a no-work loopback server.

The server (a subprocess, so it does not share the client's core) answers every ``/generate`` with a
precomputed valid SGLang answer (cached by request body), so what is measured is the client: validation,
JSON encode, HTTP, JSON decode, answer validation, numpy conversion.

Two tables:

1. client overhead, one request per sequence (what spreads the load behind sglang-router, which sends a
   batch whole to one worker) next to batched requests, at several concurrency levels.
   ``CPU seq/s`` = sequences / CPU seconds of the client process (``time.process_time``), i.e. what one
   core of client overhead sustains; the issue's target is >= 2,000 (``x target`` = CPU seq/s / 2,000).
   CPU time, not wall time, because the machine is shared: other processes steal the core but not this
   process's CPU seconds. ``wall seq/s`` (end to end, client + loopback server on the same machine) is
   printed too. Each figure is the median of ``--reps`` runs.
2. bytes per sample (request + response bodies) for a long prompt + short response with
   ``logprob_start_len`` at the response start (what the client sends) vs at 0 (what slime's OPD example
   sends): the first grows with the response only.

Run: ``python benchmarks/bench_teacher_client.py`` (about 40 s; ``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from slime_xvocab.teacher_client import TeacherClient  # noqa: E402

# ---------------------------------------------------------------------------- the no-work server


def _logprob(x: float) -> float:
    """A log-prob as SGLang writes it: a float32 value printed as a Python float (``-1.5189999341964722``)."""
    return float(np.float32(x))


def _answer(ids: list[int], start: int, top_k: int = 0) -> dict:
    L = len(ids)
    itl = [[None, ids[start], None]] + [[_logprob(-1.0 - (k % 13) * 0.173), ids[k], None] for k in range(start + 1, L)]
    top = None
    if top_k:  # the observed token plus k - 1 others, as SGLang lists a top-k
        top = [None] + [
            [[_logprob(-1.0 - (k % 13) * 0.173), ids[k], None]]
            + [[_logprob(-2.0 - r * 0.25 - k * 1e-4), (ids[k] + 7 * r) % 150_000, None] for r in range(1, top_k)]
            for k in range(start + 1, L)
        ]
    meta = {
        "id": "bench",
        "finish_reason": {"type": "length", "length": 0},
        "prompt_tokens": L,
        "weight_version": "default",
        "input_token_logprobs": itl,
        "output_token_logprobs": [],
        "completion_tokens": 0,
        "cached_tokens": 0,
        "e2e_latency": 0.001,
    }
    if top is not None:
        meta["input_top_logprobs"] = top
    return {"text": "", "output_ids": [], "meta_info": meta}


def serve(port: int) -> None:
    import orjson
    from aiohttp import web

    cache: dict[bytes, bytes] = {}

    async def generate(request: web.Request) -> web.Response:
        body = await request.read()
        key = hashlib.blake2b(body, digest_size=16).digest()
        out = cache.get(key)
        if out is None:  # first time this exact request is seen: build its answer once
            req = orjson.loads(body)
            ids, start, k = req["input_ids"], req["logprob_start_len"], int(req.get("top_logprobs_num") or 0)
            if ids and isinstance(ids[0], list):
                starts = start if isinstance(start, list) else [start] * len(ids)
                out = orjson.dumps([_answer(i, s, k) for i, s in zip(ids, starts, strict=True)])
            else:
                out = orjson.dumps(_answer(ids, start, k))
            cache[key] = out
        return web.Response(body=out, content_type="application/json")

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="")

    app = web.Application(client_max_size=1 << 30)
    app.router.add_post("/generate", generate)
    app.router.add_get("/health_generate", health)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def start_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", str(port)])
    url = f"http://127.0.0.1:{port}"
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for _ in range(200):
        try:
            with no_proxy.open(url + "/health_generate", timeout=1) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("benchmark server did not start")


# ---------------------------------------------------------------------------- measurements


TARGET_SEQ_PER_S = 2000.0


async def throughput(
    url: str, items: list, batch_size: int, concurrency: int, reps: int, top_k: int = 0
) -> tuple[float, float]:
    """Median over ``reps`` runs of (wall seq/s, client-CPU seq/s) for scoring ``items``."""
    client = TeacherClient(
        url, batch_size=batch_size, max_concurrency=concurrency, trust_env=False, top_logprobs=top_k
    )
    walls, cpus = [], []
    async with client:
        await client.score_many(items[: max(batch_size * concurrency, 64)])  # warm the pool and the cache
        for _ in range(reps):
            client.reset_stats()
            w0, c0 = time.perf_counter(), time.process_time()
            out = await client.score_many(items)
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            assert len(out) == len(items) and client.stats()["errors"] == 0
            walls.append(len(items) / wall)
            cpus.append(len(items) / max(cpu, 1e-9))
    return statistics.median(walls), statistics.median(cpus)


async def wire_bytes(url: str, prompt: int, response: int, n: int = 20) -> list[tuple[float, float]]:
    """(request bytes, response bytes) per sample at logprob_start_len = prompt-1 and at 0."""
    rng = np.random.default_rng(1)
    ids = [rng.integers(0, 150_000, size=prompt + response).tolist() for _ in range(n)]
    out = []
    for response_start in (prompt, 1):  # logprob_start_len = prompt-1 ... and 0 (slime's OPD example)
        client = TeacherClient(url, trust_env=False)
        async with client:
            await client.score_many([(x, response_start) for x in ids])
            st = client.stats()
        out.append((st["bytes_sent"] / n, st["bytes_received"] / n))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="fewer sequences (smoke run)")
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens per sequence (throughput table)")
    ap.add_argument("--response", type=int, default=128, help="response tokens per sequence")
    ap.add_argument("--reps", type=int, default=3, help="runs per throughput cell (the median is printed)")
    ap.add_argument("--top-k", type=int, default=20,
                    help="teacher top-k per position (20: what the hooks fetch by default; 0: log-probs only)")
    args = ap.parse_args()
    if args.serve:
        serve(args.serve)
        return
    proc, url = start_server()
    try:
        n = 400 if args.quick else 1500
        reps = 1 if args.quick else args.reps
        rng = np.random.default_rng(0)
        # a pool of 64 distinct sequences, reused, so the server's answer cache stays small
        pool = [rng.integers(0, 150_000, size=args.prompt + args.response).tolist() for _ in range(64)]
        items = [(pool[i % 64], args.prompt) for i in range(n)]
        batches = (1, 8, 32)
        print(
            f"client overhead: {n} sequences of {args.prompt} prompt + {args.response} response tokens per "
            f"run, top-{args.top_k}, median of {reps} run(s); logprob_start_len = prompt-1; no-work loopback server"
        )
        print(
            "CPU seq/s = sequences / CPU seconds of the client process (one core); "
            f"x target = CPU seq/s / {TARGET_SEQ_PER_S:,.0f}; wall = end-to-end seq/s (client + server)"
        )
        head = "".join(f" | {('one per request' if b == 1 else f'batch_size={b}'):>26}" for b in batches)
        print(f"{'':>11}{head}")
        sub = "".join(f" | {'CPU seq/s':>9} {'x target':>8} {'wall':>7}" for _ in batches)
        print(f"{'concurrency':>11}{sub}")
        summary = []
        for conc in (1, 8, 32):
            row = f"{conc:>11}"
            cpus = []
            for bs in batches:
                wall, cpu = asyncio.run(throughput(url, items, bs, conc, reps, args.top_k))
                cpus.append(cpu)
                row += f" | {cpu:>9,.0f} {cpu / TARGET_SEQ_PER_S:>7.2f}x {wall:>7,.0f}"
            print(row, flush=True)
            summary.append((conc, cpus))
        print()
        print("one request per sequence vs the 2,000 seq/s target, and what batching adds on top:")
        for conc, cpus in summary:
            print(
                f"  concurrency {conc:>2}: {cpus[0]:>6,.0f} CPU seq/s = {cpus[0] / TARGET_SEQ_PER_S:.2f}x "
                f"target ({1e3 / cpus[0]:.2f} ms CPU per request); batch_size=8 gives "
                f"{cpus[1] / cpus[0]:.2f}x that, batch_size=32 {cpus[2] / cpus[0]:.2f}x"
            )
        print()
        print("bytes on the wire per sample: the request always carries every id; the answer is what")
        print("logprob_start_len changes (start=P-1: one entry per response token; start=0: one per token)")
        print(
            f"{'prompt':>6} {'response':>8} {'request':>9} {'answer P-1':>11} {'answer 0':>10} "
            f"{'total P-1':>10} {'total 0':>10} {'ratio':>6}"
        )
        for prompt, response in ((256, 32), (2048, 32), (8192, 32), (8192, 256)):
            (req, ans_a), (_, ans_b) = asyncio.run(wire_bytes(url, prompt, response))
            ta, tb = req + ans_a, req + ans_b
            print(
                f"{prompt:>6} {response:>8} {req:>9,.0f} {ans_a:>11,.0f} {ans_b:>10,.0f} "
                f"{ta:>10,.0f} {tb:>10,.0f} {tb / ta:>5.1f}x"
            )
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
