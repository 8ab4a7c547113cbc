"""Tiny synthetic llama GGUF files (a byte-level BPE vocabulary of the 256 byte tokens + a few merges, 2 layers
of width 64) for the loaders' error tests, and byte-level edits of their header."""
from __future__ import annotations

import struct

import numpy as np

DIM, LAYERS, HEADS, KV_HEADS, FFN, CONTEXT = 64, 2, 4, 2, 96, 128


def _byte_alphabet() -> list[str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    others = [b for b in range(256) if b not in printable]
    chars = {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}
    return [chars[b] for b in range(256)]


TOKENS = _byte_alphabet() + ["th", "he", "the", "<s>", "</s>"]
TYPES = [1] * 259 + [3, 3]
MERGES = ["t h", "h e", "th e"]
DELETE = object()


def metadata(vocab: int) -> dict:
    """{key: (value, GGUFValueType)} of a valid file."""
    from gguf import GGUFValueType as VT

    return {
        "llama.block_count": (LAYERS, VT.UINT32), "llama.context_length": (CONTEXT, VT.UINT32),
        "llama.embedding_length": (DIM, VT.UINT32), "llama.feed_forward_length": (FFN, VT.UINT32),
        "llama.attention.head_count": (HEADS, VT.UINT32), "llama.attention.head_count_kv": (KV_HEADS, VT.UINT32),
        "llama.rope.freq_base": (10000.0, VT.FLOAT32), "llama.attention.layer_norm_rms_epsilon": (1e-5, VT.FLOAT32),
        "llama.vocab_size": (vocab, VT.UINT32),
        "tokenizer.ggml.model": ("gpt2", VT.STRING), "tokenizer.ggml.pre": ("gpt-2", VT.STRING),
        "tokenizer.ggml.tokens": (TOKENS, VT.ARRAY), "tokenizer.ggml.token_type": (TYPES, VT.ARRAY),
        "tokenizer.ggml.merges": (MERGES, VT.ARRAY),
        "tokenizer.ggml.bos_token_id": (259, VT.UINT32), "tokenizer.ggml.eos_token_id": (260, VT.UINT32),
    }


def tensors(vocab: int, linear_type: str = "F32") -> dict:
    """{name: (float32 array (rows, cols), GGML type name)} of a valid file."""
    rng = np.random.default_rng(0)
    r = lambda *s: (rng.standard_normal(s) * 0.2).astype(np.float32)  # noqa: E731
    hd = DIM // HEADS
    out = {"token_embd.weight": (r(vocab, DIM), "F32"), "output_norm.weight": (np.ones(DIM, np.float32), "F32")}
    for i in range(LAYERS):
        p = f"blk.{i}."
        out.update({p + "attn_norm.weight": (np.ones(DIM, np.float32), "F32"),
                    p + "ffn_norm.weight": (np.ones(DIM, np.float32), "F32"),
                    p + "attn_q.weight": (r(HEADS * hd, DIM), linear_type),
                    p + "attn_k.weight": (r(KV_HEADS * hd, DIM), linear_type),
                    p + "attn_v.weight": (r(KV_HEADS * hd, DIM), linear_type),
                    p + "attn_output.weight": (r(DIM, HEADS * hd), linear_type),
                    p + "ffn_gate.weight": (r(FFN, DIM), linear_type), p + "ffn_up.weight": (r(FFN, DIM), linear_type),
                    p + "ffn_down.weight": (r(DIM, FFN), linear_type)})
    return out


def write_gguf(path, meta: dict | None = None, weights: dict | None = None, vocab: int | None = None,
               linear_type: str = "F32") -> str:
    """Write a tiny llama GGUF file; meta / weights override (or DELETE) entries of metadata() / tensors()."""
    import gguf

    vocab = len(TOKENS) if vocab is None else vocab
    m = {**metadata(vocab), **(meta or {})}
    ts = {**tensors(vocab, linear_type), **(weights or {})}
    w = gguf.GGUFWriter(str(path), "llama")
    for key, entry in m.items():
        if entry is DELETE:
            continue
        value, vtype = entry
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_array(key, value)
        else:
            w.add_key_value(key, value, vtype)
    for name, entry in ts.items():
        if entry is DELETE:
            continue
        array, kind = entry
        qtype = gguf.GGMLQuantizationType[kind]
        if kind in ("F32", "F16"):
            w.add_tensor(name, array.astype(np.float32 if kind == "F32" else np.float16))
        else:
            data = gguf.quants.quantize(array, qtype)
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def patch(path, at: int, fmt: str, value) -> None:
    """Overwrite the little-endian struct `fmt` at byte offset `at` of the file."""
    data = bytearray(open(path, "rb").read())
    struct.pack_into("<" + fmt, data, at, value)
    open(path, "wb").write(bytes(data))


def after_key(path, key: str) -> int:
    """The byte offset just past the name `key` (a metadata key or a tensor name) in the file's header: where its
    value type (metadata) or its dimension count (tensor) is."""
    data = open(path, "rb").read()
    at = data.index(struct.pack("<Q", len(key)) + key.encode())
    return at + 8 + len(key)


def tensor_info(path, name: str) -> dict:
    """Byte offsets of a tensor description's fields: {"dims": ..., "type": ..., "offset": ...}."""
    data = open(path, "rb").read()
    at = after_key(path, name)
    (n_dims,) = struct.unpack_from("<I", data, at)
    return {"dims": at + 4, "type": at + 4 + 8 * n_dims, "offset": at + 8 + 8 * n_dims}
