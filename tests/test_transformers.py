"""attn_implementation="fastllm" in transformers: a tiny random-weight Llama (GQA) built offline from a
config gives the logits of the sdpa implementation, on the reference path and on the Triton kernels."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastllm  # noqa: E402
from fastllm.integrations import transformers as fl_hf  # noqa: E402
from helpers import DEVICES, running_on  # noqa: E402


def _tiny_llama(attn: str):
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      attn_implementation=attn)
    torch.manual_seed(0)  # the same random weights for both implementations
    return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_llama_logits_match_sdpa(device, backend):
    fl_hf.register()
    ref_model, model = _tiny_llama("sdpa"), _tiny_llama("fastllm")
    assert model.config._attn_implementation == "fastllm"
    model, ref_model = model.eval().to(device), ref_model.eval().to(device)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: a real mask reaches the attention
    with torch.no_grad():
        ref = ref_model(input_ids=ids, attention_mask=mask).logits
        fastllm._dispatch._log.clear()
        with running_on(backend):
            out = model(input_ids=ids, attention_mask=mask).logits
    assert fastllm.dispatch_log()["attention"]["backend"] == backend
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=2e-5, rtol=2e-5)
