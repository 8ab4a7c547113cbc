"""fastllm.linear_cross_entropy against F.linear + F.cross_entropy in float64, loss and both gradients, on
every backend (the Triton kernels under the interpreter here)."""
import contextlib
import sys

import pytest
import torch
import torch.nn.functional as F

import fastllm
from fastllm.reference import linear_cross_entropy as ref
from helpers import (DEVICES, DTYPES, assert_close, compile_check, compile_for_sm90, device_backends, randn,
                     running_on)

# (input shape (..., D), V): odd sizes; several token, vocab and D blocks; a 3-D input.
CASES = [((37, 45), 301), ((70, 150), 129), ((2, 9, 33), 17)]


def _run(h, w, t, backend=None, **kw):
    """loss, dh, dw of the fused op (or, with backend=None, of torch's unfused F.linear + F.cross_entropy)."""
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()  # a view keeps its strides (clone would not)
    with running_on(backend) if backend else contextlib.nullcontext():
        if backend is None:
            loss = F.cross_entropy(F.linear(h, w).flatten(0, -2), t.flatten(), **kw)
            loss = loss.view(t.shape) if kw.get("reduction") == "none" else loss
        else:
            loss = fastllm.linear_cross_entropy(h, w, t, **kw)
        g = randn(loss.shape, loss.dtype, loss.device, seed=5) if loss.dim() else torch.ones_like(loss)
        loss.backward(g)
    return loss, h.grad, w.grad


def _compare(h, w, t, backend, **kw):
    ours, torch_out = _run(h, w, t, backend, **kw), _run(h, w, t, **kw)
    exact = _run(h.double(), w.double(), t, **kw)
    for name, o, p, r in zip(("loss", "dh", "dw"), ours, torch_out, exact):
        assert o.shape == r.shape and o.dtype == h.dtype
        assert_close(name, o, p, r)


def _inputs(shape, v, dtype, device, seed):
    h = randn(shape, dtype, device, seed=seed)
    w = randn((v, shape[-1]), dtype, device, seed=seed + 1, scale=0.5)
    g = torch.Generator().manual_seed(seed + 2)
    t = torch.randint(0, v, shape[:-1], generator=g).to(device)
    t.view(-1)[1::4] = -100
    return h, w, t


@pytest.mark.parametrize("device,backend", device_backends("linear_cross_entropy"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,v", CASES, ids=str)
def test_linear_cross_entropy_matches_reference(device, backend, dtype, shape, v):
    h, w, t = _inputs(shape, v, dtype, device, seed=sum(shape) + v)
    _compare(h, w, t, backend)


@pytest.mark.parametrize("device,backend", device_backends("linear_cross_entropy"))
@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_linear_cross_entropy_reductions_and_smoothing(device, backend, reduction, smoothing):
    h, w, t = _inputs((19, 40), 77, torch.float32, device, seed=3)
    _compare(h, w, t, backend, reduction=reduction, label_smoothing=smoothing)
    big = randn((19, 52), torch.bfloat16, device, seed=4)
    h = big[:, 5:45]  # strided rows: taken without a copy
    t = torch.where(t == -100, 7, t)  # an ignore_index inside the vocabulary
    t = torch.stack([t, t.flip(0)], -1)[:, 0]  # the same targets as a strided column
    _compare(h, w.bfloat16(), t, backend, reduction=reduction, label_smoothing=smoothing, ignore_index=7)


@pytest.mark.parametrize("device,backend", device_backends("linear_cross_entropy"))
def test_linear_cross_entropy_all_ignored_and_empty(device, backend):
    h, w, t = _inputs((5, 16), 11, torch.float32, device, seed=9)
    t[:] = -100
    loss, dh, dw = _run(h, w, t, backend)
    assert torch.isnan(loss) and torch.all(dh == 0) and torch.all(dw == 0)  # as torch: 0 / 0 tokens
    loss, dh, dw = _run(h, w, t, backend, reduction="sum")
    assert loss.item() == 0.0
    e = torch.empty(0, 16, device=device)
    loss, dh, dw = _run(e, w, torch.empty(0, dtype=torch.long, device=device), backend, reduction="sum")
    assert loss.item() == 0.0 and dh.shape == (0, 16) and torch.all(dw == 0)


def test_torch_backend_works_in_token_chunks(monkeypatch):
    """The CPU path never holds more than CHUNK_ELEMS logits: forced to 3-token chunks, it still matches."""
    monkeypatch.setattr(ref, "CHUNK_ELEMS", 3 * 301)
    h, w, t = _inputs((37, 45), 301, torch.float32, "cpu", seed=1)
    _compare(h, w, t, "torch")


def test_linear_cross_entropy_bad_input():
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    lce = fastllm.linear_cross_entropy
    with pytest.raises(TypeError, match="input"):
        lce(h.long(), w, t)
    with pytest.raises(ValueError, match="input must have at least one dimension"):
        lce(torch.tensor(1.0), w, t)
    with pytest.raises(ValueError, match="weight"):
        lce(h, torch.randn(10, 7), t)
    with pytest.raises(TypeError, match="weight"):
        lce(h, w.double(), t)
    with pytest.raises(TypeError, match="target"):
        lce(h, w, t.float())
    with pytest.raises(ValueError, match="target"):
        lce(h, w, t[:3])
    with pytest.raises(ValueError, match="target"):
        lce(h, w, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(ValueError, match="target"):
        lce(h, w, torch.tensor([0, -1, 3, 2]))
    with pytest.raises(ValueError, match="reduction"):
        lce(h, w, t, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        lce(h, w, t, label_smoothing=1.5)
    with pytest.raises(TypeError, match="ignore_index"):
        lce(h, w, t, ignore_index=0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_linear_cross_entropy_opcheck(device):
    h, w, t = _inputs((6, 16), 13, torch.float32, device, seed=2)
    torch.library.opcheck(torch.ops.fastllm.linear_cross_entropy.default,
                          (h.requires_grad_(), w.requires_grad_(), t, -100, 0.1))
    loss, stats = torch.ops.fastllm.linear_cross_entropy(h.detach(), w.detach(), t, -100, 0.1)
    torch.library.opcheck(torch.ops.fastllm.linear_cross_entropy_backward.default,
                          (torch.randn_like(loss), h.detach(), w.detach(), t, stats, -100, 0.1))


def test_kernels_compile_for_h100():
    """The three kernels, with the launchers' full-size tiles, compile for sm_90 (bf16 and fp32) and fit its
    227 KiB of shared memory (no GPU needed: ahead-of-time compilation in a subprocess)."""
    compile_check(__file__)


if __name__ == "__main__" and sys.argv[1:] == ["compile-check"]:
    from fastllm.kernels import linear_cross_entropy as tk
    from fastllm.kernels._common import DOT_IEEE32, DOT_NATIVE

    for name in ("bf16", "fp32"):
        dot_mode = DOT_IEEE32 if name == "fp32" else DOT_NATIVE
        consts = dict(tk._blocks(1 << 20, 1 << 20, 1 << 20), DOT=dot_mode, EXACT_BF16=False)
        ptrs = {"h_ptr": "*" + name, "w_ptr": "*" + name, "dh_ptr": "*" + name, "dw_ptr": "*" + name,
                "t_ptr": "*i64", "st_ptr": "*fp32", "loss_ptr": "*fp32", "g_ptr": "*fp32"}
        for kernel in (tk._fwd_kernel, tk._dh_kernel, tk._dw_kernel):
            shared = compile_for_sm90(kernel, ptrs, consts, num_warps=tk.NUM_WARPS, num_stages=tk.NUM_STAGES,
                                      scalars={"ignore_index": "i64", "smoothing": "fp32"})
            print(name, kernel.fn.__name__, "shared", shared)
            assert shared <= 227 * 1024, "too much shared memory"
