"""fastllm.softmax against a float64 reference, forward and backward, on every backend."""
import pytest
import torch

import fastllm
from helpers import DEVICES, DTYPES, assert_close, device_backends, randn, running_on

# (shape, dim): row lengths 1, 3, 127, 4097 along the last or an inner dim, 1-D to 4-D.
CASES = [((1,), -1), ((3,), 0), ((5, 127), -1), ((2, 4097), -1), ((3, 7, 5), 1), ((2, 3, 4, 17), 0),
         ((4, 1), -1), ((2, 3, 33), -1)]


def _check(x, dim, dtype, backend, seed):
    g = randn(x.shape, dtype, x.device, seed=seed + 1)
    x_ours = x.clone().requires_grad_()
    x_torch = x.clone().requires_grad_()
    x_ref = x.detach().double().requires_grad_()
    with running_on(backend):
        y = fastllm.softmax(x_ours, dim)
        y.backward(g)
    y_t = torch.softmax(x_torch, dim)
    y_t.backward(g)
    y_r = torch.softmax(x_ref, dim)
    y_r.backward(g.double())
    assert y.shape == x.shape and y.dtype == dtype
    assert_close("y", y, y_t, y_r)
    assert_close("dx", x_ours.grad, x_torch.grad, x_ref.grad)


@pytest.mark.parametrize("device,backend", device_backends("softmax"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,dim", CASES, ids=str)
def test_softmax_matches_reference(device, backend, dtype, shape, dim):
    x = randn(shape, dtype, device, seed=sum(shape), scale=3.0)
    _check(x, dim, dtype, backend, seed=len(shape))


@pytest.mark.parametrize("device,backend", device_backends("softmax"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_softmax_long_row(device, backend, dtype):
    """Rows longer than one block are processed in chunks (262144 columns)."""
    x = randn((2, 262144), dtype, device, seed=7, scale=4.0)
    _check(x, -1, dtype, backend, seed=3)


@pytest.mark.parametrize("device,backend", device_backends("softmax"))
def test_softmax_strided_and_special_values(device, backend):
    big = randn((6, 300), torch.float32, device, seed=11)
    x = big[1:5, 10:210]  # row-strided view: used without a copy
    x[0, 3] = float("inf")
    x[1, :] = float("-inf")  # fully masked row -> NaN as torch gives
    x[2, 5] = float("nan")
    x[3, :100] = float("-inf")
    with running_on(backend):
        y = fastllm.softmax(x, -1)
    torch.testing.assert_close(y, torch.softmax(x, -1), equal_nan=True, atol=1e-6, rtol=1e-5)
    xt = randn((64, 48), torch.float32, device, seed=12).t()  # transposed: any layout works
    with running_on(backend):
        torch.testing.assert_close(fastllm.softmax(xt, -1), torch.softmax(xt, -1), atol=1e-6, rtol=1e-5)


def test_softmax_dtype_argument_zero_dim_and_empty():
    x = torch.randn(4, 9, dtype=torch.float16)
    y = fastllm.softmax(x, -1, dtype=torch.float32)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, torch.softmax(x, -1, dtype=torch.float32))
    s = torch.tensor(2.5)
    assert fastllm.softmax(s, 0).item() == 1.0 and fastllm.softmax(s, 0).shape == ()
    for shape, dim in [((0, 5), -1), ((3, 0), -1), ((3, 0), 0)]:
        e = torch.empty(shape, requires_grad=True)
        y = fastllm.softmax(e, dim)
        assert y.shape == e.shape
        y.sum().backward()
        assert e.grad.shape == e.shape
    x64 = torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(fastllm.softmax(x64), torch.softmax(x64, -1))
    assert fastllm.dispatch_log()["softmax"]["backend"] == "torch"


def test_softmax_bad_input():
    with pytest.raises(TypeError, match="x"):
        fastllm.softmax(torch.arange(5), -1)
    with pytest.raises(TypeError, match="x"):
        fastllm.softmax([1.0, 2.0], -1)
    with pytest.raises(ValueError, match="dim"):
        fastllm.softmax(torch.randn(2, 3), 2)
    with pytest.raises(TypeError, match="dim"):
        fastllm.softmax(torch.randn(2, 3), 1.0)
    with pytest.raises(TypeError, match="dtype"):
        fastllm.softmax(torch.randn(2, 3), -1, dtype=torch.int32)


@pytest.mark.parametrize("device", DEVICES)
def test_softmax_opcheck(device):
    x = torch.randn(3, 5, 7, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fastllm.softmax.default, (x, 1))
    y = torch.softmax(x.detach(), 1)
    torch.library.opcheck(torch.ops.fastllm.softmax_backward.default, (y, torch.randn_like(y), 1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["fused", "packed", "looped", "split"])
def test_triton_softmax_variants(device, dtype, variant):
    """Each Triton kernel variant, forced at a small size, against the float64 reference."""
    from fastllm.kernels import softmax as tk

    rows, cols = (33, 5) if variant == "packed" else (3, 300)
    force = {"fused": {}, "packed": {"min_programs": 1},
             "looped": {"max_fused_cols": 64, "loop_block": 64, "min_programs": 1},
             "split": {"max_fused_cols": 64, "loop_block": 64, "min_programs": 64}}[variant]
    config = tk.pick_config(rows, cols, **force)
    assert config.looped == (variant in ("looped", "split"))
    assert (config.splits > 1) == (variant == "split") and (config.rows_per_prog > 1) == (variant == "packed")
    x = randn((rows, cols + 7), dtype, device, seed=rows, scale=3.0)[:, :cols]  # row-strided
    x[0, : cols // 2] = float("-inf")  # the first chunks of a row entirely -inf
    x[1] -= 200.0  # every exp(x_j) underflows: only the shift by the row's own max keeps it finite
    dy = randn((rows, cols), dtype, device, seed=cols)
    y = tk.softmax_fwd(x, config=config)
    y_ref = torch.softmax(x.double(), -1)
    assert_close("y", y, torch.softmax(x, -1), y_ref)
    dx = tk.softmax_bwd(y, dy, config=config)
    dx_ref = y_ref * (dy.double() - (dy.double() * y_ref).sum(-1, keepdim=True))
    assert_close("dx", dx, torch._softmax_backward_data(dy, torch.softmax(x, -1), -1, dtype), dx_ref)
