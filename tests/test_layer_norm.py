"""fastllm.layer_norm against a float64 reference: forward, dx, dweight, dbias, on every backend."""
import pytest
import torch
import torch.nn.functional as F

import fastllm
from helpers import DEVICES, DTYPES, assert_close, device_backends, norm_dx_scale, randn, running_on

# (input shape, normalized_shape): row lengths 1, 3, 127, 4097; 2-D to 4-D; multi-dim normalisation.
CASES = [((4, 1), (1,)), ((5, 3), (3,)), ((3, 7, 127), (127,)), ((2, 4097), (4097,)), ((2, 3, 4, 5), (4, 5)),
         ((17,), (17,)), ((2, 2, 33), (2, 33))]


def _run(x, ns, w, b, backend, g, eps=1e-5):
    """(y, dx, dw, db) from fastllm on `backend`, torch in the same dtype, and the float64 reference."""
    outs = []
    for kind in ("ours", "torch", "ref"):
        # detach keeps a view's strides (clone would make a row-strided view contiguous)
        cast = (lambda t: t.detach().double()) if kind == "ref" else (lambda t: t.detach())
        xi = cast(x).requires_grad_()
        wi = None if w is None else cast(w).requires_grad_()
        bi = None if b is None else cast(b).requires_grad_()
        if kind == "ours":
            with running_on(backend):
                y = fastllm.layer_norm(xi, ns, wi, bi, eps)
                y.backward(g)
        else:
            y = F.layer_norm(xi, ns, wi, bi, eps)
            y.backward(g.double() if kind == "ref" else g)
        outs.append((y, xi.grad, None if wi is None else wi.grad, None if bi is None else bi.grad))
    return outs + [norm_dx_scale(x, g, w, len(ns), centered=True)]


def _check_all(ours, theirs, ref, dx_scale):
    for name, o, t, r in zip(("y", "dx", "dweight", "dbias"), ours, theirs, ref):
        if r is None:
            assert o is None, name
        else:
            assert o.shape == r.shape, name
            assert_close(name, o, t, r, scale=dx_scale if name == "dx" else None)


@pytest.mark.parametrize("device,backend", device_backends("layer_norm"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,ns", CASES, ids=str)
@pytest.mark.parametrize("affine", ["wb", "w", "none"])
def test_layer_norm_matches_reference(device, backend, dtype, shape, ns, affine):
    seed = sum(shape) + len(ns)
    x = randn(shape, dtype, device, seed=seed, shift=2.0, scale=3.0)
    w = randn(ns, dtype, device, seed=seed + 1) if affine != "none" else None
    b = randn(ns, dtype, device, seed=seed + 2) if affine == "wb" else None
    g = randn(shape, dtype, device, seed=seed + 3)
    _check_all(*_run(x, ns, w, b, backend, g))


@pytest.mark.parametrize("device,backend", device_backends("layer_norm"))
def test_layer_norm_large_mean_and_strides(device, backend):
    """|mean| >> std (a one-pass variance would cancel), a row-strided view and a transposed input."""
    x = randn((8, 200), torch.float32, device, seed=5, shift=1000.0, scale=0.5)[:, 20:180]
    w, b = randn((160,), torch.float32, device, seed=6), randn((160,), torch.float32, device, seed=7)
    _check_all(*_run(x, (160,), w, b, backend, randn((8, 160), torch.float32, device, seed=8)))
    xt = randn((48, 6), torch.bfloat16, device, seed=9).t()
    wt = randn((48,), torch.bfloat16, device, seed=10)
    _check_all(*_run(xt, (48,), wt, None, backend, randn((6, 48), torch.bfloat16, device, seed=11)))


@pytest.mark.parametrize("device,backend", device_backends("layer_norm"))
def test_layer_norm_rows_split_over_threads(device, backend):
    """64 x 520 elements, over the C++ kernels' parallel threshold (2^15): the rows are cut into chunks per
    thread, whose partial dweight and dbias sums are then added up."""
    x = randn((64, 520), torch.float32, device, seed=21, shift=1.0)
    w, b = randn((520,), torch.float32, device, seed=22), randn((520,), torch.float32, device, seed=23)
    _check_all(*_run(x, (520,), w, b, backend, randn((64, 520), torch.float32, device, seed=24)))


@pytest.mark.parametrize("device,backend", device_backends("layer_norm"))
def test_layer_norm_strided_and_broadcast_parameters(device, backend):
    """weight a [::2] slice of a longer tensor, bias one value expanded (stride 0): the kernels read dense copies,
    which must live until they return; the backward reads the weight too."""
    x = randn((64, 256), torch.float32, device, seed=31, shift=1.0)
    w = randn((512,), torch.float32, device, seed=32)[::2]
    b = randn((1,), torch.float32, device, seed=33).expand(256)
    _check_all(*_run(x, (256,), w, b, backend, randn((64, 256), torch.float32, device, seed=34)))


def test_layer_norm_fallbacks_and_empty():
    x64 = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(fastllm.layer_norm(x64, (8,)), F.layer_norm(x64, (8,)))
    assert fastllm.dispatch_log()["layer_norm"]["backend"] == "torch"
    x = torch.randn(3, 8)
    w32 = torch.randn(8, dtype=torch.float64)
    out = fastllm.layer_norm(x, (8,), w32)  # mixed dtypes: the reference path, with the reason recorded
    torch.testing.assert_close(out, (F.layer_norm(x.double(), (8,)) * w32).float())
    assert "mixed dtypes" in fastllm.dispatch_log()["layer_norm"]["skipped"]["cpu"]
    for shape in [(0, 8), (2, 0, 8)]:
        e = torch.empty(shape, requires_grad=True)
        w = torch.randn(8, requires_grad=True)
        y = fastllm.layer_norm(e, (8,), w)
        assert y.shape == e.shape
        y.sum().backward()
        assert torch.equal(w.grad, torch.zeros(8))


def test_layer_norm_bad_input():
    x = torch.randn(4, 8)
    with pytest.raises(TypeError, match="x"):
        fastllm.layer_norm(torch.ones(4, 8, dtype=torch.int64), (8,))
    with pytest.raises(ValueError, match="normalized_shape"):
        fastllm.layer_norm(x, (7,))
    with pytest.raises(ValueError, match="normalized_shape"):
        fastllm.layer_norm(x, (2, 4, 8))
    with pytest.raises(TypeError, match="normalized_shape"):
        fastllm.layer_norm(x, "8")
    with pytest.raises(ValueError, match="normalized_shape must name at least one dimension"):
        fastllm.layer_norm(x, ())
    with pytest.raises(ValueError, match="weight"):
        fastllm.layer_norm(x, (8,), torch.ones(7))
    with pytest.raises(ValueError, match="bias"):
        fastllm.layer_norm(x, (8,), torch.ones(8), torch.ones(2, 4))
    with pytest.raises(TypeError, match="weight"):
        fastllm.layer_norm(x, (8,), torch.ones(8, dtype=torch.int32))
    with pytest.raises(ValueError, match="eps must be a non-negative number"):  # (the C++ kernel checks it too)
        fastllm.layer_norm(x, (8,), eps=-1.0)
    with pytest.raises(ValueError, match="weight"):
        fastllm.layer_norm(x, (8,), torch.ones(8, device="meta"))


@pytest.mark.parametrize("device", DEVICES)
def test_layer_norm_opcheck(device):
    x = torch.randn(3, 5, 7, device=device, requires_grad=True)
    w, b = torch.randn(5, 7, device=device, requires_grad=True), torch.randn(5, 7, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fastllm.layer_norm_fwd.default, (x, [5, 7], w, b, 1e-5))
    torch.library.opcheck(torch.ops.fastllm.layer_norm_fwd.default, (x, [7], None, None, 1e-5))
    _, mean, rstd = torch.ops.fastllm.layer_norm_fwd(x.detach(), [5, 7], w.detach(), b.detach(), 1e-5)
    torch.library.opcheck(torch.ops.fastllm.layer_norm_bwd.default,
                          (torch.randn_like(x), x.detach(), w.detach(), mean, rstd, [5, 7], True, True))
