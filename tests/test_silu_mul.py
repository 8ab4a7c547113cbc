"""fastllm.silu_mul (SwiGLU's gate, silu(gate) * up) against a float64 reference, on every backend."""
import sys

import pytest
import torch
import torch.nn.functional as F

import fastllm
from helpers import (DTYPES, assert_close, compile_check, compile_sm90, device_backends, randn, running_on,
                     sm90_resources)

# Row lengths 1, 7 (one partial SIMD block), 8, 33, 1536 (SmolLM2's MLP), 4099; 0-D to 3-D; enough elements
# (3 x 16384) for the C++ kernel's parallel rows.
SHAPES = [(), (1,), (7,), (3, 8), (2, 33), (1, 1, 1536), (5, 4099), (3, 16384)]


def _check(gate, up, dtype, backend, seed):
    dy = randn(gate.shape, dtype, gate.device, seed=seed)
    ours = [t.detach().requires_grad_() for t in (gate, up)]  # keeps a view's strides (clone would not)
    theirs = [t.clone().requires_grad_() for t in (gate, up)]
    ref = [t.detach().double().requires_grad_() for t in (gate, up)]
    with running_on(backend):
        y = fastllm.silu_mul(*ours)
        y.backward(dy)
    y_t = F.silu(theirs[0]) * theirs[1]
    y_t.backward(dy)
    y_r = F.silu(ref[0]) * ref[1]
    y_r.backward(dy.double())
    assert y.shape == gate.shape and y.dtype == dtype
    assert_close("y", y, y_t, y_r)
    assert_close("d gate", ours[0].grad, theirs[0].grad, ref[0].grad)
    assert_close("d up", ours[1].grad, theirs[1].grad, ref[1].grad)


@pytest.mark.parametrize("device,backend", device_backends("silu_mul"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_silu_mul_matches_reference(device, backend, dtype, shape):
    gate = randn(shape, dtype, device, seed=len(shape), scale=4.0)   # both signs, well into the tails
    up = randn(shape, dtype, device, seed=len(shape) + 10)
    _check(gate, up, dtype, backend, seed=3)


@pytest.mark.parametrize("device,backend", device_backends("silu_mul"))
def test_silu_mul_halves_of_a_fused_projection(device, backend):
    """gate and up as the two column halves of one (rows, 2N) tensor: row-strided views, no copies."""
    gu = randn((5, 2 * 300), torch.float32, device, seed=5, scale=3.0)
    gate, up = gu.split(300, -1)
    _check(gate, up, torch.float32, backend, seed=6)


@pytest.mark.parametrize("device,backend", device_backends("silu_mul"))
@pytest.mark.parametrize("strided", ["gate", "up"])
def test_silu_mul_inputs_with_different_row_strides(device, backend, strided):
    """One input contiguous, the other a column slice of a wider tensor: each is read with its own row stride."""
    wide = randn((5, 320), torch.float32, device, seed=7, scale=3.0)[:, 7:307]
    dense = randn((5, 300), torch.float32, device, seed=8, scale=3.0)
    gate, up = (wide, dense) if strided == "gate" else (dense, wide)
    _check(gate, up, torch.float32, backend, seed=9)


@pytest.mark.parametrize("device,backend", device_backends("silu_mul"))
def test_silu_mul_special_values(device, backend):
    """Large |gate| never overflows; inf, -inf and NaN give what torch gives."""
    gate = torch.tensor([0.0, -0.0, 1e-30, 88.0, 89.0, -88.0, -104.0, -200.0, 3e38, -3e38, float("inf"),
                         float("-inf"), float("nan")], device=device)
    up = torch.full_like(gate, 2.0)
    with running_on(backend):
        y = fastllm.silu_mul(gate, up)
    torch.testing.assert_close(y, F.silu(gate) * up, equal_nan=True, rtol=2e-7, atol=0)


def test_silu_mul_bad_input():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="up must have gate's shape"):
        fastllm.silu_mul(x, torch.randn(3, 5))
    with pytest.raises(TypeError, match="up must have gate's dtype"):
        fastllm.silu_mul(x, x.half())
    with pytest.raises(TypeError, match="gate"):
        fastllm.silu_mul(x.long(), x.long())
    assert fastllm.silu_mul(torch.empty(0, 4), torch.empty(0, 4)).shape == (0, 4)


def test_silu_mul_opcheck():
    """The custom op's fake implementation, schema and autograd registration agree with what it does."""
    gate, up = (randn((3, 40), torch.float32, "cpu", seed=s).requires_grad_() for s in (1, 2))
    torch.library.opcheck(torch.ops.fastllm.silu_mul.default, (gate, up))


def test_triton_kernel_compiles_for_h100():
    """The Triton kernel compiles for sm_90 without spilling (the interpreter runs what the compiler may reject)."""
    compile_check(__file__)


if __name__ == "__main__" and sys.argv[1:] == ["compile-check"]:
    from fastllm.kernels import silu_mul as tk

    for t in ("*fp32", "*bf16", "*fp16"):
        compiled = compile_sm90(tk._silu_mul_kernel, {"g_ptr": t, "u_ptr": t, "y_ptr": t},
                                {"BLOCK": tk.BLOCK, "EXACT_BF16": False, "LIBDEVICE": True}, num_warps=4, num_stages=1)
        res = sm90_resources(compiled)
        print(t, res)
        assert res["stack"] == 0, "register spills"
        ptx = compiled.asm["ptx"]
        assert "div.rn.f32" in ptx and "div.full" not in ptx, "silu's division is not correctly rounded"
