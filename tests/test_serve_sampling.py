"""Penalties and log-probabilities through the server (fastllm/serve), with the official `openai` client:
presence/frequency/repetition penalties give the library's own (reference-tested) penalised text, each row of
a batch with its own settings; logprobs equal log_softmax of the library's full forward for the chosen
tokens, in OpenAI's completions and chat shapes, streamed and not; out-of-range values answer 400."""
import concurrent.futures

import pytest
import torch

import test_serve
from test_serve import NAME, PROMPTS, TIMEOUT_S, _assert_error, client, serving

llm, tiny_path = test_serve.llm, test_serve.tiny_path   # test_serve's fixtures: the tiny served model

httpx = pytest.importorskip("httpx")

PENALTIES = [dict(presence_penalty=1.5), dict(frequency_penalty=2.0), dict(repetition_penalty=1.5),
             dict(presence_penalty=-0.5, frequency_penalty=0.7, repetition_penalty=1.2), {}]


def reference_logprobs(llm, prompt_ids, out_ids):
    """log_softmax of the model's full forward at the positions that chose out_ids: (len(out), V) float64."""
    with torch.inference_mode():
        logits = llm.model(torch.tensor([prompt_ids + out_ids]))[0, len(prompt_ids) - 1:-1]
    return logits.double().log_softmax(-1)


def test_penalties_per_request_in_one_batch(llm):
    """Concurrent requests with different penalties (rows of the same decode steps) each get the library's
    text for their own settings; the penalties do change the text."""
    jobs = [(PROMPTS[i % 3], PENALTIES[i % len(PENALTIES)]) for i in range(10)]
    want = [llm.generate(p, 14, **kw) for p, kw in jobs]
    assert want[0] != llm.generate(PROMPTS[0], 14) and want[1] != llm.generate(PROMPTS[1], 14)
    with serving(llm, max_seqs=8) as (url, engine):
        c = client(url)

        def ask(job):
            prompt, kw = job
            extra = {"repetition_penalty": kw["repetition_penalty"]} if "repetition_penalty" in kw else None
            std = {k: v for k, v in kw.items() if k != "repetition_penalty"}
            r = c.completions.create(model=NAME, prompt=prompt, max_tokens=14, temperature=0, extra_body=extra,
                                     **std)
            return r.choices[0].text

        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            got = list(pool.map(ask, jobs, timeout=TIMEOUT_S))
        assert got == want
        assert engine.stats()["peak_running"] > 1
        messages = [{"role": "user", "content": "hello world"}]
        r = c.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0,
                                      frequency_penalty=2.0)
        assert r.choices[0].message.content == llm.chat(messages, 10, frequency_penalty=2.0)


def test_completion_logprobs(llm):
    prompt = PROMPTS[0]
    ids = llm.tokenizer.encode(prompt)
    out = llm.generate_ids([ids], max_new_tokens=8)[0]
    ref = reference_logprobs(llm, ids, out)
    with serving(llm) as (url, _):
        c = client(url)
        r = c.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0, logprobs=3)
        lp = r.choices[0].logprobs
        streamed = list(c.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0, logprobs=3,
                                             stream=True))
    torch.testing.assert_close(torch.tensor(lp.token_logprobs, dtype=torch.float64),
                               ref[range(8), out], rtol=0, atol=1e-4)
    assert lp.tokens == [llm.tokenizer.token_bytes(t).decode("utf-8", "replace") for t in out]
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]
    for i, top in enumerate(lp.top_logprobs):
        best = ref[i].topk(3)
        want = {}
        for t, v in zip(best.indices.tolist(), best.values.tolist()):  # a dict: the likelier of same-text tokens
            want.setdefault(llm.tokenizer.token_bytes(t).decode("utf-8", "replace"), v)
        assert set(top) - set(want) <= {lp.tokens[i]} and lp.tokens[i] in top
        torch.testing.assert_close(torch.tensor([top[n] for n in want], dtype=torch.float64),
                                   torch.tensor(list(want.values()), dtype=torch.float64), rtol=0, atol=1e-4)
    chunks = [ch.choices[0].logprobs for ch in streamed if ch.choices[0].logprobs is not None]
    assert sum((ch.tokens for ch in chunks), []) == lp.tokens
    assert sum((ch.token_logprobs for ch in chunks), []) == lp.token_logprobs
    assert sum((ch.text_offset for ch in chunks), []) == lp.text_offset


def test_chat_logprobs(llm):
    messages = [{"role": "user", "content": "hello world"}]
    ids = llm.tokenizer.encode_chat(messages)
    out = llm.generate_ids([ids], max_new_tokens=6)[0]
    ref = reference_logprobs(llm, ids, out)
    with serving(llm) as (url, _):
        c = client(url)
        r = c.chat.completions.create(model=NAME, messages=messages, max_tokens=6, temperature=0, logprobs=True,
                                      top_logprobs=2)
        streamed = list(c.chat.completions.create(model=NAME, messages=messages, max_tokens=6, temperature=0,
                                                  logprobs=True, top_logprobs=2, stream=True))
        plain = c.chat.completions.create(model=NAME, messages=messages, max_tokens=6, temperature=0)
    content = r.choices[0].logprobs.content
    assert len(content) == 6 and plain.choices[0].logprobs is None
    torch.testing.assert_close(torch.tensor([e.logprob for e in content], dtype=torch.float64), ref[range(6), out],
                               rtol=0, atol=1e-4)
    assert bytes(sum((e.bytes for e in content), [])).decode() == r.choices[0].message.content
    for i, e in enumerate(content):
        best = ref[i].topk(2)
        assert [t.bytes for t in e.top_logprobs] == [list(llm.tokenizer.token_bytes(j)) for j in best.indices.tolist()]
        torch.testing.assert_close(torch.tensor([t.logprob for t in e.top_logprobs], dtype=torch.float64),
                                   best.values, rtol=0, atol=1e-4)
    chunks = [e for ch in streamed if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in chunks] == [(e.token, e.logprob) for e in content]


BAD = [
    ("completions", {"prompt": "hi", "presence_penalty": 2.01}, ["presence_penalty"]),
    ("completions", {"prompt": "hi", "frequency_penalty": -2.5}, ["frequency_penalty"]),
    ("completions", {"prompt": "hi", "repetition_penalty": -1}, ["repetition_penalty"]),
    ("completions", {"prompt": "hi", "logprobs": -1}, ["logprobs"]),
    ("completions", {"prompt": "hi", "logprobs": 21}, ["logprobs"]),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
     ["top_logprobs needs logprobs"]),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 99},
     ["top_logprobs"]),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": 3}, ["logprobs"])]


def test_out_of_range_values_get_400(llm):
    with serving(llm) as (url, _):
        for route, body, words in BAD:
            r = httpx.post(f"{url}/v1/{route}", json={"model": NAME, **body}, timeout=TIMEOUT_S)
            _assert_error(r, 400, words)
