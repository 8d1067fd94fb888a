"""Client-side cost of TeacherClient: sequences/s and bytes on the wire, against a no-work loopback server.

The server (a subprocess, so it does not share the client's core) answers every ``/generate`` with a
precomputed valid SGLang answer (cached by request body), so what is measured is the client: JSON encode,
HTTP, JSON decode, validation, numpy conversion.

Two tables:

1. sequences/s, one request per sample vs batched, at several concurrency levels. ``wall seq/s`` is end to end
   (client + loopback server); ``client-CPU seq/s`` = sequences / CPU seconds of the client process, i.e.
   what one core of client overhead sustains (target >= 2,000).
2. bytes per sample (request + response bodies) for a long prompt + short response with
   ``logprob_start_len`` at the response start (what the client sends) vs at 0 (what slime's OPD example
   sends): the first grows with the response only.

Run: ``python benchmarks/bench_teacher_client.py`` (about 30 s; ``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import socket
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from slime_xvocab.teacher_client import TeacherClient  # noqa: E402

# ---------------------------------------------------------------------------- the no-work server


def _answer(ids: list[int], start: int) -> dict:
    L = len(ids)
    itl = [[None, ids[start], None]] + [[-1.0 - (k % 13) * 0.173, ids[k], None] for k in range(start + 1, L)]
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
            ids, start = req["input_ids"], req["logprob_start_len"]
            if ids and isinstance(ids[0], list):
                out = orjson.dumps([_answer(i, s) for i, s in zip(ids, start, strict=True)])
            else:
                out = orjson.dumps(_answer(ids, start))
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
    import httpx

    for _ in range(200):
        try:
            if httpx.get(url + "/health_generate", timeout=1, trust_env=False).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("benchmark server did not start")


# ---------------------------------------------------------------------------- measurements


async def throughput(url: str, items: list, batch_size: int, concurrency: int) -> tuple[float, float]:
    """Returns (wall seq/s, client-CPU seq/s)."""
    client = TeacherClient(url, batch_size=batch_size, max_concurrency=concurrency, trust_env=False)
    async with client:
        await client.score_many(items[: max(batch_size * concurrency, 32)])  # warm the pool and the cache
        client.reset_stats()
        w0, c0 = time.perf_counter(), time.process_time()
        out = await client.score_many(items)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    assert len(out) == len(items) and client.stats()["errors"] == 0
    return len(items) / wall, len(items) / cpu


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
    args = ap.parse_args()
    if args.serve:
        serve(args.serve)
        return
    proc, url = start_server()
    try:
        n = 600 if args.quick else 3000
        rng = np.random.default_rng(0)
        # a pool of 64 distinct sequences, reused, so the server's answer cache stays small
        pool = [rng.integers(0, 150_000, size=args.prompt + args.response).tolist() for _ in range(64)]
        items = [(pool[i % 64], args.prompt) for i in range(n)]
        print(
            f"client overhead: {n} sequences of {args.prompt} prompt + {args.response} response tokens, "
            f"logprob_start_len = prompt-1, no-work loopback server (own process)"
        )
        print(
            f"{'batch':>5} {'concurrency':>11} {'wall seq/s':>11} {'client-CPU seq/s':>17} {'vs batch=1':>10}"
        )
        base: dict[int, float] = {}
        for bs in (1, 8, 32):
            for conc in (1, 8, 32):
                wall, cpu = asyncio.run(throughput(url, items, bs, conc))
                base.setdefault(conc, cpu)
                print(f"{bs:>5} {conc:>11} {wall:>11,.0f} {cpu:>17,.0f} {cpu / base[conc]:>9.2f}x")
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
