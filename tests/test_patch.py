"""fastllm.patch_sdpa routes torch.nn.functional.scaled_dot_product_attention to fastllm.attention."""
import torch
import torch.nn.functional as F

import fastllm

TORCH_SDPA = F.scaled_dot_product_attention


def _qkv(d=16):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, 9, d, generator=g) for _ in range(3)]


def test_context_manager_routes_and_restores():
    q, k, v = _qkv()
    fastllm._dispatch._log.clear()  # so the entry below can only come from the patched call
    with fastllm.patch_sdpa():
        assert fastllm.sdpa_is_patched()
        with fastllm.patch_sdpa():  # nested blocks restore what they found
            pass
        assert fastllm.sdpa_is_patched()
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert "attention" in fastllm.dispatch_log()
    assert F.scaled_dot_product_attention is TORCH_SDPA
    torch.testing.assert_close(out, TORCH_SDPA(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5)


def test_function_form_and_fallback_for_large_head_dims():
    fastllm.patch_sdpa()
    try:
        assert fastllm.sdpa_is_patched()
        q, k, v = _qkv(d=320)  # beyond fastllm's head-dim limit: torch's own function runs it
        torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v), TORCH_SDPA(q, k, v))
    finally:
        fastllm.unpatch_sdpa()
    assert F.scaled_dot_product_attention is TORCH_SDPA and not fastllm.sdpa_is_patched()
