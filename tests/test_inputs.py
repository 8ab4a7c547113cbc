"""Checks of generation's inputs (fastllm/runtime/inputs.py, used by fastllm/llm.py and the server): text that
UTF-8 cannot encode, token ids outside the model's vocabulary or not ints, stop strings, max_new_tokens,
chat messages (OpenAI content parts, None content, an empty conversation), chat templates that fail or exceed
their sandbox's limits, and LLM.load's device and act; each gives a ValueError / TypeError naming the argument,
before any model work."""
import pytest
import torch

import fastllm
from fastllm.loading.tokenizer import Tokenizer
from fastllm.runtime.inputs import chat_messages
from tiny_models import VOCAB, tiny_llama

SMALL_VOCAB = 258
"""A model vocabulary of the tokenizer's 256 bytes + 2 specials: the tokenizer's merged tokens lie outside it."""
HI = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_inputs")
    tiny_llama(path, eos_token_id=None)
    return str(path)


@pytest.fixture(scope="module")
def llm(tiny_path):
    return fastllm.LLM.load(tiny_path, device="cpu")


def llm_with_small_vocab(path, tokenizer_dir) -> fastllm.LLM:
    """A model of SMALL_VOCAB ids (written to path) with tokenizer_dir's larger tokenizer, put together by hand:
    LLM.load refuses such a directory (tests/test_loading_errors.py), but an LLM built from parts must still be
    checked."""
    from fastllm.loading.safetensors import load_hf_dir

    tiny_llama(path, eos_token_id=None, vocab_size=SMALL_VOCAB)
    model, cfg = load_hf_dir(str(path), torch.device("cpu"), torch.float32)
    return fastllm.LLM(model, Tokenizer.from_hf_dir(str(tokenizer_dir)), cfg)


@pytest.fixture(scope="module")
def small_vocab_llm(tmp_path_factory, tiny_path):
    return llm_with_small_vocab(tmp_path_factory.mktemp("tiny_small_vocab"), tiny_path)


def test_text_must_be_valid_unicode(llm):
    """A lone surrogate cannot be encoded (the tokenizer raised a TypeError about TextInputSequence)."""
    with pytest.raises(ValueError, match="prompts is not valid Unicode"):
        llm.generate("\ud800", 3)
    with pytest.raises(ValueError, match=r"prompts\[1\] is not valid Unicode"):
        llm.generate(["hi", "a\udc00b"], 3)
    with pytest.raises(ValueError, match="prompt is not valid Unicode"):
        next(llm.stream("\ud83d", 3))
    with pytest.raises(ValueError, match=r"stop\[1\] is not valid Unicode"):
        llm.generate("hi", 3, stop=["x", "\ud800"])
    with pytest.raises(ValueError, match=r"messages\[0\]\['content'\] is not valid Unicode"):
        llm.chat([{"role": "user", "content": "\ud800"}], 3)
    with pytest.raises(ValueError, match=r"messages\[0\]\['content'\]\[0\]\['text'\] is not valid Unicode"):
        llm.chat([{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}], 3)


def test_token_ids_must_be_ints_in_the_vocabulary(llm, small_vocab_llm):
    for ids, words in (([[10 ** 6]], "token id 1000000"), ([[5, -1]], r"prompts\[0\]\[1\] is token id -1"),
                       ([[0], [VOCAB]], rf"prompts\[1\]\[0\] is token id {VOCAB}")):
        with pytest.raises(ValueError, match=f"{words}, outside the model's vocabulary of {VOCAB}"):
            llm.generate_ids(ids, 3)
    with pytest.raises(TypeError, match=r"prompts\[0\]\[0\] must be an int token id, got float"):
        llm.generate_ids([[1.5]], 3)
    with pytest.raises(TypeError, match=r"prompts\[0\] must be a list of token ids"):
        llm.generate_ids(["hi"], 3)
    with pytest.raises(TypeError, match="prompts must be a list of lists"):
        llm.generate_ids(None, 3)
    assert llm.generate_ids([(5, torch.tensor(7).item())], 2) == llm.generate_ids([[5, 7]], 2)
    # text whose tokenizer ids lie past the model's vocabulary (the tokenizer knows more ids than the model has)
    assert max(small_vocab_llm.tokenizer.encode("the dog")) >= SMALL_VOCAB
    with pytest.raises(ValueError, match=f"outside the model's vocabulary of {SMALL_VOCAB}"):
        small_vocab_llm.generate("the dog", 3)
    with pytest.raises(ValueError, match=f"outside the model's vocabulary of {SMALL_VOCAB}"):
        small_vocab_llm.chat(HI, 3)


def test_max_new_tokens_must_be_an_int_ge_0(llm):
    for bad in (-5, "3", 2.0, True):
        with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0"):
            llm.generate_ids([[1, 2]], bad)
    assert llm.generate_ids([[1, 2]], 0) == [[]]


def test_stop_must_be_a_str_or_a_list_of_str(llm):
    for bad, words in ((5, "stop must be a str or a list of str, got int"), (b"a", "stop must .* got bytes"),
                       ({"a": 1}, "stop must .* got dict"), ([None], r"stop\[0\] must be a str, got NoneType"),
                       (["a", 5], r"stop\[1\] must be a str, got int")):
        with pytest.raises(TypeError, match=words):
            llm.generate("hi", 3, stop=bad)
    full = llm.generate("the dog", 12)
    assert llm.generate("the dog", 12, stop=(full[2:4],)) == full[:full.find(full[2:4])]


def test_prompts_must_be_text(llm):
    for bad in (None, 5, b"hi"):
        with pytest.raises(TypeError, match="prompts must be a str or a list of str"):
            llm.generate(bad, 3)
    assert llm.generate((p for p in ["hi", "a"]), 3) == llm.generate(["hi", "a"], 3)  # any iterable of str


def test_sampling_values_are_checked(llm):
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        llm.generate("hi", 3, temperature=float("nan"))
    with pytest.raises(ValueError, match="seed must be in"):
        llm.generate("hi", 3, temperature=1.0, seed=2 ** 64)
    tiny_p = llm.generate("hi", 4, temperature=1.0, top_p=1e-300, seed=0)  # only the top token is left
    assert tiny_p == llm.generate("hi", 4)


def test_chat_takes_content_parts_and_refuses_empty_messages(llm):
    parts = [{"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]}]
    assert chat_messages(parts) == HI
    assert llm.chat(parts, 6) == llm.chat(HI, 6)
    with pytest.raises(ValueError, match=r"messages\[1\]\['content'\] is None"):
        llm.chat([*HI, {"role": "assistant", "content": None}], 3)
    with pytest.raises(ValueError, match="messages is empty"):
        llm.chat([], 3)
    with pytest.raises(ValueError, match=r"messages\[0\]\['content'\]\[0\] must be a text part"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], 3)
    with pytest.raises(TypeError, match="messages must be a list"):
        llm.chat({"role": "user", "content": "hi"}, 3)
    with pytest.raises(TypeError, match=r"messages\[0\]\['role'\] must be a str"):
        llm.chat([{"content": "hi"}], 3)
    call = {"role": "assistant", "content": None, "tool_calls": [{"type": "function"}]}
    assert chat_messages([*HI, call]) == [*HI, call]  # a tool call's None content is the template's business


@pytest.mark.parametrize("template, words", [(5, "TypeError"), ("{% for %}", "TemplateSyntaxError"),
                                             ("{{ foo.bar }}", "UndefinedError")])
def test_a_failing_chat_template_is_a_value_error(llm, template, words):
    tok = Tokenizer(llm.tokenizer.tokenizer, template, llm.tokenizer.special_tokens)
    with pytest.raises(ValueError, match=f"chat template cannot render these messages: {words}"):
        fastllm.LLM(llm.model, tok, llm.config).chat(HI, 3)


@pytest.mark.parametrize("template", ["{{ 'x' * (2 ** 24 + 1) }}", "{% for i in range(100001) %}{% endfor %}",
                                      "{{ 'ab' * 999999999 }}"])
def test_a_hostile_chat_template_is_refused(llm, template):
    """Limits of the template's sandbox (tests/test_chat_template.py has them all): a ValueError, not a hang."""
    tok = Tokenizer(llm.tokenizer.tokenizer, template, llm.tokenizer.special_tokens)
    with pytest.raises(ValueError, match="the chat template exceeds its sandbox's limits"):
        fastllm.LLM(llm.model, tok, llm.config).chat(HI, 3)


def test_load_checks_device_and_act(tiny_path):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            fastllm.LLM.load(tiny_path, device="cuda")
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        fastllm.LLM.load(5, device="cpu")
    with pytest.raises(ValueError, match="device must be a torch device"):
        fastllm.LLM.load(tiny_path, device="bogus")
    with pytest.raises(ValueError, match="act must be 'float' or 'int8', got 'int4'"):
        fastllm.LLM.load(tiny_path, device="cpu", act="int4")
