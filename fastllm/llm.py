"""fastllm.LLM: load a model and generate text.

    llm = fastllm.LLM.load()                       # the bundled SmolLM2-135M-Instruct GGUF, no download
    llm = fastllm.LLM.load("path/to/hf_dir")       # config.json + *.safetensors + tokenizer.json
    llm = fastllm.LLM.load("model.gguf")
    llm.generate("Once upon a time", max_new_tokens=32)            # -> str (a list of prompts -> list[str])
    for piece in llm.stream("Once upon a time"): print(piece, end="")
    llm.chat([{"role": "user", "content": "Hi!"}])                  # the chat template, then generate

Generation keywords (all methods): max_new_tokens, temperature (0 = greedy, the default), top_k, top_p,
repetition_penalty, seed, stop (a string or list of strings that end the text; not included in it).
Runs under torch.inference_mode; on CPU torch uses all cores (torch.get_num_threads()).
"""
from __future__ import annotations

import os
from typing import Iterator

import torch

from .runtime.generate import TextStream, check_prompts, token_steps
from .runtime.inputs import check_text, encode_chat, stop_strings
from .runtime.sampling import SamplingParams


def _default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class LLM:
    def __init__(self, model, tokenizer, config):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.eos_ids = tuple(config.eos_token_ids)

    @classmethod
    def load(cls, path: str | None = None, device: str | torch.device | None = None,
             dtype: torch.dtype | None = None, quantize: str | None = None, act: str = "float",
             tensor_parallel: bool = False, kv_cache: str | None = None) -> "LLM":
        """path: a Hugging Face model directory or a .gguf file; None = the bundled default model.
        device: default cuda when available, else cpu. dtype: default bfloat16 (float16 without bf16) on
        CUDA, float32 on CPU (the activations' dtype; quantised weights stay quantised).
        quantize: None, or "int8" / "int4" / "int4_asym": quantise the float linear layers at load
        (fastllm.quantize_model; the output head stays float). A GGUF file's Q8_0/Q4_0/Q4_1 weights are
        kept quantised as they are, on CPU and on CUDA with act="float". act: the quantised layers'
        activation mode, "float" (exact) or "int8" (activations quantised per block of 32: faster on CPU, as
        llama.cpp does). tensor_parallel: shard the model across the initialised torch.distributed default
        group (fastllm.parallel.shard_model; every rank loads the whole model first, then keeps its shard).
        kv_cache: None (the KV cache in dtype) or "int8" (one int8 code per value and a float32 scale per
        position and kv head: a quarter of fp32's bytes, half of bf16's, for long contexts)."""
        from .loading import default_model_path

        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike (or None for the bundled model), got "
                            f"{type(path).__name__}")
        path = default_model_path() if path is None else os.fspath(path)
        try:
            device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda', got {device!r}: {e}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: CUDA is not available (torch {torch.__version__}, "
                             f"torch.cuda.is_available() is False); use device='cpu'")
        if act not in ("float", "int8"):
            raise ValueError(f"act must be 'float' or 'int8', got {act!r}")
        dtype = dtype or _default_dtype(device)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        if kv_cache not in (None, "int8"):
            raise ValueError(f"kv_cache must be None or 'int8', got {kv_cache!r}")
        if os.path.isdir(path):
            from .loading.safetensors import load_hf_dir
            from .loading.tokenizer import Tokenizer

            model, cfg = load_hf_dir(path, device, dtype)
            llm = cls(model, Tokenizer.from_hf_dir(path), cfg)
        elif os.path.isfile(path):
            from .loading.gguf import load_gguf

            llm = cls(*load_gguf(path, device, dtype, act))
        else:
            raise FileNotFoundError(f"{path} is neither a model directory nor a .gguf file")
        if quantize is not None:
            from .nn import quantize_model

            quantize_model(llm.model, scheme=quantize, act=act)
        if tensor_parallel:
            from .parallel import shard_model

            shard_model(llm.model)
        llm.model.kv_cache_dtype = torch.int8 if kv_cache == "int8" else None
        return llm

    # ---- token level -------------------------------------------------------------------------------
    def generate_ids(self, prompts: list[list[int]], max_new_tokens: int = 64, **sampling) -> list[list[int]]:
        """Token ids in, generated token ids out (EOS included when produced; no stop strings).
        prompts: a list of lists of int token ids, each in [0, vocab_size)."""
        prompts = check_prompts(prompts, self.model.cfg.max_seq_len, self.model.cfg.vocab_size)
        out = [[] for _ in prompts]
        done = [False] * len(prompts)
        with torch.inference_mode():
            for nxt in token_steps(self.model, prompts, max_new_tokens, SamplingParams(**sampling), self.eos_ids):
                for i, t in enumerate(nxt.tolist()):
                    if not done[i]:
                        out[i].append(t)
                        done[i] = t in self.eos_ids
        return out

    # ---- text level --------------------------------------------------------------------------------
    def _encode(self, prompt, name: str = "prompt") -> list[int]:
        if not isinstance(prompt, str):
            raise TypeError(f"a prompt must be a str, got {type(prompt).__name__} ({name})")
        return self.tokenizer.encode(check_text(prompt, name))

    def _pieces(self, prompts: list[list[int]], max_new_tokens: int, stop, sampling) -> Iterator[list[str]]:
        """Per decode step, the new text of every row ("" for a finished row)."""
        stop = stop_strings(stop)
        params = SamplingParams(**sampling)
        streams = [TextStream(self.tokenizer, stop) for _ in prompts]
        finished = torch.zeros(len(prompts), dtype=torch.bool, device=self.model.tok_embeddings.weight.device)
        done = [False] * len(prompts)
        with torch.inference_mode():
            for nxt in token_steps(self.model, prompts, max_new_tokens, params, self.eos_ids, finished):
                pieces = []
                for i, t in enumerate(nxt.tolist()):
                    piece = ""
                    if not done[i]:
                        if t in self.eos_ids:
                            done[i] = True
                        else:
                            piece = streams[i].push(t)
                            if streams[i].stopped:
                                done[i] = True
                                finished[i] = True
                    pieces.append(piece)
                yield pieces
        yield [s.finish() for s in streams]

    def generate(self, prompts: str | list[str], max_new_tokens: int = 64, *, stop=None, **sampling):
        """The completion of each prompt (str for a str, list[str] for a list), generated as one batch."""
        single = isinstance(prompts, str)
        if not single and (isinstance(prompts, (bytes, bytearray, dict)) or not hasattr(prompts, "__iter__")):
            raise TypeError(f"prompts must be a str or a list of str, got {type(prompts).__name__}")
        batch = [prompts] if single else list(prompts)
        texts = [""] * len(batch)
        ids = [self._encode(p, "prompts" if single else f"prompts[{i}]") for i, p in enumerate(batch)]
        for pieces in self._pieces(ids, max_new_tokens, stop, sampling):
            texts = [t + p for t, p in zip(texts, pieces)]
        return texts[0] if single else texts

    def stream(self, prompt: str, max_new_tokens: int = 64, *, stop=None, **sampling) -> Iterator[str]:
        """The completion of one prompt, as text pieces while they are generated."""
        for pieces in self._pieces([self._encode(prompt)], max_new_tokens, stop, sampling):
            if pieces[0]:
                yield pieces[0]

    def chat(self, messages: list[dict], max_new_tokens: int = 256, *, stream: bool = False, stop=None,
             **sampling):
        """The assistant's reply to a conversation [{"role": "user", "content": ...}, ...], rendered with the
        model's chat template; an iterator of pieces with stream=True. A message's content is a str or
        OpenAI's text parts [{"type": "text", "text": ...}, ...] (joined), as the server takes them."""
        ids = encode_chat(self.tokenizer, messages)
        pieces = (p[0] for p in self._pieces([ids], max_new_tokens, stop, sampling))
        return (p for p in pieces if p) if stream else "".join(pieces)
