"""GGUF-embedded tokenizers (fastllm/loading/gguf_tokenizer.py) against transformers' own GGUF tokenizer
loading as the oracle, on tiny files written here with gguf.GGUFWriter: the SentencePiece ("llama") kind
with scores, <0xXX> byte tokens, control and user-defined tokens; encode and decode of fixed and random
strings (ASCII, unicode, spaces, newlines, digits, emoji through byte fallback); a tiny random Llama GGUF
model with that tokenizer generates what transformers generates; clear errors for unknown kinds."""
import random

import numpy as np
import pytest
import torch

import fastllm
from fastllm.loading.gguf import _open, tokenizer_from_gguf
from fastllm.loading.gguf_tokenizer import TOKEN_BYTE, TOKEN_CONTROL, TOKEN_NORMAL, merges_from_scores

gguf = pytest.importorskip("gguf")

CORPUS = ["hello world, this is a tiny tokenizer for tests; numbers 0123456789 too!",
          "The quick brown fox jumps over the lazy dog.", "héllo ça va? naïve café", "  indented\n\tcode = 1"]
TEXTS = ["Hello world", "hello world, this is a test", "  two leading spaces", "trailing  ", "", " ",
         "line one\nline two\n\n\tindented", "numbers 0123456789 and 3.14", "héllo ça va? naïve", "你好 😀 🦙!",
         "<s>hello</s>", "<|user|>\nhi there<|end|>", "<unk> and ▁ literally", "<0x41> is not A"]
ALPHABET = list("abcdefgh hello world  \n\t0123456789éçï你好😀<>|_") + ["<s>", "</s>", "<|user|>", "<|end|>", "▁"]


def sentencepiece_vocab():
    """(tokens, scores, types) shaped like a Llama 2 vocabulary: <unk> <s> </s>, the 256 byte tokens,
    pieces learned from CORPUS (score = minus the merge rank), then a user-defined and a control token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    t.train_from_iterator(CORPUS * 8, trainers.BpeTrainer(vocab_size=200, show_progress=False))
    vocab = t.get_vocab()
    pieces = sorted(vocab, key=vocab.get)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + ["<|user|>", "<|end|>"]
    types = [2, TOKEN_CONTROL, TOKEN_CONTROL] + [TOKEN_BYTE] * 256 + [TOKEN_NORMAL] * len(pieces) + [4, TOKEN_CONTROL]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0, 0.0]
    return tokens, scores, types


def write_gguf(path, kind="llama", tensors=None, arch_keys=None, **flags):
    """A GGUF file with a tokenizer of `kind` (+ optional tensors and llama.* keys); flags are
    tokenizer.ggml.<flag> booleans (add_bos_token, add_eos_token, add_space_prefix)."""
    tokens, scores, types = sentencepiece_vocab()
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (arch_keys or {}).items():
        w.add_uint32(f"llama.{key}", value) if isinstance(value, int) else w.add_float32(f"llama.{key}", value)
    w.add_tokenizer_model(kind)
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for flag, value in flags.items():
        w.add_bool(f"tokenizer.ggml.{flag}", value)
    for name, t in (tensors or {}).items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def pair(tmp_path, **flags):
    """(ours, transformers') tokenizers of one written file."""
    from transformers import AutoTokenizer

    path = write_gguf(tmp_path / "tok.gguf", **flags)
    return tokenizer_from_gguf(_open(path), path), AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tok.gguf")


def assert_same(ours, ref, texts):
    for text in texts:
        ids = ours.encode(text)
        assert ids == ref(text).input_ids, text
        assert ours.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False).input_ids, text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text


@pytest.mark.parametrize("flags", [{}, {"add_bos_token": False, "add_eos_token": True}])
def test_sentencepiece_matches_transformers(tmp_path, flags):
    ours, ref = pair(tmp_path, **flags)
    assert ours.vocab_size == len(ref)
    assert_same(ours, ref, TEXTS)
    rng = random.Random(0)
    assert_same(ours, ref, ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 24))) for _ in range(300)])
    emoji = ours.encode("😀", add_special_tokens=False)     # not in the vocabulary: four byte tokens
    assert [ours.tokenizer.id_to_token(i) for i in emoji[-4:]] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]


def test_no_space_prefix(tmp_path):
    """add_space_prefix = false (which transformers ignores): no "▁" prepended, none stripped on decode."""
    path = write_gguf(tmp_path / "tok.gguf", add_space_prefix=False)
    tok = tokenizer_from_gguf(_open(path), path)
    ids = tok.encode("hello world", add_special_tokens=False)
    assert "".join(tok.tokenizer.id_to_token(i) for i in ids) == "hello▁world"
    assert tok.decode(tok.encode(" hello")) == " hello"


def test_merges_from_scores():
    """Ranked by the joined token's score; byte and control tokens are never a merge result."""
    tokens = ["a", "b", "c", "ab", "bc", "abc", "<0x41>", "<", "0x41>"]
    types = [TOKEN_NORMAL] * 6 + [TOKEN_BYTE, TOKEN_NORMAL, TOKEN_NORMAL]
    scores = [-9, -9, -9, -2, -1, -3, 0, -9, -9]
    assert merges_from_scores(tokens, scores, types) == [("b", "c"), ("a", "b"), ("ab", "c"), ("a", "bc")]


def test_unknown_kind_and_bad_metadata(tmp_path):
    path = write_gguf(tmp_path / "bert.gguf", kind="bert")
    with pytest.raises(ValueError, match="tokenizer model 'bert' is not supported"):
        tokenizer_from_gguf(_open(path), path)
    from fastllm.loading.gguf_tokenizer import tokenizer_from_metadata

    with pytest.raises(ValueError, match="needs tokenizer.ggml.scores"):
        tokenizer_from_metadata({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a", "b"]}, "x.gguf")
    with pytest.raises(ValueError, match="bos_token_id 7 is outside"):
        tokenizer_from_metadata({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"],
                                 "tokenizer.ggml.scores": [0.0], "tokenizer.ggml.bos_token_id": 7}, "x.gguf")
    for unk in (5, -1):  # read before the other special ids: an IndexError, or -1 naming the last token, before
        with pytest.raises(ValueError, match=f"unknown_token_id {unk} is outside"):
            tokenizer_from_metadata({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a", "b"],
                                     "tokenizer.ggml.scores": [0.0, 0.0], "tokenizer.ggml.unknown_token_id": unk},
                                    "x.gguf")


def test_tiny_llama_gguf_generates_like_transformers(tmp_path):
    """A random-weight Llama in a GGUF file with the SentencePiece tokenizer: same prompt ids and the same
    12 greedy tokens and text as transformers loading the same file."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    vocab, dim, hidden, layers, heads, kv_heads = len(sentencepiece_vocab()[0]), 64, 96, 2, 4, 2
    rng = np.random.default_rng(0)
    shapes = {"token_embd": (vocab, dim), "output_norm": (dim,), "output": (vocab, dim)}
    for i in range(layers):
        shapes.update({f"blk.{i}.attn_norm": (dim,), f"blk.{i}.ffn_norm": (dim,),
                       f"blk.{i}.attn_q": (dim, dim), f"blk.{i}.attn_k": (dim // heads * kv_heads, dim),
                       f"blk.{i}.attn_v": (dim // heads * kv_heads, dim), f"blk.{i}.attn_output": (dim, dim),
                       f"blk.{i}.ffn_gate": (hidden, dim), f"blk.{i}.ffn_up": (hidden, dim),
                       f"blk.{i}.ffn_down": (dim, hidden)})
    tensors = {f"{name}.weight": rng.normal(0, 1.0 if len(s) == 1 else 0.2, s).astype(np.float32)
               for name, s in shapes.items()}
    keys = {"context_length": 128, "embedding_length": dim, "block_count": layers, "feed_forward_length": hidden,
            "attention.head_count": heads, "attention.head_count_kv": kv_heads, "rope.dimension_count": dim // heads,
            "attention.layer_norm_rms_epsilon": 1e-5}
    path = write_gguf(tmp_path / "tiny.gguf", tensors=tensors, arch_keys=keys)
    llm = fastllm.LLM.load(path, device="cpu", dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    prompt = "hello world, ça va? 😀"
    ids = llm.tokenizer.encode(prompt)
    assert ids == tok(prompt).input_ids
    want = ref.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                        pad_token_id=0)[0, len(ids):].tolist()
    assert llm.generate_ids([ids], max_new_tokens=12) == [want]
    assert llm.tokenizer.decode(want) == tok.decode(want, skip_special_tokens=True)
