"""The server's answers to inputs the library refuses (fastllm/runtime/inputs.py): text that UTF-8 cannot encode
(a lone surrogate, escaped in the JSON body), prompt tokens outside the model's vocabulary, stop strings, are
400s in OpenAI's error shape; a tiny top_p samples the top token; chat content parts give the library's own
chat(); an unexpected failure is a 500 in OpenAI's shape too."""
import asyncio
import json

import pytest

from fastllm.runtime.sampling import SamplingParams
from fastllm.serve import Rejected

import test_serve
from test_inputs import SMALL_VOCAB, llm_with_small_vocab
from test_serve import NAME, TIMEOUT_S, _assert_error, _post, serving
from tiny_models import tiny_llama

llm, tiny_path = test_serve.llm, test_serve.tiny_path   # test_serve's fixtures: the tiny served model

httpx = pytest.importorskip("httpx")

HI = [{"role": "user", "content": "hi"}]


def _chat(url, body):
    """json.dumps escapes a lone surrogate as \\udXXX (httpx's json= cannot send one)."""
    return httpx.post(url + "/v1/chat/completions", content=json.dumps({"model": NAME, **body}), timeout=TIMEOUT_S,
                      headers={"content-type": "application/json"})


def test_text_that_utf8_cannot_encode_gets_400(llm):
    with serving(llm) as (url, _):
        _assert_error(_post(url, b'{"model": "tiny", "prompt": "\\ud83d", "max_tokens": 3}'), 400,
                      ["prompt is not valid Unicode"])
        _assert_error(_post(url, {"model": NAME, "prompt": "hi", "stop": ["\ud800"], "max_tokens": 3}), 400,
                      ["stop[0] is not valid Unicode"])
        _assert_error(_chat(url, {"messages": [{"role": "user", "content": "a\udc00"}], "max_tokens": 3}), 400,
                      ["messages[0]['content'] is not valid Unicode"])
        _assert_error(_chat(url, {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}],
                                  "max_tokens": 3}), 400, ["not valid Unicode"])
        r = _post(url, {"model": NAME, "prompt": "hi", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == llm.generate("hi", 3)


def test_tiny_top_p_and_content_parts(llm):
    with serving(llm) as (url, _):
        r = _post(url, {"model": NAME, "prompt": "hi", "temperature": 2, "top_p": 1e-300, "max_tokens": 3})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == llm.generate("hi", 3)  # only the top token is ever left
        parts = [{"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}]
        r = _chat(url, {"messages": parts, "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == llm.chat(parts, 4) == llm.chat(HI, 4)


def test_prompt_tokens_outside_the_vocabulary_get_400(tmp_path):
    tiny_llama(tmp_path / "tokenizer", eos_token_id=None)
    small = llm_with_small_vocab(tmp_path / "model", tmp_path / "tokenizer")
    with serving(small) as (url, _):
        _assert_error(_post(url, {"model": NAME, "prompt": "the dog", "max_tokens": 3}), 400,
                      [f"outside the model's vocabulary of {SMALL_VOCAB}"])
        _assert_error(_chat(url, {"messages": HI, "max_tokens": 3}), 400, [f"vocabulary of {SMALL_VOCAB}"])
        _assert_error(_post(url, {"model": NAME, "prompt": [5, SMALL_VOCAB], "max_tokens": 3}), 400,
                      ["token ids", f"prompt[1] is token id {SMALL_VOCAB}"])
        assert _post(url, {"model": NAME, "prompt": [5, 7], "max_tokens": 3}).status_code == 200


def test_an_unexpected_error_is_a_500_in_openais_shape(llm, monkeypatch):
    def broken(text, add_special_tokens=True):
        raise RuntimeError("tokenizer on fire")

    with serving(llm) as (url, _):
        monkeypatch.setattr(llm.tokenizer, "encode", broken)
        r = _post(url, {"model": NAME, "prompt": "hi", "max_tokens": 3})
        assert r.status_code == 500 and r.json()["error"]["message"] == "internal error: RuntimeError: tokenizer on fire"
        monkeypatch.undo()
        assert _post(url, {"model": NAME, "prompt": "hi", "max_tokens": 3}).status_code == 200


def test_engine_refuses_ids_outside_the_vocabulary(llm):
    """Engine.submit checks ids itself: one past the vocabulary would fail the step of every running request."""
    vocab = llm.model.cfg.vocab_size
    with serving(llm) as (_, engine):
        async def submit(prompt):
            engine.submit(prompt, 3, SamplingParams())

        for prompt, words in (([1, vocab], rf"prompt\[1\] is token id {vocab}"), ([-1], "token id -1"),
                              ([1.5], "must be an int")):
            with pytest.raises(Rejected, match=words) as e:
                asyncio.run(submit(prompt))
            assert e.value.status == 400
