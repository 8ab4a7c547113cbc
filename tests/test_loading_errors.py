"""Corrupt, inconsistent or unsupported model files are refused at load with a ValueError naming the key or the
tensor and the file (found by fuzzing the loaders): tiny synthetic GGUF files (tests/gguf_files.py) edited
byte by byte, and tiny Hugging Face directories (tests/tiny_models.py) with edited JSON files."""
import json
import math
import re
import shutil
import struct
import time

import pytest
import torch

from fastllm.loading.gguf import load_gguf
from fastllm.loading.safetensors import load_hf_dir
from fastllm.loading.tokenizer import Tokenizer
from fastllm.models.config import ModelConfig
from gguf_files import DELETE, after_key, patch, tensor_info, tensors, write_gguf
from tiny_models import tiny_gpt2, tiny_llama


def refused(path, match):
    with pytest.raises(ValueError, match=match) as e:
        load_gguf(str(path), "cpu", torch.float32)
    assert str(path) in str(e.value)
    return e.value


def test_synthetic_gguf_loads(tmp_path):
    """The base file of these tests is valid (so the refusals below come from the edits)."""
    model, tok, cfg = load_gguf(write_gguf(tmp_path / "ok.gguf"), "cpu", torch.float32)
    assert cfg.n_layers == 2 and tok.encode("the") == [258]


# 1. the header is walked with bounds checks before GGUFReader (which looped for hours on these)

@pytest.mark.parametrize("edit", ["string-as-array", "tokens-items-as-arrays", "key-length", "tensor-count",
                                  "string-length", "unknown-type", "tensor-dims", "key-not-utf8"])
def test_corrupt_header_is_refused_at_once(tmp_path, edit):
    path = write_gguf(tmp_path / "bad.gguf")
    if edit == "string-as-array":          # a STRING value's type 8 -> ARRAY 9: the text becomes a 64-bit count
        patch(path, after_key(path, "tokenizer.ggml.model"), "I", 9)
    elif edit == "tokens-items-as-arrays":  # the tokens array's item type 8 -> 9
        patch(path, after_key(path, "tokenizer.ggml.tokens") + 4, "I", 9)
    elif edit == "key-length":
        patch(path, after_key(path, "llama.block_count") - len("llama.block_count") - 8, "Q", 1 << 40)
    elif edit == "tensor-count":
        patch(path, 8, "Q", 1 << 50)
    elif edit == "string-length":          # the length of the first token string
        patch(path, after_key(path, "tokenizer.ggml.tokens") + 16, "Q", 1 << 33)
    elif edit == "unknown-type":
        patch(path, after_key(path, "llama.block_count"), "I", 13)
    elif edit == "key-not-utf8":
        patch(path, after_key(path, "llama.block_count") - 1, "B", 0xFF)
    else:
        patch(path, after_key(path, "output_norm.weight"), "I", 7)
    start = time.perf_counter()
    refused(path, "not a readable GGUF file")
    assert time.perf_counter() - start < 5


# 2. the layer count is checked against the layer tensors before names are built for every layer

def test_huge_layer_count_is_refused(tmp_path):
    start = time.perf_counter()
    refused(write_gguf(tmp_path / "a.gguf", {"llama.block_count": (10**8, 4)}), "100000000 layers")
    tiny_llama(tmp_path / "hf")
    edit_json(tmp_path / "hf" / "config.json", num_hidden_layers=100000000)
    with pytest.raises(ValueError, match="100000000 layers"):
        load_hf_dir(str(tmp_path / "hf"), "cpu", torch.float32)
    edit_json(tmp_path / "hf" / "config.json", num_hidden_layers=3)
    with pytest.raises(ValueError, match="3 layers"):
        load_hf_dir(str(tmp_path / "hf"), "cpu", torch.float32)
    assert time.perf_counter() - start < 10  # the model is saved in ~3 s


def edit_json(file, **changes):
    data = json.loads(file.read_text())
    for k, v in changes.items():
        if v is DELETE:
            data.pop(k, None)
        else:
            data[k] = v
    file.write_text(json.dumps(data))


LLAMA = dict(model_type="llama", vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
GPT2 = dict(model_type="gpt2", vocab_size=320, n_embd=64, n_layer=2, n_head=4, n_positions=128)


# 3. settings that change the math and are not implemented are refused; Mistral's window caps the context

@pytest.mark.parametrize("base, changes, match", [
    (LLAMA, dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (GPT2, dict(scale_attn_weights=False), "scale_attn_weights"),
    (GPT2, dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    (LLAMA, dict(tie_word_embeddings="false"), "tie_word_embeddings must be true or false"),
    (LLAMA, dict(attention_bias=1), "attention_bias must be true or false"),
])
def test_unsupported_settings_are_refused(base, changes, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf({**base, **changes})


def test_mistral_sliding_window_caps_the_context():
    mistral = {**LLAMA, "model_type": "mistral", "max_position_embeddings": 32768}
    with pytest.warns(UserWarning, match="capped at 4096"):
        assert ModelConfig.from_hf({**mistral, "sliding_window": 4096}).max_seq_len == 4096
    assert ModelConfig.from_hf({**mistral, "sliding_window": None}).max_seq_len == 32768
    assert ModelConfig.from_hf({**mistral, "sliding_window": 65536}).max_seq_len == 32768
    with pytest.raises(ValueError, match="sliding_window"):
        ModelConfig.from_hf({**mistral, "sliding_window": 0})
    assert ModelConfig.from_hf({**LLAMA, "hidden_act": "silu"}).max_seq_len == 128


def test_mistral_window_refuses_longer_prompts(tmp_path):
    """Through the model's context length, prompts + generation beyond the window are refused."""
    import fastllm

    tiny_llama(tmp_path)
    edit_json(tmp_path / "config.json", model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=8)
    with pytest.warns(UserWarning, match="sliding_window"):
        llm = fastllm.LLM.load(str(tmp_path), device="cpu", dtype=torch.float32)
    assert llm.config.max_seq_len == 8
    with pytest.raises(ValueError, match="context of 8 tokens"):
        llm.generate_ids([list(range(2, 12))], max_new_tokens=2)
    assert len(llm.generate_ids([[2, 3, 4]], max_new_tokens=20)[0]) == 5


# 4. degenerate rope parameters

@pytest.mark.parametrize("key, value", [("llama.rope.freq_base", 0.0), ("llama.rope.freq_base", -1.0),
                                        ("llama.rope.freq_base", math.nan), ("llama.rope.scaling.factor", 0.0)])
def test_gguf_degenerate_rope_is_refused(tmp_path, key, value):
    meta = {key: (value, 6)}
    if "scaling" in key:
        meta["llama.rope.scaling.type"] = ("linear", 8)
    refused(write_gguf(tmp_path / "a.gguf", meta), key.replace(".", r"\."))


@pytest.mark.parametrize("changes, match", [
    (dict(rope_theta=0), "rope_theta"), (dict(rope_theta=-5.0), "rope_theta"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 0}), "factor"),
    (dict(rope_scaling={"rope_type": "linear", "factor": -2}), "factor"),
    (dict(rope_scaling={"rope_type": "linear"}), "lacks 'factor'"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "lacks 'low_freq_factor'"),
    (dict(rope_scaling={"rope_type": "linear", "factor": "2"}), "factor"),
    (dict(rope_scaling=["linear", 2]), "rope_scaling must be an object"),
    (dict(rope_scaling="linear"), "rope_scaling must be an object"),
])
def test_hf_degenerate_rope_is_refused(changes, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf({**LLAMA, **changes})


# 4b. per-layer hyper-parameters (llama.cpp writes arrays for OpenELM-style models): uniform ones are the scalar

PER_LAYER = {"llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.feed_forward_length": 96}


def test_uniform_per_layer_arrays_load_as_the_scalar(tmp_path):
    """Each array of one value per layer (was refused: "must be an integer") gives the scalar file's model."""
    arrays = {key: ([n] * 2, 9) for key, n in PER_LAYER.items()}
    model, _, cfg = load_gguf(write_gguf(tmp_path / "a.gguf", arrays), "cpu", torch.float32)
    ref, _, ref_cfg = load_gguf(write_gguf(tmp_path / "b.gguf"), "cpu", torch.float32)
    assert cfg == ref_cfg
    tokens = torch.tensor([[259, 258, 5, 7]])
    with torch.inference_mode():
        torch.testing.assert_close(model(tokens), ref(tokens), rtol=0, atol=0)


@pytest.mark.parametrize("key", list(PER_LAYER))
@pytest.mark.parametrize("values, match", [("differ", "differs between layers"),
                                           ("three", "has 3 per-layer values for block_count 2 layers")])
def test_varying_per_layer_arrays_are_refused(tmp_path, key, values, match):
    n = PER_LAYER[key]
    array = [n, n // 2] if values == "differ" else [n] * 3
    refused(write_gguf(tmp_path / "a.gguf", {key: (array, 9)}), f"{re.escape(key)} {match}")


# 5. tensor byte ranges

@pytest.mark.parametrize("edit, match", [("type", "overlaps"), ("overlap", "overlaps"),
                                         ("misaligned", "multiple of general.alignment"),
                                         ("past-end", "past the end|truncated")])
def test_tensor_ranges_are_checked(tmp_path, edit, match):
    path = write_gguf(tmp_path / "a.gguf", linear_type="Q4_1")
    q = tensor_info(path, "blk.0.attn_q.weight")
    if edit == "type":              # Q4_1 -> F32: 6.4x the bytes, reaching into the next tensors
        patch(path, q["type"], "I", 0)
    else:
        k = tensor_info(path, "blk.0.attn_k.weight")
        (k_offset,) = struct.unpack_from("<Q", open(path, "rb").read(), k["offset"])
        new = {"overlap": k_offset, "misaligned": 4, "past-end": 1 << 30}[edit]
        patch(path, q["offset"], "Q", new)
    refused(path, match)


# 6. glob characters in a directory name

def test_model_directory_with_glob_characters(tmp_path):
    from fastllm.loading.safetensors import weight_files

    folder = tmp_path / "model[v2]"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    assert weight_files(str(folder)) == [str(folder / "model.safetensors")]


# 7. clear errors for wrong types and values

@pytest.mark.parametrize("meta, match", [
    ({"llama.block_count": ("abc", 8)}, "llama.block_count must be an integer"),
    ({"llama.attention.head_count": ("four", 8)}, "llama.attention.head_count must be an integer"),
    ({"llama.rope.freq_base": ("big", 8)}, "llama.rope.freq_base"),
    ({"tokenizer.ggml.eos_token_id": ("x", 8)}, "tokenizer.ggml.eos_token_id"),
    ({"llama.attention.head_count": (0, 4)}, "llama.attention.head_count must be an integer >= 1"),
    ({"llama.attention.head_count_kv": (0, 4)}, "llama.attention.head_count_kv"),
    ({"llama.feed_forward_length": (-96, 5)}, "llama.feed_forward_length"),
    ({"llama.block_count": ([2, 2], 9)}, "llama.block_count must be an integer"),
    ({"llama.attention.layer_norm_rms_epsilon": (-1e-5, 6)}, "layer_norm_rms_epsilon"),
    ({"llama.attention.layer_norm_rms_epsilon": (math.nan, 6)}, "layer_norm_rms_epsilon"),
    ({"llama.context_length": (0, 4)}, "llama.context_length"),
    ({"llama.embedding_length": DELETE}, "lacks the required key llama.embedding_length"),
    ({"tokenizer.ggml.tokens": ([1, 2, 3], 9)}, "tokenizer.ggml.tokens must be"),
    ({"tokenizer.ggml.token_type": (["a"] * 261, 9)}, "tokenizer.ggml.token_type must be"),
    ({"tokenizer.ggml.merges": ([1, 2], 9)}, "tokenizer.ggml.merges must be"),
    ({"tokenizer.ggml.merges": (["nospace"], 9)}, "tokenizer.ggml.merges must be"),
    ({"tokenizer.ggml.merges": (["t zz"], 9)}, "inconsistent"),
    ({"llama.vocab_size": (200, 4)}, "the tokenizer has 261 tokens"),
])
def test_bad_gguf_metadata(tmp_path, meta, match):
    vocab = meta.get("llama.vocab_size", (None,))[0]
    refused(write_gguf(tmp_path / "a.gguf", meta, vocab=vocab), match)


def test_bad_utf8_metadata_string(tmp_path):
    path = write_gguf(tmp_path / "a.gguf", {"tokenizer.ggml.pre": ("gpt-2", 8)})
    at = after_key(path, "tokenizer.ggml.pre") + 4 + 8      # the string's first byte
    patch(path, at, "B", 0xFF)
    refused(path, "tokenizer.ggml.pre is not valid UTF-8")


def test_bad_tensors(tmp_path):
    # a 1-D norm weight in Q8_0 blocks is expanded like any vector (was an IndexError)
    ones = torch.ones(64).numpy()
    model, _, _ = load_gguf(write_gguf(tmp_path / "a.gguf", weights={"output_norm.weight": (ones, "Q8_0")}),
                            "cpu", torch.float32)
    torch.testing.assert_close(model.norm.weight.detach(), torch.ones(64), atol=1e-3, rtol=0)  # f16 block scale
    # q rows that do not fit the heads (was a RuntimeError in _unpermute)
    w = tensors(261)["blk.0.attn_q.weight"][0][:1]
    refused(write_gguf(tmp_path / "b.gguf", weights={"blk.0.attn_q.weight": (w, "F32")}),
            r"'blk\.0\.attn_q\.weight' has shape \(1, 64\), the config implies \(64, 64\)")
    # a tensor type fastllm does not read (NotImplementedError without the name)
    path = write_gguf(tmp_path / "c.gguf")
    patch(path, tensor_info(path, "output_norm.weight")["type"], "I", 26)  # F32 -> I32, the same bytes
    refused(path, r"'output_norm\.weight' \(I32\)")
    # non-finite block scales
    bad = tensors(261)["blk.1.ffn_up.weight"][0].copy()
    bad[3, 5] = math.inf
    refused(write_gguf(tmp_path / "d.gguf", weights={"blk.1.ffn_up.weight": (bad, "Q8_0")}),
            r"blk\.1\.ffn_up\.weight.*(NaN|infinite)")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    tiny_llama(path)
    return path


@pytest.fixture
def hf_dir(llama_dir, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(llama_dir, path)
    return path


@pytest.mark.parametrize("changes, match", [
    (dict(hidden_size="64"), "hidden_size must be an integer"), (dict(hidden_size=64.0), "hidden_size"),
    (dict(intermediate_size=[96]), "intermediate_size"), (dict(num_hidden_layers="2"), "num_hidden_layers"),
    (dict(vocab_size=-5), "vocab_size"), (dict(intermediate_size=-1), "intermediate_size"),
    (dict(num_attention_heads=None), "num_attention_heads"), (dict(max_position_embeddings="128"),
                                                              "max_position_embeddings"),
    (dict(rms_norm_eps="1e-5"), "rms_norm_eps"), (dict(rms_norm_eps=-1.0), "rms_norm_eps"),
    (dict(eos_token_id="x"), "eos_token_id"), (dict(eos_token_id=[1, -1]), "eos_token_id"),
    (dict(hidden_size=DELETE), "lacks the field 'hidden_size'"),
    (dict(architectures=1.5), "architectures must be a list of strings"),
    (dict(hidden_size=10**9, vocab_size=3 * 10**9), "sizes describe no possible model"),
])
def test_bad_config_json(hf_dir, changes, match):
    edit_json(hf_dir / "config.json", **changes)
    with pytest.raises(ValueError, match=match) as e:
        load_hf_dir(str(hf_dir), "cpu", torch.float32)
    assert "config.json" in str(e.value)


@pytest.mark.parametrize("changes, match", [
    (dict(n_inner=-1), "n_inner"), (dict(n_head=0), "n_head"), (dict(n_head=5), "n_head 5 must divide n_embd 64"),
    (dict(n_embd="64"), "n_embd"),
])
def test_bad_gpt2_config(changes, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf({**GPT2, **changes})


@pytest.mark.parametrize("file", ["config.json", "generation_config.json", "tokenizer_config.json",
                                  "model.safetensors.index.json"])
def test_json_root_must_be_an_object(hf_dir, file):
    (hf_dir / file).write_text("[1, 2]")
    with pytest.raises(ValueError, match=f"{file} must hold a JSON object"):
        load_hf_dir(str(hf_dir), "cpu", torch.float32)
        Tokenizer.from_hf_dir(str(hf_dir))


@pytest.mark.parametrize("eos, match", [("x", "eos_token_id"), (-3, "eos_token_id"), ([1.5], "eos_token_id"),
                                        ([1, 320], "eos_token_id .* is outside the vocabulary of 320")])
def test_bad_generation_config(hf_dir, eos, match):
    (hf_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    with pytest.raises(ValueError, match=f"generation_config.json: {match}"):
        load_hf_dir(str(hf_dir), "cpu", torch.float32)


@pytest.mark.parametrize("value, match", [(3, "must be a file name"), ("../../x.safetensors", "outside the model"),
                                          ("/etc/passwd", "outside the model")])
def test_bad_index_weight_map(hf_dir, value, match):
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "model.safetensors", "lm_head.weight": value}}))
    with pytest.raises(ValueError, match=match):
        load_hf_dir(str(hf_dir), "cpu", torch.float32)


def test_tokenizer_ids_beyond_the_vocab(hf_dir):
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_file(str(hf_dir / "tokenizer.json"))
    tok.add_tokens(["<extra_%d>" % i for i in range(81)])  # ids 320..400 with vocab_size 320
    tok.save(str(hf_dir / "tokenizer.json"))
    with pytest.raises(ValueError, match="token id 400, beyond the vocab_size 320"):
        Tokenizer.from_hf_dir(str(hf_dir))


def test_gpt2_config_from_directory(tmp_path):
    tiny_gpt2(tmp_path)
    edit_json(tmp_path / "config.json", scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        load_hf_dir(str(tmp_path), "cpu", torch.float32)
