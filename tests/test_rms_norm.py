"""fastllm.rms_norm and fastllm.add_rms_norm against a float64 reference, forward and gradients."""
import pytest
import torch
import torch.nn.functional as F

import fastllm
from helpers import DEVICES, DTYPES, assert_close, device_backends, norm_dx_scale, randn, running_on

CASES = [((4, 1), (1,)), ((5, 3), (3,)), ((3, 7, 127), (127,)), ((2, 4097), (4097,)), ((2, 3, 4, 5), (4, 5)),
         ((17,), (17,))]


def _grads(fn, inputs, g):
    y = fn(*inputs)
    ys = y if isinstance(y, tuple) else (y,)
    gs = g if isinstance(g, tuple) else (g,)
    torch.autograd.backward(ys, gs)
    return list(ys) + [None if t is None else t.grad for t in inputs]


def _three_ways(ours_fn, torch_fn, inputs, g, backend, scales=None):
    """Outputs and input gradients from fastllm (on `backend`), torch in-dtype and torch in float64,
    compared by the tolerance rule; scales: {index in outputs + input grads: atol scale}."""
    def leaves(cast):
        return [None if t is None else cast(t).requires_grad_() for t in inputs]

    with running_on(backend):
        ours = _grads(ours_fn, leaves(lambda t: t.detach()), g)  # detach keeps a view's strides (clone would not)
    theirs = _grads(torch_fn, leaves(lambda t: t.detach()), g)
    g64 = tuple(t.double() for t in g) if isinstance(g, tuple) else g.double()
    ref = _grads(torch_fn, leaves(lambda t: t.detach().double()), g64)
    for i, (o, t, r) in enumerate(zip(ours, theirs, ref)):
        if r is None:
            assert o is None
        else:
            assert o.shape == r.shape
            assert_close(f"output/grad {i}", o, t, r, scale=(scales or {}).get(i))


@pytest.mark.parametrize("device,backend", device_backends("rms_norm"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,ns", CASES, ids=str)
@pytest.mark.parametrize("with_weight", [True, False], ids=["w", "nw"])
def test_rms_norm_matches_reference(device, backend, dtype, shape, ns, with_weight):
    seed = sum(shape) * 3 + len(ns)
    x = randn(shape, dtype, device, seed=seed, shift=0.5, scale=2.0)
    w = randn(ns, dtype, device, seed=seed + 1) if with_weight else None
    g = randn(shape, dtype, device, seed=seed + 2)
    eps = 1e-6
    _three_ways(lambda x, w: fastllm.rms_norm(x, ns, w, eps), lambda x, w: F.rms_norm(x, ns, w, eps), [x, w], g,
                backend, {1: norm_dx_scale(x, g, w, len(ns), centered=False)})


@pytest.mark.parametrize("device,backend", device_backends("rms_norm"))
def test_rms_norm_rows_split_over_threads(device, backend):
    """64 x 520 elements, over the C++ kernels' parallel threshold (2^15): the rows are cut into chunks per
    thread, whose partial dweight sums are then added up."""
    x = randn((64, 520), torch.float32, device, seed=21, shift=0.5)
    w, g = randn((520,), torch.float32, device, seed=22), randn((64, 520), torch.float32, device, seed=23)
    _three_ways(lambda x, w: fastllm.rms_norm(x, (520,), w, 1e-6), lambda x, w: F.rms_norm(x, (520,), w, 1e-6),
                [x, w], g, backend, {1: norm_dx_scale(x, g, w, 1, centered=False)})


def _add_rms_torch(x, r, w, eps):
    s = x + r
    return F.rms_norm(s, (s.shape[-1],), w, eps), s


@pytest.mark.parametrize("device,backend", device_backends("rms_norm"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 1), (2, 5, 127), (2, 4097)], ids=str)
def test_add_rms_norm_matches_reference(device, backend, dtype, shape):
    seed = sum(shape)
    x = randn(shape, dtype, device, seed=seed)
    r = randn(shape, dtype, device, seed=seed + 1, scale=4.0)
    w = randn(shape[-1:], dtype, device, seed=seed + 2)
    g = (randn(shape, dtype, device, seed=seed + 3), randn(shape, dtype, device, seed=seed + 4))
    dx_scale = norm_dx_scale(x.double() + r.double(), g[0], w, 1, centered=False) + g[1].abs().max().item()
    _three_ways(lambda x, r, w: fastllm.add_rms_norm(x, r, w, 1e-5), lambda x, r, w: _add_rms_torch(x, r, w, 1e-5),
                [x, r, w], g, backend, {2: dx_scale, 3: dx_scale})


@pytest.mark.parametrize("device,backend", device_backends("rms_norm"))
def test_rms_norm_strided_inputs_and_default_eps(device, backend):
    x = randn((6, 300), torch.float16, device, seed=1)[1:5, 50:250]
    w = randn((200,), torch.float16, device, seed=2)
    g = randn((4, 200), torch.float16, device, seed=3)
    eps16 = torch.finfo(torch.float16).eps  # the default for float16 input (the float64 reference needs it named)
    _three_ways(lambda x, w: fastllm.rms_norm(x, (200,), w), lambda x, w: F.rms_norm(x, (200,), w, eps16), [x, w],
                g, backend)
    xt = randn((40, 3), torch.float32, device, seed=4).t()
    rt = randn((3, 40), torch.float32, device, seed=5)
    eps32 = torch.finfo(torch.float32).eps
    _three_ways(lambda x, r: fastllm.add_rms_norm(x, r, None), lambda x, r: _add_rms_torch(x, r, None, eps32),
                [xt, rt], (randn((3, 40), torch.float32, device, seed=6), randn((3, 40), torch.float32, device,
                                                                                  seed=7)), backend)


@pytest.mark.parametrize("device,backend", device_backends("rms_norm"))
def test_rms_norm_strided_and_broadcast_weights(device, backend):
    """A [::2] slice and a stride-0 expanded weight: the kernels read dense copies, which must live until they
    return (forward and backward, rms_norm and add_rms_norm)."""
    x = randn((64, 256), torch.float32, device, seed=41)
    g = randn((64, 256), torch.float32, device, seed=42)
    sliced = randn((512,), torch.float32, device, seed=43)[::2]
    for w in (sliced, randn((1,), torch.float32, device, seed=44).expand(256)):
        _three_ways(lambda x, w: fastllm.rms_norm(x, (256,), w, 1e-6), lambda x, w: F.rms_norm(x, (256,), w, 1e-6),
                    [x, w], g, backend)
        r = randn((64, 256), torch.float32, device, seed=45)
        _three_ways(lambda x, r, w: fastllm.add_rms_norm(x, r, w, 1e-6), lambda x, r, w: _add_rms_torch(x, r, w, 1e-6),
                    [x, r, w], (g, randn((64, 256), torch.float32, device, seed=46)), backend)


def test_rms_norm_empty_and_bad_input():
    e = torch.empty(0, 4, requires_grad=True)
    w = torch.ones(4, requires_grad=True)
    y = fastllm.rms_norm(e, (4,), w)
    y.sum().backward()
    assert y.shape == (0, 4) and torch.equal(w.grad, torch.zeros(4))
    x = torch.randn(3, 4)
    with pytest.raises(TypeError, match="x"):
        fastllm.rms_norm(torch.ones(3, 4, dtype=torch.int32), (4,))
    with pytest.raises(ValueError, match="normalized_shape"):
        fastllm.rms_norm(x, (5,))
    with pytest.raises(ValueError, match="normalized_shape must name at least one dimension"):
        fastllm.rms_norm(x, [])
    with pytest.raises(ValueError, match="weight"):
        fastllm.rms_norm(x, (4,), torch.ones(5))
    with pytest.raises(ValueError, match="eps must be a non-negative number"):  # (the C++ kernel checks it too)
        fastllm.rms_norm(x, (4,), eps=-1e-3)
    with pytest.raises(ValueError, match="x must have at least one dimension"):
        fastllm.add_rms_norm(torch.tensor(1.0), torch.tensor(2.0))
    with pytest.raises(ValueError, match="residual"):
        fastllm.add_rms_norm(x, torch.randn(3, 5))
    with pytest.raises(TypeError, match="residual"):
        fastllm.add_rms_norm(x, torch.randn(3, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="residual"):
        fastllm.add_rms_norm(x, torch.randn(3, 4, device="meta"))
    with pytest.raises(ValueError, match="weight"):
        fastllm.add_rms_norm(x, x, torch.ones(3))


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_opcheck(device):
    x = torch.randn(3, 5, 7, device=device, requires_grad=True)
    w = torch.randn(7, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fastllm.rms_norm_fwd.default, (x, [7], w, 1e-6))
    torch.library.opcheck(torch.ops.fastllm.rms_norm_fwd.default, (x, [5, 7], None, 1e-6))
    torch.library.opcheck(torch.ops.fastllm.add_rms_norm_fwd.default, (x, torch.randn(3, 5, 7, device=device), w, 1e-6))
    _, rstd = torch.ops.fastllm.rms_norm_fwd(x.detach(), [7], w.detach(), 1e-6)
    torch.library.opcheck(torch.ops.fastllm.rms_norm_bwd.default,
                          (torch.randn_like(x), x.detach(), w.detach(), rstd, torch.randn_like(x), [7], True))
