"""fastllm.nn.QuantLinear and fastllm.quantize_model: layers replaced in a tiny random Llama give
logits close to the float model, the kernels inside the model agree with the reference backend,
and the quantised state_dict round-trips (safetensors included)."""
import pytest
import torch
import torch.nn.functional as F

import fastllm
from fastllm.nn import QuantLinear
from helpers import running_on

transformers = pytest.importorskip("transformers")

# Relative RMS error of the logits against the float model, measured on this random tiny Llama
# (std-0.02 weights, small near-uniform logits, seven quantised matrices per layer in series):
# int8 0.012 (0.013 with int8 activations), int4/32 0.15, int4_asym/128 0.19 (either activation
# mode); a wrong kernel gives errors of order 1. The agreement with the reference backend, which
# runs the same quantised weights through dequantise-then-matmul, is checked tightly below.
LOGIT_BOUND = {"int8": 0.03, "int4": 0.3, "int4_asym": 0.3}


def _tiny_llama(seed=0):
    config = transformers.LlamaConfig(vocab_size=101, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def _logits(model, backend=None):
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if backend is None:
            return model(input_ids=ids).logits
        with running_on(backend):
            return model(input_ids=ids).logits


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("scheme,group,act", [("int8", None, "float"), ("int4", 32, "float"),
                                              ("int4_asym", 128, "int8"), ("int8", 64, "int8")], ids=str)
def test_quantized_llama_logits_close_to_float(scheme, group, act):
    model = _tiny_llama()
    ref = _logits(model)
    fastllm.quantize_model(model, scheme, group, act=act)
    layers = dict(model.named_modules())
    assert isinstance(layers["model.layers.0.mlp.down_proj"], QuantLinear)
    assert isinstance(layers["model.layers.1.self_attn.q_proj"], QuantLinear)
    assert type(layers["lm_head"]) is torch.nn.Linear  # skipped by default
    out = _logits(model, "cpu")
    assert _rel(out, ref) < LOGIT_BOUND[scheme]
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.6
    # the SIMD kernels against the scalar one and the reference (dequantise-then-matmul, activations quantised
    # identically): with float activations equal to float32 rounding; with int8 activations a last-bit
    # difference upstream (each path sums the per-block partial products in its own order) may move an
    # activation across a rounding boundary (one quantum), so a norm bound
    for other in (_logits(model, "cpu-scalar"), _logits(model, "torch")):
        if act == "float":
            torch.testing.assert_close(out, other, atol=1e-4, rtol=1e-4)
        else:
            assert _rel(out, other) < 2e-3


def test_quantized_state_dict_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    model = fastllm.quantize_model(_tiny_llama(0), "int4_asym", 64, skip=("lm_head", "*.o_proj"))
    assert type(model.model.layers[0].self_attn.o_proj) is torch.nn.Linear
    sd = model.state_dict()
    assert {"model.layers.0.mlp.up_proj.qweight", "model.layers.0.mlp.up_proj.scales",
            "model.layers.0.mlp.up_proj.mins"} <= set(sd)
    save_file(sd, tmp_path / "m.safetensors")
    other = fastllm.quantize_model(_tiny_llama(1), "int4_asym", 64, skip=("lm_head", "*.o_proj"))
    other.load_state_dict(load_file(tmp_path / "m.safetensors"))
    assert torch.equal(_logits(other, "cpu"), _logits(model, "cpu"))


def test_from_linear_and_bad_input():
    lin = torch.nn.Linear(64, 24)
    q = QuantLinear.from_linear(lin, "int8")
    x = torch.randn(5, 64, requires_grad=True)
    y = q(x)
    torch.testing.assert_close(y, F.linear(x, q.quantized_weight().dequantize(), lin.bias), atol=1e-5, rtol=1e-5)
    y.sum().backward()
    assert x.grad.shape == x.shape and q.bias.grad.shape == (24,)
    assert "scheme='int8'" in repr(q)
    with pytest.raises(TypeError, match="linear"):
        QuantLinear.from_linear(torch.nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="in_features"):
        QuantLinear(40, 8)
    with pytest.raises(ValueError, match="act"):
        QuantLinear(64, 8, act="fp8")
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):  # the module checks x alone
        q(torch.ones(5, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 64\)"):
        q(torch.randn(5, 63))
    with pytest.raises(ValueError, match="0.proj"):
        fastllm.quantize_model(torch.nn.Sequential(torch.nn.ModuleDict({"proj": torch.nn.Linear(48, 8)})), "int4", 32)
    sd = q.state_dict()
    sd["scales"] = torch.full_like(sd["scales"], float("inf"))
    with pytest.raises(ValueError, match="scales"):
        QuantLinear(64, 24, scheme="int8").load_state_dict(sd)


@pytest.mark.parametrize("scheme", ["int8", "int4", "int4_asym"])
def test_fused_rows_equal_the_separate_layers(scheme):
    """nn.quant_linear.fused: one layer over the concatenated rows gives exactly the separate outputs; the
    layers' buffers become views of the fused ones (a load_state_dict reaches both); moved buffers rebuild it."""
    from fastllm.nn.quant_linear import fused

    torch.manual_seed(0)
    mods = [QuantLinear.from_linear(torch.nn.Linear(256, n, bias=False), scheme) for n in (48, 16, 16)]
    owner = torch.nn.Module()
    x = torch.randn(3, 5, 256)
    separate = torch.cat([m(x) for m in mods], -1)
    f = fused(mods, owner, "_f")
    assert torch.equal(f(x), separate)
    assert fused(mods, owner, "_f") is f  # cached
    assert mods[1].qweight.data_ptr() == f.qweight[48:].data_ptr()  # a view, no second copy
    other = QuantLinear.from_linear(torch.nn.Linear(256, 16, bias=False), scheme)
    mods[2].load_state_dict(other.state_dict())  # in place: the fused layer sees it
    assert torch.equal(fused(mods, owner, "_f")(x)[..., 64:], other(x))
    mods[0].qweight = mods[0].qweight.clone()  # another tensor (as after .to()): built again, same numbers
    g = fused(mods, owner, "_f")
    assert g is not f and torch.equal(g(x)[..., :48], mods[0](x))


def test_fused_declines_what_it_cannot_join():
    from fastllm.nn.quant_linear import fused

    owner = torch.nn.Module()
    q = QuantLinear.from_linear(torch.nn.Linear(64, 8, bias=False), "int8")
    assert fused([q, torch.nn.Linear(64, 8, bias=False)], owner, "_a") is None  # dense
    assert fused([q, QuantLinear.from_linear(torch.nn.Linear(64, 8), "int8")], owner, "_b") is None  # a bias
    assert fused([q, QuantLinear.from_linear(torch.nn.Linear(64, 8, bias=False), "int4", 32)], owner, "_c") is None
