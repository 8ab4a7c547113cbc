"""Serving throughput: requests/s and output tokens/s of `fastllm serve` (continuous batching) at concurrency
1, 8 and 32, against the same requests served one at a time, on the loopback interface only.

    case c:  c different greedy /v1/completions requests (max_tokens MAX_TOKENS) sent at once by c clients
    peer:    the same c requests sent one after another by one client (each waits for the one before)
    work = c requests;  rate = c / seconds (req/s);  output tok/s = completion tokens (from `usage`) / seconds
The server runs the bundled SmolLM2-135M-Instruct (fp32 on CPU, bf16 on a GPU) with max_seqs 32 and a context
of 256 tokens, in this process (uvicorn in a thread; the clients are httpx in asyncio). Each case is timed
once (a round at concurrency 32 is tens of seconds on a 2-core CPU); the server is warmed up first.
Under --benchmark-disable (CI) every case sends at most 2 requests of 2 tokens, untimed.
"""
from __future__ import annotations

import asyncio
import time

import pytest

from harness import DEVICE, _environment

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

CONCURRENCY = (1, 8, 32)
MAX_TOKENS = 16
MAX_SEQS, CONTEXT_LEN = 32, 256
PROMPTS = ["The capital of France is", "Once upon a time, a small robot", "The three primary colours are",
           "def fibonacci(n):", "The best way to learn a language is", "Water boils at",
           "In 1969, the first humans", "A haiku about autumn:"]


@pytest.fixture(scope="module")
def server():
    from fastllm import LLM
    from fastllm.serve import create_app, model_name, running

    llm = LLM.load(device=DEVICE)
    app = create_app(llm, model_name=model_name(None), max_seqs=MAX_SEQS, context_len=CONTEXT_LEN)
    with running(app) as url:
        # warm-up: the first prefill, and decode steps enough for the one-row CPU graph to be recorded and checked
        asyncio.run(_send(url, [_body(0, 4)], at_once=False))
        yield url, str(llm.model.tok_embeddings.weight.dtype).replace("torch.", "")


def _body(i: int, max_tokens: int) -> dict:
    from fastllm.serve import model_name

    return {"model": model_name(None), "prompt": PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)),
            "max_tokens": max_tokens, "temperature": 0}


async def _send(url: str, bodies: list[dict], at_once: bool) -> int:
    """Sends the requests (all at once, or one after another); returns the completion tokens of all."""
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=64)) as client:
        post = lambda b: client.post("/v1/completions", json=b)  # noqa: E731
        if at_once:
            answers = await asyncio.gather(*(post(b) for b in bodies))
        else:
            answers = [await post(b) for b in bodies]
    for a in answers:
        a.raise_for_status()
    return sum(a.json()["usage"]["completion_tokens"] for a in answers)


def _timed(url: str, bodies: list[dict], at_once: bool) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = asyncio.run(_send(url, bodies, at_once))
    return time.perf_counter() - start, tokens


@pytest.mark.parametrize("concurrency", CONCURRENCY, ids=[f"c{c}" for c in CONCURRENCY])
def test_serve(benchmark, server, concurrency):
    server, dtype = server
    benchmark.group = f"serve-c{concurrency}"
    if benchmark.disabled:
        bodies = [_body(i, 2) for i in range(min(concurrency, 2))]
        benchmark(lambda: _timed(server, bodies, at_once=True))
        _timed(server, bodies, at_once=False)
        return
    bodies = [_body(i, MAX_TOKENS) for i in range(concurrency)]
    seconds, tokens = benchmark.pedantic(lambda: _timed(server, bodies, at_once=True), rounds=1, iterations=1)
    peer_seconds, peer_tokens = _timed(server, bodies, at_once=False)
    rate, peer_rate = concurrency / seconds, concurrency / peer_seconds
    benchmark.extra_info.update({
        "suite": "serve", "impl": "fastllm", "unit": "req/s", "counted": "completions requests",
        "case": {"concurrency": concurrency, "max_tokens": MAX_TOKENS, "max_seqs": MAX_SEQS,
                 "out_tok_s": round(tokens / seconds, 2), "one_at_a_time_out_tok_s": round(peer_tokens / peer_seconds, 2),
                 "dtype": dtype},
        "work": concurrency, "seconds": seconds, "rate": rate,
        "peers": {"one at a time": {"seconds": peer_seconds, "rate": peer_rate, "ratio": peer_seconds / seconds}},
        "best_peer": "one at a time", "ratio_vs_best_peer": peer_seconds / seconds, "environment": _environment()})
