"""The OpenAI-compatible server (fastllm/serve), started by each test with uvicorn on 127.0.0.1 (a free port, a
background thread) over a tiny random Llama: the official `openai` client gets the library's own text
(greedy, seeded, stop strings, streamed or not, chat), 32 concurrent clients all get the right answers,
a client that disconnects frees its row, limits answer 400/429, malformed and fuzzed requests (hypothesis,
from the server's own OpenAPI schema) get 4xx only and the server serves on, the API key gives 401.
One test runs the bundled SmolLM2-135M-Instruct, the default model."""
import asyncio
import concurrent.futures
import contextlib
import json
import threading
import time

import pytest
import torch

import fastllm
from fastllm import cli
from tiny_models import tiny_llama

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from fastllm.serve import Engine, Rejected, create_app, model_name, running  # noqa: E402
from fastllm.runtime.sampling import SamplingParams  # noqa: E402

NAME = "tiny"
TIMEOUT_S = 30
PROMPTS = ["the quick brown", "hello world", "a cat sat on", "numbers 0123", "the lazy dog.", "t"]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_serve")
    tiny_llama(path, eos_token_id=None, max_position_embeddings=2048)  # no EOS: full-length generations
    return str(path)


@pytest.fixture(scope="module")
def llm(tiny_path):
    return fastllm.LLM.load(tiny_path, device="cpu")


@contextlib.contextmanager
def serving(llm, name=NAME, **options):
    """Yields (base URL, engine) of the app served on a free loopback port; stops the server afterwards."""
    app = create_app(llm, model_name=name, **options)
    with running(app, timeout_s=TIMEOUT_S) as url:
        yield url, app.state.engine


def client(url, key="none"):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, timeout=TIMEOUT_S, max_retries=0)


def wait_for(predicate, what):
    deadline = time.monotonic() + TIMEOUT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_openai_client_gets_library_text(llm):
    with serving(llm) as (url, _):
        c = client(url)
        assert [m.id for m in c.models.list().data] == [NAME]
        for prompt in PROMPTS[:3]:
            want = llm.generate(prompt, 12)
            r = c.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
            assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
            assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(llm.tokenizer.encode(prompt)), 12)
            chunks = list(c.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True))
            assert "".join(ch.choices[0].text for ch in chunks) == want
            assert chunks[-1].choices[0].finish_reason == "length"
        stop = llm.generate(PROMPTS[0], 12)[3:5]
        r = c.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stop])
        assert r.choices[0].text == llm.generate(PROMPTS[0], 12, stop=stop)
        assert r.choices[0].finish_reason == "stop"
        kw = dict(temperature=1.2, top_k=40, top_p=0.9, seed=7)
        r = c.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=12, extra_body={"top_k": 40},
                                 **{k: v for k, v in kw.items() if k != "top_k"})
        assert r.choices[0].text == llm.generate(PROMPTS[1], 12, **kw)
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
        want = llm.chat(messages, 10)
        r = c.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
        assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
        chunks = list(c.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want
        assert chunks[-1].usage.completion_tokens == 10


@pytest.fixture(scope="module")
def qllm(tiny_path):
    """The tiny model with int8 linears: its decode steps are replayed from CPU graphs, one per row count."""
    return fastllm.LLM.load(tiny_path, device="cpu", quantize="int8")


@pytest.mark.parametrize("which", ["llm", "qllm"])
def test_32_concurrent_clients(request, which):
    llm = request.getfixturevalue(which)
    jobs = [(PROMPTS[i % len(PROMPTS)], 4 + i % 9) for i in range(32)]  # rows finish at different steps
    want = [llm.generate(p, n) for p, n in jobs]
    with serving(llm, max_seqs=8, max_queue=32) as (url, engine):
        c = client(url)

        def ask(job):
            prompt, n = job
            if n % 2:
                r = c.completions.create(model=NAME, prompt=prompt, max_tokens=n, temperature=0)
                return r.choices[0].text
            s = c.completions.create(model=NAME, prompt=prompt, max_tokens=n, temperature=0, stream=True)
            return "".join(ch.choices[0].text for ch in s)

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            got = list(pool.map(ask, jobs, timeout=TIMEOUT_S))
        assert got == want
        stats = engine.stats()
        assert stats["peak_running"] > 1 and stats["running"] == stats["waiting"] == 0
        replayed = [n for n, step in engine.steps.items() if step.graph is not None and step.calls > 3]
        assert bool(replayed) == (which == "qllm"), {n: (s.calls, s.reason) for n, s in engine.steps.items()}


def test_disconnect_frees_the_row(llm):
    with serving(llm, max_seqs=1) as (url, engine):
        body = {"model": NAME, "prompt": "hello", "max_tokens": 2000, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=TIMEOUT_S) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # generation has started; now hang up
        wait_for(lambda: engine.stats()["running"] == 0, "the disconnected request's row to be freed")
        assert engine.stats()["cancelled"] == 1
        r = client(url).completions.create(model=NAME, prompt="hello", max_tokens=5, temperature=0)
        assert r.choices[0].text == llm.generate("hello", 5)


def test_paged_pool_admits_by_blocks(llm):
    """The paged cache admits a request only when the pool has blocks for its prompt + max_tokens: short requests
    share a pool that holds a single long one, long ones wait their turn, every answer is right, and every block
    comes back."""
    short = [(PROMPTS[i], 6) for i in range(4)]                         # <= 16 positions: one block each
    long = [(PROMPTS[i], 40) for i in range(3)]                         # 41..45 positions: three blocks each
    want = {job: llm.generate(*job) for job in short + long}
    options = dict(max_seqs=4, context_len=64, kv_cache_tokens=64, block_size=16)   # a pool of 4 blocks
    for jobs, peak in ((short, 4), (long, 1)):
        with serving(llm, **options) as (url, engine):
            c = client(url)
            assert engine.stats()["kv_blocks"] == engine.stats()["kv_blocks_free"] == 4
            hold = threading.Event()
            real = engine.model.decode

            def slow_decode(tokens, cache):          # the first step waits until every request is queued
                hold.wait(TIMEOUT_S)
                return real(tokens, cache)

            engine.model.decode = slow_decode
            with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
                futures = [pool.submit(lambda j=j: c.completions.create(model=NAME, prompt=j[0], max_tokens=j[1],
                                                                         temperature=0).choices[0].text)
                           for j in jobs]
                wait_for(lambda: sum(engine.stats()[k] for k in ("running", "waiting")) == len(jobs),
                         "every request to arrive")
                hold.set()
                got = [f.result(TIMEOUT_S) for f in futures]
            engine.model.decode = real
            assert got == [want[j] for j in jobs]
            stats = engine.stats()
            assert stats["peak_running"] == peak and stats["kv_blocks_free"] == 4
    with pytest.raises(ValueError, match="kv_cache_tokens"):
        Engine(llm, context_len=64, kv_cache_tokens=63)


def _post(url, body, headers=()):
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(url + "/v1/completions", content=content, timeout=TIMEOUT_S,
                      headers={"content-type": "application/json", **dict(headers)})


def _assert_error(r, status, words=()):
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    assert isinstance(message, str) and all(w in message for w in words), message


def test_limits(llm):
    with serving(llm, max_seqs=1, max_queue=1, context_len=2000) as (url, engine):
        _assert_error(_post(url, {"model": NAME, "prompt": "hello", "max_tokens": 2000}), 400, ["context", "2000"])
        _assert_error(_post(url, {"model": NAME, "prompt": "x" * 10 ** 6}), 400, ["characters"])
        long = {"model": NAME, "prompt": "hello", "max_tokens": 1900, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=long, timeout=TIMEOUT_S):
            wait_for(lambda: engine.stats()["running"] == 1, "the first request to run")
            with httpx.stream("POST", url + "/v1/completions", json=long, timeout=TIMEOUT_S):
                wait_for(lambda: engine.stats()["waiting"] == 1, "the second request to wait")
                _assert_error(_post(url, long), 429, ["busy"])
        wait_for(lambda: engine.stats()["cancelled"] == 2, "both requests to be cancelled")
        assert engine.stats()["running"] == engine.stats()["waiting"] == 0

    async def submit_after_stop():
        engine.submit([1, 2], 3, SamplingParams())

    with pytest.raises(Rejected, match="shutting down") as e:
        asyncio.run(submit_after_stop())
    assert e.value.status == 503
    with pytest.raises(ValueError, match="max_seqs"):
        Engine(llm, max_seqs=0)


BAD = [
    (b"{not json", "JSON"), (b"", "missing"), (b"[1, 2]", "body"), ({"prompt": "hi"}, "model"),
    ({"model": NAME}, "prompt"), ({"model": NAME, "prompt": 5}, "prompt"),
    ({"model": NAME, "prompt": "hi", "max_tokens": "7"}, "max_tokens"),
    ({"model": NAME, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"model": NAME, "prompt": "hi", "temperature": -1}, "temperature"),
    ({"model": NAME, "prompt": "hi", "top_p": 0}, "top_p"), ({"model": NAME, "prompt": "hi", "n": 2}, "n=1"),
    (b'{"model": "tiny", "prompt": "hi", "temperature": NaN}', "temperature"),
    ({"model": NAME, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": NAME, "prompt": "hi", "seed": -1}, "seed"), ({"model": NAME, "prompt": "hi", "bogus": 1}, "bogus"),
    ({"model": NAME, "prompt": [1, 10 ** 9]}, "token ids"), ({"model": NAME, "prompt": []}, "empty"),
    ({"model": NAME, "prompt": "hi", "presence_penalty": 2.5}, "presence_penalty"),
    ({"model": NAME, "prompt": "hi", "frequency_penalty": -3}, "frequency_penalty"),
    ({"model": NAME, "prompt": "hi", "repetition_penalty": 0}, "repetition_penalty"),
    ({"model": NAME, "prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"model": NAME, "prompt": "hi", "logprobs": True}, "logprobs"),
]


def _json_values():
    return st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                   max_size=4), max_leaves=8)


def _from_schema(s, defs):
    """Values shaped by a (FastAPI OpenAPI) JSON schema, often outside its bounds, sometimes of any type."""
    if "$ref" in s:
        return _from_schema(defs[s["$ref"].rsplit("/", 1)[-1]], defs)
    if "anyOf" in s:
        return st.one_of([_from_schema(x, defs) for x in s["anyOf"]])
    if "const" in s or "enum" in s:
        shaped = st.sampled_from([s["const"]] if "const" in s else s["enum"])
    else:
        shaped = {"string": lambda: st.text(max_size=30), "integer": lambda: st.integers(-3, 40) | st.integers(),
                  "number": lambda: st.floats(-3, 3) | st.integers(-2, 2), "boolean": st.booleans,
                  "null": st.none, "array": lambda: st.lists(_from_schema(s["items"], defs), max_size=5),
                  "object": lambda: _object(s, defs)}.get(s.get("type"), _json_values)()
    return st.one_of(shaped, shaped, shaped, _json_values())


def _object(s, defs):
    props = s.get("properties", {})
    required = {k: _from_schema(v, defs) for k, v in props.items() if k in s.get("required", ())}
    optional = {k: _from_schema(v, defs) for k, v in props.items() if k not in s.get("required", ())}
    return st.fixed_dictionaries(required, optional=optional)


def test_malformed_and_fuzzed_requests_get_4xx(llm):
    app = create_app(llm, model_name=NAME)
    defs = app.openapi()["components"]["schemas"]
    routes = {"/v1/completions": "CompletionRequest", "/v1/chat/completions": "ChatRequest"}
    with serving(llm, max_seqs=4) as (url, _):
        for body, words in BAD:
            _assert_error(_post(url, body), 400, [words])
        _assert_error(httpx.post(url + "/v1/completions", json={"model": "gpt-4", "prompt": "hi"}), 404, ["gpt-4"])
        _assert_error(httpx.get(url + "/v1/nothing"), 404)
        with httpx.Client(base_url=url, timeout=TIMEOUT_S) as http:
            @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            @given(route=st.sampled_from(sorted(routes)), data=st.data())
            def fuzz(route, data):
                body = data.draw(_from_schema({"$ref": routes[route]}, defs) | _json_values() | st.binary(max_size=40))
                if isinstance(body, dict) and data.draw(st.booleans()):
                    body["model"] = NAME  # past the model check, into the engine
                content = body if isinstance(body, bytes) else json.dumps(body)
                r = http.post(route, content=content, headers={"content-type": "application/json"})
                assert r.status_code < 500, (body, r.text)
                if r.status_code != 200:
                    assert 400 <= r.status_code < 500 and isinstance(r.json()["error"]["message"], str)

            fuzz()
        r = client(url).completions.create(model=NAME, prompt="hello", max_tokens=5, temperature=0)
        assert r.choices[0].text == llm.generate("hello", 5)


def test_api_key(llm):
    with serving(llm, api_key="s3cret") as (url, _):
        assert httpx.get(url + "/health").status_code == 200
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
            _assert_error(httpx.get(url + "/v1/models", headers=headers), 401, ["API key"])
            _assert_error(_post(url, b"{broken", headers=headers), 401)
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").completions.create(model=NAME, prompt="hi", max_tokens=2)
        r = client(url, "s3cret").completions.create(model=NAME, prompt="hi", max_tokens=3, temperature=0)
        assert r.choices[0].text == llm.generate("hi", 3)


def test_bundled_default_model():
    llm = fastllm.LLM.load(device="cpu", dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    want = llm.chat(messages, 6)
    with serving(llm, name=model_name(None), max_seqs=2, context_len=256) as (url, _):
        r = client(url).chat.completions.create(model=model_name(None), messages=messages, max_tokens=6,
                                                temperature=0)
    assert r.choices[0].message.content == want and "Paris" in want


def test_cli_serve_refuses_bad_limits(tiny_path, capsys):
    assert cli.main(["serve", "-m", tiny_path, "--device", "cpu", "--max-seqs", "0"]) == 2
    assert "max_seqs must be an int >= 1" in capsys.readouterr().err
    assert cli.main(["serve", "-m", tiny_path, "--device", "cpu", "--context-len", "4096"]) == 2
    assert "exceeds the model's context of 2048" in capsys.readouterr().err
    assert cli.main(["serve", "-m", tiny_path, "--device", "cpu", "--kv-cache-tokens", "100"]) == 2
    assert "kv_cache_tokens must be an int >= context_len" in capsys.readouterr().err


def test_a_failing_step_fails_its_requests_and_the_server_goes_on(llm, monkeypatch):
    """An exception inside a generation step answers the running requests with 500; the next request is
    served normally; an engine that stopped for good answers 503 (and /health says so)."""
    with serving(llm) as (url, engine):
        real = engine.model.decode
        calls = {"n": 0}

        def flaky(tokens, cache):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("injected failure")
            return real(tokens, cache)

        monkeypatch.setattr(engine.model, "decode", flaky)
        _assert_error(_post(url, {"model": NAME, "prompt": "hello", "max_tokens": 5}), 500, ["injected failure"])
        r = _post(url, {"model": NAME, "prompt": "hello", "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == llm.generate("hello", max_new_tokens=5)
        with engine.cv:
            engine.dead = "RuntimeError: simulated"
        _assert_error(_post(url, {"model": NAME, "prompt": "hello", "max_tokens": 2}), 503, ["engine stopped"])
        assert httpx.get(url + "/health", timeout=TIMEOUT_S).status_code == 503
