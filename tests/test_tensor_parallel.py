"""Tensor-parallel inference (fastllm/parallel): 2 processes (gloo, CPU) holding half the heads and half the MLP
each give the logits of one process (whole sequences, packed prefill, decode steps through the per-rank KV
cache) and the same greedy tokens from LLM.generate_ids; float and quantised (int4 group-wise, int8
per-channel) Llama with GQA, and GPT-2 (fused qkv, biases)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastllm
from fastllm.nn import QuantLinear
from fastllm.parallel import shard_model, slice_linear
from helpers import free_port
from tiny_models import tiny_gpt2, tiny_llama

MODELS = {  # name -> (builder, overrides, quantisation (scheme, group_size) or None)
    "llama-gqa": (tiny_llama, dict(num_attention_heads=4, num_key_value_heads=2), None),
    "llama-gqa-int4": (tiny_llama, dict(intermediate_size=128), ("int4", 32)),
    "llama-int8-bias": (tiny_llama, dict(intermediate_size=128, attention_bias=True, mlp_bias=True), ("int8", None)),
    "gpt2": (tiny_gpt2, {}, None),
}
PROMPTS, STEPS = [[5, 9, 17, 3, 40, 2], [7], [11, 12, 13, 14, 15, 16, 17, 18, 19]], 4


def _load(path: str, quant):
    llm = fastllm.LLM.load(path, device="cpu", dtype=torch.float32)
    if quant is not None:
        fastllm.quantize_model(llm.model, scheme=quant[0], group_size=quant[1])
    return llm


def _outputs(llm) -> dict:
    """Logits of a whole-sequence forward, of prefill + decode steps, and greedy tokens."""
    model = llm.model
    tokens = torch.randint(2, model.cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = model(tokens)                                                         # (2, 11, V)
        cache = model.new_cache(len(PROMPTS), max(map(len, PROMPTS)) + STEPS)
        steps = [model.prefill(PROMPTS, cache)]                                      # (B, V)
        for t in range(STEPS - 1):
            steps.append(model.decode(torch.tensor([20 + t, 30 + t, 40 + t]), cache))
        cache_heads = cache.k.shape[3]
    return {"full": full, "steps": torch.stack(steps), "cache_heads": cache_heads,
            "greedy": llm.generate_ids(PROMPTS, max_new_tokens=6)}


def _worker(rank: int, world: int, port: int, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {}
        for name, (_, _, quant) in MODELS.items():
            llm = _load(os.path.join(root, name), quant)
            shard_model(llm.model)
            results[name] = _outputs(llm)
        try:  # one kv head cannot be split over two ranks
            shard_model(_load(os.path.join(root, "mqa"), None).model)
        except ValueError as e:
            results["mqa_error"] = str(e)
        torch.save(results, os.path.join(root, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_process_tensor_parallel_equals_one_process(tmp_path):
    torch.set_num_threads(1)
    for name, (build, overrides, _) in MODELS.items():
        build(tmp_path / name, **overrides)
    tiny_llama(tmp_path / "mqa", num_key_value_heads=1)
    refs = {name: _outputs(_load(str(tmp_path / name), quant)) for name, (_, _, quant) in MODELS.items()}
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, ref in refs.items():
        n_kv = ref["cache_heads"]
        for res in results:
            got = res[name]
            torch.testing.assert_close(got["full"], ref["full"], rtol=1e-4, atol=1e-5, msg=name)
            torch.testing.assert_close(got["steps"], ref["steps"], rtol=1e-4, atol=1e-5, msg=name)
            assert got["cache_heads"] == n_kv // 2, name  # each rank caches only its kv heads
            assert got["greedy"] == ref["greedy"], name
        assert torch.equal(results[0][name]["full"], results[1][name]["full"]), name  # ranks agree exactly
    for res in results:
        assert "n_kv_heads (1) to be a multiple of 2" in res["mqa_error"]


def test_shard_model_needs_torch_distributed(tmp_path):
    tiny_llama(tmp_path)
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="torch.distributed initialised"):
        shard_model(fastllm.LLM.load(str(tmp_path), device="cpu").model)


@pytest.mark.parametrize("scheme,group_size", [(None, None), ("int4", 32), ("int8", None), ("int4_asym", 32)])
def test_slices_recompose_the_layer(scheme, group_size):
    """Output-feature slices concatenate, input-feature slices sum (plus the bias once) to the whole layer."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    if scheme is not None:
        lin = QuantLinear.from_linear(lin, scheme, group_size)
    x = torch.randn(5, 64)
    with torch.no_grad():
        full = lin(x)
        rows = torch.cat([slice_linear(lin, rows=torch.arange(a, b))(x) for a, b in ((0, 20), (20, 48))], -1)
        cols = sum(slice_linear(lin, cols=(a, b), bias=False)(x[:, a:b]) for a, b in ((0, 32), (32, 64)))
    torch.testing.assert_close(rows, full, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cols + lin.bias, full, rtol=1e-5, atol=1e-5)


def test_slice_quantised_layer_off_its_groups_is_refused():
    lin = QuantLinear.from_linear(torch.nn.Linear(128, 8), "int4", 64)
    with pytest.raises(ValueError, match="multiples of 32 and of its group size 64"):
        slice_linear(lin, cols=(0, 32))
    with pytest.raises(TypeError, match="linear must be"):
        slice_linear(torch.nn.Conv1d(2, 2, 1))
