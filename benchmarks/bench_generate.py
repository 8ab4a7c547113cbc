"""Generation: prefill and decode tokens/s of fastllm's runtime against transformers on the same weights.

    prefill case: B prompts of P tokens into a fresh static cache        work = B * P tokens
    decode case:  one decode step of B rows at context length L           work = B tokens
                  (the cache is rewound to L after every call, so every call is the same step)
Peers, same weights and dtype, same run: transformers' own model class (default "sdpa" attention), built from
fastllm's weights by fastllm.runtime.bench.transformers_model, run eagerly with its dynamic KV cache and with
its StaticCache under torch.compile (both cropped back to L after every call; the compiled peer only in
timed runs); llama.cpp through llama-cpp-python on the same GGUF when that
package is installed (CPU, the default model only).
CPU: the bundled SmolLM2-135M-Instruct GGUF in fp32 (suffix -act8: with int8 activations; -kv8: with an int8
KV cache; transformers keeps its fp32 cache, llama.cpp its default f16 one). GPU: random-weight models with the
shapes of SmolLM2-135M, TinyLlama-1.1B and Llama-3-8B in bf16, and the same with int4 linear layers (name suffix -int4;
transformers runs their dequantised bf16 weights); decode cases also record the bandwidth bound (copy
bandwidth measured in the same run / the weight bytes a step reads: _bytes_per_step) and the fraction of it
reached.
"""
from __future__ import annotations

import contextlib
import functools

import pytest
import torch

from fastllm import _bench
from fastllm.runtime import bench as gen_bench
from fastllm.runtime.graphs import decode_stepper
from harness import DEVICE, Unsupported, compare

GPU_MODELS = {  # name -> ModelConfig fields (vocab, dim, layers, heads, kv heads, head dim, intermediate)
    "smollm2-135m": dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
                         intermediate_size=1536, tie_word_embeddings=True, rope_theta=100000.0),
    "tinyllama-1.1b": dict(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, head_dim=64,
                           intermediate_size=5632),
    "llama3-8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                      intermediate_size=14336, rope_theta=500000.0),
}
INT4 = "-int4"  # a GPU model name with this suffix: its linear layers quantised to int4, group 128 (lm_head kept)
ACT8 = "-act8"  # the GGUF model with int8 activations (LLM.load(act="int8")), as llama.cpp computes
KV8 = "-kv8"  # the GGUF model with an int8 KV cache (LLM.load(kv_cache="int8"))
if DEVICE == "cuda":
    CASES = [(m + q, d, b, n) for m in GPU_MODELS for q in ("", INT4)
             for d, b, n in (("prefill", 1, 512), ("decode", 1, 512), ("decode", 16, 512))]
else:
    CASES = [("smollm2-135m-gguf", "prefill", 1, 128), ("smollm2-135m-gguf", "decode", 1, 128),
             ("smollm2-135m-gguf", "decode", 4, 128), ("smollm2-135m-gguf" + ACT8, "decode", 1, 128),
             ("smollm2-135m-gguf", "decode", 1, 2048),  # a long chat: the KV cache read as much as the weights
             ("smollm2-135m-gguf" + KV8, "decode", 1, 2048)]


@functools.lru_cache(maxsize=None)
def _model(name: str):
    """(fastllm model, transformers model or the reason there is none)."""
    if "-gguf" in name:
        from fastllm import LLM

        model = LLM.load(device=DEVICE, dtype=torch.float32, act="int8" if name.endswith(ACT8) else "float",
                         kv_cache="int8" if name.endswith(KV8) else None).model
    else:
        from fastllm.models import Llama, ModelConfig, build_model

        cfg = ModelConfig(arch="llama", max_seq_len=4096, **GPU_MODELS[name.removesuffix(INT4)])
        with torch.device("meta"):
            shapes = {n: p.shape for n, p in Llama(cfg).named_parameters()}
        g = torch.Generator(device=DEVICE).manual_seed(0)
        tensors = {n: torch.randn(s, generator=g, device=DEVICE, dtype=torch.bfloat16) * 0.02 for n, s in shapes.items()}
        model = build_model(cfg, tensors, DEVICE, torch.bfloat16)
        if name.endswith(INT4):
            from fastllm import quantize_model

            quantize_model(model, "int4", 128)
    try:
        hf = gen_bench.transformers_model(model) or "transformers has no model class for this architecture"
    except ImportError as e:
        hf = f"transformers is not installed ({e})"
    return model, hf


def _bytes_per_step(model) -> int:
    """Bytes of weights a decode step reads: every parameter and buffer (packed int4 weights, scales), less the
    token embedding table unless the output head shares it (a step reads one row of it)."""
    tensors = {t.data_ptr(): t for t in (*model.parameters(), *model.buffers())}
    emb = model.tok_embeddings.weight
    if not model.cfg.tie_word_embeddings:
        tensors.pop(emb.data_ptr(), None)
    return sum(t.numel() * t.element_size() for t in tensors.values())


@functools.lru_cache(maxsize=None)
def _copy_gbps() -> float:
    """Device copy bandwidth (read + write bytes / s) of a 1 GiB tensor, measured in this run."""
    x = torch.empty(1 << 28, dtype=torch.float32, device=DEVICE)
    y = torch.empty_like(x)
    s = _bench.time_it(_bench.synchronized(lambda: y.copy_(x), DEVICE), DEVICE, min_time=0.2)
    return 2 * x.numel() * 4 / s / 1e9


def _fastllm_fn(model, direction: str, b: int, n: int):
    prompts = gen_bench.prompts(model.cfg.vocab_size, b, n).tolist()
    cache = model.new_cache(b, n + 2)
    if direction == "prefill":
        return torch.inference_mode()(lambda: model.prefill(prompts, cache))
    with torch.inference_mode():
        model.prefill(prompts, cache)
    lengths, tok = cache.lengths.clone(), torch.full((b,), 5, device=cache.lengths.device)
    decode = decode_stepper(model, cache)  # as generation runs it: replayed from a CUDA or CPU graph

    @torch.inference_mode()
    def step():
        decode(tok)
        cache.lengths.copy_(lengths)
        cache.longest = n
    return step


def _transformers_peer(hf, direction: str, b: int, n: int):
    @contextlib.contextmanager
    def make():
        if isinstance(hf, str):
            raise Unsupported(hf)
        ids = gen_bench.prompts(hf.config.vocab_size, b, n).to(DEVICE)
        if direction == "prefill":
            yield torch.inference_mode()(lambda: hf(ids, use_cache=True))
            return
        with torch.inference_mode():
            past = hf(ids, use_cache=True).past_key_values
        tok = torch.full((b, 1), 5, device=DEVICE)

        @torch.inference_mode()
        def step():
            hf(tok, past_key_values=past, use_cache=True)
            past.crop(-1)  # drop the token just added: back to length n
        yield step
    return make


def _transformers_compiled_peer(hf, direction: str, b: int, n: int, disabled: bool, again: bool):
    """transformers with its StaticCache and torch.compile(model.forward) (mode "reduce-overhead", CUDA graphs,
    on a GPU), its recommended fast path: the cache is rewound with crop() after every call, so every call
    repeats the same prefill of n tokens or the same decode step at length n."""
    @contextlib.contextmanager
    def make():
        if isinstance(hf, str):
            raise Unsupported(hf)
        if disabled:
            raise Unsupported("torch.compile takes minutes here: timed runs only")
        if again:
            raise Unsupported("the same model and cache as the float-activation, float-cache case, measured there")
        from transformers import StaticCache

        ids = gen_bench.prompts(hf.config.vocab_size, b, n).to(DEVICE)
        cache = StaticCache(config=hf.config, max_cache_len=n + 2)
        forward = torch.compile(hf.forward, mode="reduce-overhead" if DEVICE == "cuda" else None, dynamic=False)

        @torch.inference_mode()
        def prefill():
            out = forward(ids, past_key_values=cache, use_cache=True)
            cache.crop(-n)
            return out
        if direction == "prefill":
            yield prefill
            return
        with torch.inference_mode():
            hf(ids, past_key_values=cache, use_cache=True)
        tok = torch.full((b, 1), 5, device=DEVICE)

        @torch.inference_mode()
        def step():
            out = forward(tok, past_key_values=cache, use_cache=True)
            cache.crop(-1)
            return out
        yield step
    return make


def _llama_cpp_peer(direction: str, b: int, n: int):
    @contextlib.contextmanager
    def make():
        try:
            import llama_cpp
        except ImportError:
            raise Unsupported("llama-cpp-python is not installed (pip install llama-cpp-python builds it)") from None
        if b != 1:
            raise Unsupported("llama-cpp-python runs one sequence per context")
        from fastllm.loading import default_model_path

        llm = llama_cpp.Llama(default_model_path(), n_ctx=n + 8, n_threads=torch.get_num_threads(), verbose=False)
        ids = gen_bench.prompts(llm.n_vocab(), 1, n)[0].tolist()
        if direction == "prefill":
            def prefill():
                llm.reset()
                llm.eval(ids)
            yield prefill
            return
        llm.eval(ids)

        def step():
            llm.n_tokens = n
            llm.eval([5])
        yield step
    return make


@pytest.mark.parametrize("name,direction,b,n", CASES, ids=[f"{m}-{d}-B{b}-L{n}" for m, d, b, n in CASES])
def test_generate(benchmark, name, direction, b, n):
    model, hf = _model(name)
    peers = {"transformers": _transformers_peer(hf, direction, b, n),
             "transformers static+compile": _transformers_compiled_peer(hf, direction, b, n, benchmark.disabled,
                                                                        again=name.endswith((ACT8, KV8)))}
    if "-gguf" in name:
        peers["llama.cpp"] = _llama_cpp_peer(direction, b, n)
    tokens = b * n if direction == "prefill" else b
    case = {"model": name, "direction": direction, "batch": b, "context": n,
            "dtype": str(model.tok_embeddings.weight.dtype).replace("torch.", "")}
    if direction == "decode" and DEVICE == "cuda" and not benchmark.disabled:
        weight_bytes = _bytes_per_step(model)
        case["bandwidth_bound_tok_s"] = b * _copy_gbps() * 1e9 / weight_bytes
    compare(benchmark, _fastllm_fn(model, direction, b, n), peers, group=f"{name}-{direction}-B{b}-L{n}",
            suite="generate", case=case, work=tokens, unit="tok/s",
            counted="prompt tokens (prefill) or new tokens (decode step)", min_time=0.5)
    if "bandwidth_bound_tok_s" in case and benchmark.extra_info.get("rate"):
        benchmark.extra_info["fraction_of_bound"] = benchmark.extra_info["rate"] / case["bandwidth_bound_tok_s"]
