"""Generation (fastllm/runtime/generate.py, sampling.py, fastllm/llm.py) on a tiny random Llama:
greedy equals transformers' generate, batched equals one-by-one, seeded sampling repeats, stop strings,
streaming, chat template, and argument errors."""
import pytest
import torch

import fastllm
from fastllm.runtime.generate import TextStream
from fastllm.runtime.sampling import SamplingParams, sample, sample_rows
from tiny_models import tiny_llama

PROMPTS = [[0, 5, 9, 77, 120, 3], [0, 44], [0, 300, 2, 2, 7, 19, 250, 31, 8, 8, 100]]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    return path, tiny_llama(path, eos_token_id=None)  # no EOS: full-length generations


@pytest.fixture(scope="module")
def tiny(tiny_path):
    path, hf = tiny_path
    return hf, fastllm.LLM.load(str(path), device="cpu")


def test_greedy_equals_transformers(tiny):
    hf, llm = tiny
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert llm.generate_ids([prompt], max_new_tokens=20)[0] == ref


def test_batched_equals_one_by_one(tiny):
    _, llm = tiny
    batched = llm.generate_ids(PROMPTS, max_new_tokens=16, repetition_penalty=1.3)
    assert batched == [llm.generate_ids([p], max_new_tokens=16, repetition_penalty=1.3)[0] for p in PROMPTS]
    texts = ["the dog", "hello world, this is a", "a"]
    assert llm.generate(texts, max_new_tokens=8) == [llm.generate(t, max_new_tokens=8) for t in texts]


def test_seeded_sampling_repeats(tiny):
    _, llm = tiny
    kw = dict(max_new_tokens=12, temperature=1.5, top_k=50, top_p=0.9)
    a = llm.generate_ids(PROMPTS, seed=3, **kw)
    assert a == llm.generate_ids(PROMPTS, seed=3, **kw)
    assert a != llm.generate_ids(PROMPTS, seed=4, **kw)


def test_sampling_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).log_softmax(-1)
    g = torch.Generator().manual_seed(0)
    draws = lambda **kw: {int(sample(logits, SamplingParams(temperature=1.0, **kw), generator=g))  # noqa: E731
                          for _ in range(300)}
    assert draws(top_k=2) == {0, 1}
    p = logits.softmax(-1)[0]
    assert draws(top_p=float(p[0] + p[1] / 2)) == {0, 1}  # the top token's mass < top_p: the second is needed
    assert draws(top_p=float(p[0]) / 2) == {0}
    seen = torch.tensor([[True, False, False, False, False]])
    assert int(sample(torch.tensor([[2.0, 1.5, 0.0, 0.0, 0.0]]), SamplingParams(repetition_penalty=2.0), seen)) == 1


def test_stop_strings_and_streaming(tiny):
    _, llm = tiny
    full = llm.generate("the dog", max_new_tokens=24)
    assert len(full) > 6
    stop = full[3:6]
    cut = llm.generate("the dog", max_new_tokens=24, stop=[stop, "never-seen"])
    assert cut == full[:full.find(stop)]
    assert "".join(llm.stream("the dog", max_new_tokens=24)) == full
    assert "".join(llm.stream("the dog", max_new_tokens=24, stop=stop)) == cut


class _ByteTokenizer:
    """Token i is the byte i: a character may take several tokens, and text decodes with U+FFFD for a partial one."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_text_stream_holds_back_partial_characters_and_stop_prefixes():
    """Token by token: half a UTF-8 character is not returned (no U+FFFD), a tail that may begin a stop string
    waits (two characters of a three-character one), and the stop string cuts the text before it."""
    s = TextStream(_ByteTokenizer(), stop=("abc",))
    assert [s.push(t) for t in "x\u00e9 ab".encode()] == ["x", "", "\u00e9", " ", "", ""]
    assert s.push(ord("c")) == "" and s.stopped and s.text == "x\u00e9 "
    s = TextStream(_ByteTokenizer(), stop=("abc",))
    assert [s.push(t) for t in b"abd"] == ["", "", "abd"]  # not the stop string after all
    assert [s.push(t) for t in b"ab"] == ["", ""] and s.finish() == "ab" and not s.stopped


def test_chat_template(tiny):
    _, llm = tiny
    messages = [{"role": "user", "content": "hello"}]
    assert llm.tokenizer.apply_chat_template(messages) == "<s><user>hello</s><assistant>"
    ids = llm.tokenizer.encode_chat(messages)
    assert llm.chat(messages, max_new_tokens=10) == llm.tokenizer.decode(llm.generate_ids([ids], 10)[0])
    assert "".join(llm.chat(messages, max_new_tokens=10, stream=True)) == llm.chat(messages, max_new_tokens=10)


def test_bad_arguments(tiny):
    _, llm = tiny
    with pytest.raises(ValueError, match="temperature"):
        llm.generate("a", temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        llm.generate("a", top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        llm.generate("a", top_k=-2)
    with pytest.raises(TypeError, match="prompt must be a str"):
        llm.generate([1, 2])
    with pytest.raises(ValueError, match="max_new_tokens"):
        llm.generate("a", max_new_tokens=-1)
    with pytest.raises(ValueError, match="context of 128 tokens"):
        llm.generate("the dog " * 100)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        llm.generate_ids([[]])
    assert len(llm.generate_ids([[0] * 120], max_new_tokens=50)[0]) == 8  # stops at the context's end
    with pytest.raises(ValueError, match="kv_cache must be None or 'int8'"):
        fastllm.LLM.load(device="cpu", kv_cache="fp8")


def test_int8_kv_cache_generates(tiny_path):
    """LLM.load(kv_cache="int8"): generation runs on an int8 cache (its accuracy: test_llama.py)."""
    llm = fastllm.LLM.load(str(tiny_path[0]), device="cpu", kv_cache="int8")
    assert llm.model.kv_cache_dtype == torch.int8 and llm.model.new_cache(1, 4).k.dtype == torch.int8
    out = llm.generate_ids(PROMPTS, max_new_tokens=6)
    assert [len(o) for o in out] == [6, 6, 6]


def test_sample_rows_draws_each_row_alone():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(), SamplingParams(temperature=1.0, top_k=5, seed=1),
              SamplingParams(temperature=0.7, seed=2)]
    got = sample_rows(logits, params, [p.generator("cpu") for p in params])
    want = [int(sample(logits[i:i + 1], p, None, p.generator("cpu"))) for i, p in enumerate(params)]
    assert got.tolist() == want
    with pytest.raises(ValueError, match="one entry per row"):
        sample_rows(logits, params[:2], [None, None])
