"""The decode step under a CUDA graph (fastllm/runtime/cuda_graph.py): replayed logits equal eager ones, and
generation gives the same tokens with and without graphs (GPU only); on CPU the eager step is used."""
import warnings

import pytest
import torch

from fastllm.loading.safetensors import load_hf_dir
from fastllm.runtime import cuda_graph
from helpers import needs_cuda
from tiny_models import tiny_llama


def test_cpu_uses_the_eager_step(tmp_path):
    tiny_llama(tmp_path)
    model, _ = load_hf_dir(str(tmp_path), "cpu", torch.float32)
    assert cuda_graph.graphs_enabled(model) == "CUDA graphs are for CUDA devices"


@needs_cuda
@pytest.mark.parametrize("dtype,kv", [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, torch.int8)])
def test_replay_equals_eager_decode(tmp_path, dtype, kv):
    tiny_llama(tmp_path)
    model, cfg = load_hf_dir(str(tmp_path), "cuda", dtype)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]
    toks = torch.randint(3, cfg.vocab_size, (6, len(prompts)), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.inference_mode():
        eager_cache, graph_cache = model.new_cache(3, 16, dtype=kv), model.new_cache(3, 16, dtype=kv)
        model.prefill(prompts, eager_cache)
        model.prefill(prompts, graph_cache)
        graphed = cuda_graph.GraphedDecode(model, graph_cache)
        for t in toks:
            expected = model.decode(t, eager_cache)
            got = graphed(t)
            torch.testing.assert_close(got, expected)
            assert graph_cache.longest == eager_cache.longest
        assert torch.equal(graph_cache.lengths, eager_cache.lengths)
        if kv is not None:  # the captured appends wrote the same codes and scales
            for name in ("k", "v", "k_scale", "v_scale"):
                assert torch.equal(getattr(graph_cache, name), getattr(eager_cache, name)), name


@needs_cuda
def test_generation_is_the_same_with_and_without_graphs(tmp_path, monkeypatch):
    from fastllm import LLM

    tiny_llama(tmp_path)
    llm = LLM.load(str(tmp_path), device="cuda", dtype=torch.float32)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed capture or a failed first-step check warns: fail instead
        with_graphs = llm.generate_ids(prompts, max_new_tokens=10)
    monkeypatch.setenv("FASTLLM_CUDA_GRAPHS", "0")
    assert llm.generate_ids(prompts, max_new_tokens=10) == with_graphs


@needs_cuda
def test_the_stepper_keeps_the_graph(tmp_path):
    tiny_llama(tmp_path)
    model, _ = load_hf_dir(str(tmp_path), "cuda", torch.float32)
    with torch.inference_mode():
        cache = model.new_cache(2, 16)
        model.prefill([[5, 6], [7, 8, 9]], cache)
        step = cuda_graph.decode_stepper(model, cache)
        step(torch.tensor([3, 4], device="cuda"))
        assert isinstance(step, cuda_graph._CheckedStep) and step.fn is step.graphed
