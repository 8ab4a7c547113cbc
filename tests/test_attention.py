"""fastllm.attention against a float64 reference and torch's SDPA in the same dtype, forward and gradients,
on every backend (the Triton kernels run on CPU tensors under TRITON_INTERPRET=1: shapes stay small)."""
import contextlib
import os
import random
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastllm
from helpers import DEVICES, assert_close, compile_check, compile_for_sm90, device_backends, randn, running_on

from fastllm import attention, attention_varlen

BACKENDS = device_backends("attention")


# ---- case construction -------------------------------------------------------------------------
def _visible(lq, lk, bottom_right, device):
    """Causal visibility (Lq, Lk): key j visible to query i iff j <= i (+ Lk - Lq when bottom-right)."""
    return torch.ones(lq, lk, dtype=torch.bool, device=device).tril(lk - lq if bottom_right else 0)


def _make_mask(kind, shape, dtype, device, seed):
    if kind == "none":
        return None
    g = torch.Generator().manual_seed(seed)
    if kind == "bool":
        m = torch.rand(shape, generator=g) > 0.3
    else:  # additive: random values and some -inf
        m = torch.randn(shape, generator=g, dtype=torch.float64) * 2
        m = m.masked_fill(torch.rand(shape, generator=g) < 0.2, float("-inf")).to(dtype)
    return m.to(device)


def _torch_mask(mask, causal, lq, lk, device):
    """The explicit mask giving torch's SDPA our semantics (None, "top_left" or "bottom_right" causal)."""
    if causal == "none" or (causal == "top_left" and mask is None):
        return mask
    vis = _visible(lq, lk, causal == "bottom_right", device)
    if mask is None:
        return vis
    return mask & vis if mask.dtype == torch.bool else mask.masked_fill(~vis, float("-inf"))


def _inputs(b, hq, hkv, lq, lk, d, dv, dtype, device, seed, layout="bhld"):
    """q, k, v leaf tensors and the (B, H, L, D) views handed to attention."""
    leaves, views = [], []
    for i, (h, l, e) in enumerate(((hq, lq, d), (hkv, lk, d), (hkv, lk, dv))):
        shape = (b, l, h, e) if layout == "blhd" else (b, h, l, e)
        t = randn(shape, dtype, device, seed=seed + i, scale=1.5).requires_grad_()
        leaves.append(t)
        views.append(t.transpose(1, 2) if layout == "blhd" else t)
    return leaves, views


def _run(case, backend, device, dtype, mask="make"):
    """Grads and outputs of fastllm (on backend), torch's SDPA in dtype, and torch's SDPA in float64.
    mask: the attn_mask, or "make" to draw one as the case says."""
    b, hq, hkv, lq, lk, d, dv = (case[k] for k in ("b", "hq", "hkv", "lq", "lk", "d", "dv"))
    seed, causal = case["seed"], case["causal"]
    if isinstance(mask, str):
        mask = _make_mask(case["mask"], case.get("mask_shape", (lq, lk)), case.get("mask_dtype", dtype), device, seed)
    dout = randn((b, hq, lq, dv), dtype, device, seed=seed + 7)
    results = []
    for kind in ("ours", "torch", "ref"):
        dt = torch.float64 if kind == "ref" else dtype
        leaves, (q, k, v) = _inputs(b, hq, hkv, lq, lk, d, dv, dt, device, seed, case.get("layout", "bhld"))
        gqa = hq != hkv
        if kind == "ours":
            with running_on(backend):
                out = attention(q, k, v, attn_mask=mask, is_causal=causal != "none", enable_gqa=gqa,
                                causal_alignment="bottom_right" if causal == "bottom_right" else "top_left")
                out.backward(dout)
        else:
            m = _torch_mask(mask, causal, lq, lk, device)
            if kind == "ref" and m is not None and m.dtype != torch.bool:
                m = m.double()
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal == "top_left" and m is None,
                                                 enable_gqa=gqa)
            out.backward(dout.to(dt))
        results.append([out] + [t.grad for t in leaves])
    return results + [_grad_term_scales(q, k, v, m, causal == "top_left" and m is None, dout.double())]


def _grad_term_scales(q, k, v, mask, causal, dout):
    """Magnitudes of the terms dq and dk combine (float64): dq_i = scale sum_j p_ij (dp_ij - delta_i) k_j
    may be far smaller than scale sum_j p_ij (|dp_ij| + |delta_i|) |k_j| (it is 0 for a row with a single
    key), and its error is relative to the latter (the tolerance rule's `scale` for gradients)."""
    group, sm_scale = q.shape[1] // k.shape[1], q.shape[-1] ** -0.5
    kr, vr = k.detach().repeat_interleave(group, 1), v.detach().repeat_interleave(group, 1)
    s = q.detach() @ kr.transpose(-1, -2) * sm_scale
    if causal:
        mask = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    p = torch.softmax(s, -1).nan_to_num(0.0)
    dp = dout @ vr.transpose(-1, -2)
    t = p * (dp.abs() + (p * dp).sum(-1, keepdim=True).abs())  # |p dp| + |p delta|
    dq = (t @ kr.abs()).amax() * sm_scale if t.numel() else 0.0
    dk = (t.transpose(-1, -2) @ q.detach().abs()).amax() * sm_scale if t.numel() else 0.0
    return {"dq": float(dq), "dk": float(dk)}


def _compare(dtype, ours, theirs, ref, scales):
    for name, o, t, r in zip(("out", "dq", "dk", "dv"), ours, theirs, ref):
        assert o.shape == r.shape and o.dtype == dtype, (name, o.shape, o.dtype)
        assert_close(name, o, t, r, scale=scales.get(name))  # also: NaN only where the reference has NaN


def _check(case, backend, device, dtype, mask="make"):
    _compare(dtype, *_run(case, backend, device, dtype, mask))


def _random_cases(n, seed=0):
    """A seeded random grid: B, Hq/Hkv (incl. GQA), Lq != Lk (1, 17, 64, 65, ...), head dims (odd ones
    too), mask kinds and broadcast shapes, causal alignments, (B, L, H, D) views, dtypes."""
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        b = rng.choice([1, 2])
        hq, hkv = rng.choice([(2, 2), (4, 2), (3, 1)])
        lq, lk = rng.choice([(1, 17), (17, 1), (17, 17), (64, 64), (65, 33), (33, 65), (1, 65), (65, 1), (47, 130)])
        d = rng.choice([16, 40, 64, 64, 80, 128])
        mask = rng.choice(["none", "bool", "float"])
        shape = rng.choice([(lq, lk), (b, 1, lq, lk), (1, hq, lq, lk), (b, hq, 1, lk), (b, hq, lq, lk)])
        dtype = [torch.float32, torch.float16, torch.bfloat16][i % 3]
        cases.append(dict(b=b, hq=hq, hkv=hkv, lq=lq, lk=lk, d=d, dv=d, mask=mask, mask_shape=shape,
                          mask_dtype=rng.choice([dtype, torch.float32]),  # torch takes float32 masks for any dtype
                          causal=rng.choice(["none", "top_left", "bottom_right"]),
                          layout=rng.choice(["bhld", "blhd"]), seed=100 + i, dtype=dtype))
    return cases


def _case_id(c):
    return (f"B{c['b']}H{c['hq']}/{c['hkv']}L{c['lq']}x{c['lk']}D{c['d']}-{c['mask']}{len(c['mask_shape'])}d-"
            f"{c['causal']}-{c['layout']}-{str(c['dtype'])[6:]}")


GRID = _random_cases(27, seed=int(os.environ.get("FASTLLM_ATTN_GRID_SEED", "0")))  # other seeds: wider sweeps


# ---- correctness -------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("case", GRID, ids=_case_id)
def test_attention_matches_reference(device, backend, case):
    _check(case, backend, device, case["dtype"])


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("d,dv", [(1, 1), (8, 8), (96, 96), (112, 112), (160, 160), (192, 64), (256, 256),
                                  (64, 24)])
def test_attention_head_dims(device, backend, d, dv):
    """Head dims 1..256, non-powers of two, and a value head dim different from the query's."""
    case = dict(b=1, hq=2, hkv=1, lq=19, lk=23, d=d, dv=dv, mask="bool", causal="top_left", seed=d + dv)
    _check(case, backend, device, torch.bfloat16 if d >= 160 else torch.float16)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_long_key_sequence(device, backend):
    """Lk > 1000 (many key blocks) against a few queries, bottom-right causal, bf16."""
    case = dict(b=1, hq=2, hkv=1, lq=5, lk=1030, d=64, dv=64, mask="bool", causal="bottom_right", seed=77)
    _check(case, backend, device, torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
def test_forward_and_backward_on_different_backends(device):
    """The saved statistics mean the same on every backend: a Triton forward with a reference backward
    (and the reverse) gives the gradients of an all-Triton run."""
    q, k, v = (randn((1, 2, n, 32), torch.float32, device, seed=i) for i, n in enumerate((20, 30, 30)))
    g = randn((1, 2, 20, 32), torch.float32, device, seed=3)
    grads = []
    for fwd, bwd in (("triton", "triton"), ("triton", "torch"), ("torch", "triton")):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with running_on(fwd):
            out = attention(*leaves, is_causal=True)
        with running_on(bwd):
            out.backward(g)
        grads.append([t.grad for t in leaves])
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["false_row", "neg_inf_row", "bottom_right_lq_gt_lk"])
def test_fully_masked_rows_match_torch(device, backend, dtype, kind):
    """Rows with no key left (an all-False bool row, an all -inf additive row, bottom-right causal with
    Lq > Lk) give out = 0 and zero gradients, exactly as torch does, and lse = -inf."""
    lq, lk = 9, 5
    keep = torch.rand(lq, lk, generator=torch.Generator().manual_seed(1)) > 0.4
    keep[2] = False
    keep[:, 0] |= torch.arange(lq) != 2  # every other row keeps a key
    mask = {"false_row": keep, "neg_inf_row": torch.zeros(2, 1, lq, lk).masked_fill(~keep, float("-inf")).to(dtype),
            "bottom_right_lq_gt_lk": None}[kind]
    mask = None if mask is None else mask.to(device)
    causal = "bottom_right" if mask is None else "none"
    case = dict(b=2, hq=2, hkv=2, lq=lq, lk=lk, d=16, dv=16, mask="given", causal=causal, seed=5)
    ours, theirs, ref, scales = _run(case, backend, device, dtype, mask=mask)
    empty = (theirs[0] == 0).all(-1)
    assert empty.sum() == (2 * 2 * (lq - lk) if mask is None else 2 * 2)
    assert torch.equal(ours[0][empty], theirs[0][empty])
    _compare(dtype, ours, theirs, ref, scales)
    assert (ours[1][empty] == 0).all()  # dq of an empty row
    q, k, v = (randn((2, 2, n, 16), dtype, device, seed=i) for i, n in enumerate((lq, lk, lk)))
    with running_on(backend):
        _, lse = attention(q, k, v, attn_mask=mask, is_causal=mask is None, causal_alignment="bottom_right",
                           return_lse=True)
    assert torch.equal(lse == float("-inf"), empty)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_with_a_large_finite_mask(device, backend, dtype):
    """A row whose every key has a large finite negative additive mask (padding as -1e4) is an ordinary softmax
    shifted far down: its lse2 is about -1.4e4, so keys past Lk in a tile that applies no edge mask would get
    p = exp2(0 - lse2) = inf, and the default (atomic) backward's dq inf * 0 = NaN. Lk = 5: one partial tile."""
    lq, lk = 3, 5
    mask = randn((lq, lk), torch.float32, device, seed=3)
    mask[1] = -1e4
    case = dict(b=1, hq=2, hkv=2, lq=lq, lk=lk, d=16, dv=16, mask="given", causal="none", seed=8)
    _check(case, backend, device, dtype, mask=mask)


def _explicit(q, k, v, mask, scale):
    """out and lse by the textbook formula, in q's dtype (torch's own error for the LSE comparison)."""
    s = q @ k.transpose(-1, -2) * scale + mask
    lse = torch.logsumexp(s.float(), -1) if q.dtype != torch.float64 else torch.logsumexp(s, -1)
    return torch.softmax(s.float(), -1).to(q.dtype) @ v, lse


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_return_lse_and_its_gradient(device, backend, dtype):
    """lse = logsumexp of the scores (natural log); a loss that uses it back-propagates through it (the backward
    on the same backend: the dlse term of its delta)."""
    b, h, lq, lk, d = 1, 2, 33, 40, 32
    mask = randn((lq, lk), torch.float32, device, seed=9)
    w = randn((b, h, lq), torch.float32, device, seed=10)
    g = randn((b, h, lq, d), dtype, device, seed=11)
    res = []
    for kind in ("ours", "torch", "ref"):
        dt = torch.float64 if kind == "ref" else dtype
        q, k, v = (randn((b, h, n, d), dt, device, seed=i).requires_grad_() for i, n in enumerate((lq, lk, lk)))
        with running_on(backend) if kind == "ours" else contextlib.nullcontext():
            if kind == "ours":
                out, lse = attention(q, k, v, attn_mask=mask, scale=0.3, return_lse=True)
            else:
                out, lse = _explicit(q, k, v, mask.to(dt), 0.3)
            assert lse.dtype == (torch.float64 if kind == "ref" else torch.float32)
            ((out * g.to(dt)).sum() + (lse * w.to(lse.dtype)).sum()).backward()
        res.append((out, lse, q.grad, k.grad, v.grad))
    for name, o, t, r in zip(("out", "lse", "dq", "dk", "dv"), *res):
        assert_close(name, o, t, r)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_backward_is_deterministic(device):
    """Two backward runs (GQA, a broadcast float mask, causal) give bit-identical gradients."""
    b, hq, hkv, lq, lk, d = 2, 4, 2, 70, 90, 40
    mask = randn((b, 1, lq, lk), torch.bfloat16, device, seed=3)
    g = randn((b, hq, lq, d), torch.bfloat16, device, seed=4)
    grads = []
    for _ in range(2):
        q, k, v = (randn((b, h, n, d), torch.bfloat16, device, seed=i).requires_grad_()
                   for i, (h, n) in enumerate(((hq, lq), (hkv, lk), (hkv, lk))))
        with running_on("triton"):
            attention(q, k, v, attn_mask=mask, is_causal=True, enable_gqa=True, deterministic=True).backward(g)
        grads.append((q.grad, k.grad, v.grad))
    for a, c in zip(*grads):
        assert torch.equal(a, c)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_dropout_uses_one_mask_forward_and_backward(device, backend):
    """With dropout, out and the gradients equal the float64 reference given the backend's own keep mask
    (Philox in the kernels, a seeded torch generator in the reference), drawn again for the backward."""
    ops_attention = sys.modules["fastllm.ops.attention"]  # the module (the package exports the function)
    from fastllm.reference import attention as ref

    b, hq, hkv, lq, lk, d, p = 2, 4, 2, 37, 50, 32, 0.25
    mask = (torch.rand(lq, lk, generator=torch.Generator().manual_seed(2)) > 0.2).to(device)
    leaves = [randn((b, h, n, d), torch.float32, device, seed=i).requires_grad_()
              for i, (h, n) in enumerate(((hq, lq), (hkv, lk), (hkv, lk)))]
    g = randn((b, hq, lq, d), torch.float32, device, seed=5)
    torch.manual_seed(1234)
    with running_on(backend):
        out = attention(*leaves, attn_mask=mask, dropout_p=p, is_causal=True, enable_gqa=True)
        out.backward(g)
    torch.manual_seed(1234)
    seed = ops_attention._draw_seed()
    if backend == "triton":
        from fastllm.kernels.attention import dropout_keep_mask
        keep = dropout_keep_mask((b, hq, lq, lk), p, seed, device)
    else:
        keep = ref.dropout_keep((b, hq, lq, lk), p, seed, device)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.02
    expected = []
    for dt in (torch.float32, torch.float64):
        q, k, v = (t.detach().to(dt) for t in leaves)
        o, lse2 = ref.attention_fwd(q, k, v, mask, d ** -0.5, True, False, p, keep)
        expected.append((o,) + ref.attention_bwd(g.to(dt), None, q, k, v, mask, o, lse2, d ** -0.5, True, False,
                                                 p, keep)[:3])
    for name, o, t, r in zip(("out", "dq", "dk", "dv"), (out,) + tuple(t.grad for t in leaves), *expected):
        assert_close(name, o, t, r)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_float_mask_gradient(device, backend):
    """A float mask that requires grad gets d(loss)/d(mask), summed over its broadcast dimensions."""
    b, h, lq, lk, d = 2, 2, 17, 23, 16
    g = randn((b, h, lq, d), torch.float32, device, seed=6)
    res = []
    for kind in ("ours", "torch", "ref"):
        dt = torch.float64 if kind == "ref" else torch.float32
        q, k, v = (randn((b, h, n, d), dt, device, seed=i) for i, n in enumerate((lq, lk, lk)))
        mask = randn((b, 1, lq, lk), dt, device, seed=7).requires_grad_()
        if kind == "ours":
            with running_on(backend):
                out = attention(q, k, v, attn_mask=mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out.backward(g.to(dt))
        res.append((out, mask.grad))
    for name, o, t, r in zip(("out", "dmask"), *res):
        assert_close(name, o, t, r)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("shapes,gqa", [
    (((7, 16), (9, 16), (9, 16)), False),                                   # 2-D: (L, E)
    (((3, 7, 16), (3, 9, 16), (3, 9, 8)), False),                           # 3-D: (H, L, E), Dv != D
    (((2, 2, 4, 7, 16), (1, 2, 2, 9, 16), (1, 2, 2, 9, 16)), True),       # 5-D, broadcast batch, GQA
    (((2, 4, 7, 16), (1, 4, 9, 16), (2, 1, 9, 16)), False),                 # broadcast batch and heads
    (((1, 4, 7, 16), (1, 2, 9, 16), (1, 1, 9, 16)), True),                  # GQA, key and value head counts differ
], ids=["2d", "3d", "5d-gqa", "broadcast", "gqa-k2-v1"])
def test_shapes_and_broadcasting_like_torch(device, backend, shapes, gqa):
    leaves = [randn(s, torch.float32, device, seed=i).requires_grad_() for i, s in enumerate(shapes)]
    mask = (torch.rand(7, 9, generator=torch.Generator().manual_seed(0)) > 0.3).to(device)
    with running_on(backend):
        out = attention(*leaves, attn_mask=mask, enable_gqa=gqa)
        out.sum().backward()
    ours = [out] + [t.grad for t in leaves]
    for t in leaves:
        t.grad = None
    expected = F.scaled_dot_product_attention(*leaves, attn_mask=mask, enable_gqa=gqa)
    expected.sum().backward()
    for o, e in zip(ours, [expected] + [t.grad for t in leaves]):
        assert o.shape == e.shape
        torch.testing.assert_close(o, e, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_blhd_views_keep_their_layout(device, backend):
    """(B, L, H, D) tensors passed as transpose(1, 2) views: out is laid out (B, L, H, Dv) underneath."""
    q, k, v = (randn((2, n, 3, 16), torch.float16, device, seed=i).transpose(1, 2) for i, n in enumerate((5, 8, 8)))
    with running_on(backend):
        out = attention(q, k, v, is_causal=True)
    assert out.shape == (2, 3, 5, 16) and out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_empty_and_degenerate_shapes(device, backend):
    """Lq = 0, Lk = 0 (out = 0, as torch), B = 0, head dim 0; float64 runs the reference."""
    for lq, lk, b, d in ((0, 5, 1, 8), (4, 0, 1, 8), (4, 5, 0, 8), (4, 5, 1, 0)):
        q, k, v = (randn((b, 2, n, e), torch.float32, device, seed=1).requires_grad_()
                   for n, e in ((lq, d), (lk, d), (lk, 8)))
        with running_on(backend):
            out = attention(q, k, v)
            out.sum().backward()
        expected = F.scaled_dot_product_attention(q, k, v)
        torch.testing.assert_close(out, expected)
        assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape
    q = randn((1, 2, 5, 8), torch.float64, device, seed=2)
    expected = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    torch.testing.assert_close(attention(q, q, q, is_causal=True), expected)
    assert fastllm.dispatch_log()["attention"]["backend"] == "torch"


def test_cpu_default_path_matches_torch_sdpa():
    """Not forced: CPU tensors take the torch reference path and match F.scaled_dot_product_attention."""
    q, k, v = (randn((2, 4, n, 32), torch.bfloat16, "cpu", seed=i) for i, n in enumerate((20, 30, 30)))
    mask = torch.rand(20, 30, generator=torch.Generator().manual_seed(0)) > 0.5
    out = attention(q, k, v, attn_mask=mask, scale=0.2)
    assert fastllm.dispatch_log()["attention"]["backend"] == "torch"
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=0.2)
    assert_close("out", out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.2), ref)


@pytest.mark.parametrize("strided", ["q", "k", "v", "none"])
@pytest.mark.parametrize("gqa", [False, True])
def test_cpu_flash_path(monkeypatch, strided, gqa):
    """On CPU the forward runs ATen's flash attention (ops/_attention_cpu.py) where it applies, with GQA heads,
    and never for a head dim whose values are not adjacent (that kernel ignores the last stride): such views
    take the reference, and every case matches F.scaled_dot_product_attention on contiguous copies."""
    from fastllm.ops import _attention_cpu
    calls = []
    real = _attention_cpu._flash
    monkeypatch.setattr(_attention_cpu, "_flash", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    hkv = 2 if gqa else 4
    q, k, v = (randn((2, h, n, 64), torch.float32, "cpu", seed=i)
               for i, (h, n) in enumerate(((4, 20), (hkv, 30), (hkv, 30))))
    t = {n: x[..., ::2] if n == strided else x[..., :32] for n, x in (("q", q), ("k", k), ("v", v))}
    out = attention(t["q"], t["k"], t["v"], is_causal=True, scale=0.2, enable_gqa=gqa)
    assert len(calls) == (strided == "none")
    c = {n: x.contiguous() for n, x in t.items()}
    expected = F.scaled_dot_product_attention(c["q"].double(), c["k"].double(), c["v"].double(), is_causal=True,
                                              scale=0.2, enable_gqa=gqa)
    peer = F.scaled_dot_product_attention(c["q"], c["k"], c["v"], is_causal=True, scale=0.2, enable_gqa=gqa)
    assert_close("out", out, peer, expected)


@pytest.mark.parametrize("gqa", [False, True])
@pytest.mark.parametrize("with_lse", [False, True])
def test_cpu_flash_backward(monkeypatch, gqa, with_lse):
    """On CPU the backward runs ATen's flash attention backward where the forward ran its forward and the
    log-sum-exp has no gradient (with return_lse's lse in the loss: the reference) and GQA heads are read in
    place (torch 2.13 on), from (B, L, H, D) views, and the gradients match float64 within twice torch's own fp32
    error."""
    from fastllm.ops import _attention_cpu
    calls = []
    real = _attention_cpu._flash_bwd
    monkeypatch.setattr(_attention_cpu, "_flash_bwd", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    hkv = 2 if gqa else 4
    base = [randn((2, n, h, 40), torch.float32, "cpu", seed=i)
            for i, (h, n) in enumerate(((4, 23), (hkv, 31), (hkv, 31)))]
    dout = randn((2, 4, 23, 40), torch.float32, "cpu", seed=9)
    grads = {}
    for name in ("ours", "torch", "f64"):
        leaves = [(x.double() if name == "f64" else x).clone().requires_grad_(True) for x in base]
        q, k, v = (x.transpose(1, 2) for x in leaves)
        if name == "ours":
            out, lse = attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=gqa, return_lse=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=gqa)
            lse = torch.logsumexp(0.3 * q @ k.repeat_interleave(4 // hkv, 1).transpose(-1, -2)
                                  + torch.full((23, 31), float("-inf"), dtype=q.dtype).triu(1), -1)
        loss = (out * dout.to(out.dtype)).sum() + (lse.sum() if with_lse else 0)
        loss.backward()
        grads[name] = [x.grad for x in leaves]
    # torch < 2.13 reads GQA heads only when repeated: the reference backward then runs instead
    assert len(calls) == (not with_lse and (not gqa or _attention_cpu._GQA_IN_PLACE))
    for n, ours, peer, expected in zip("qkv", grads["ours"], grads["torch"], grads["f64"]):
        assert_close("d" + n, ours, peer, expected)


def test_grids_past_cuda_limits_are_not_for_the_kernels(monkeypatch):
    """The kernels' grids hold the batch and the heads in their third and second dimensions, at most 65535 each on
    CUDA: more is refused with the reason (forced: an error; preferred: the next backend runs it and the dispatch
    log says why), varlen's sequences too."""
    from fastllm import _dispatch

    q = torch.zeros(65536, 1, 1, 16)
    with running_on("triton"), pytest.raises(ValueError, match="batch = 65536 exceeds the 65535"):
        attention(q, q, q)
    heads = torch.zeros(1, 65536, 1, 4)
    with running_on("triton"), pytest.raises(ValueError, match="heads = 65536 exceeds the 65535"):
        attention(heads, heads, heads)
    packed, cu = torch.zeros(65536, 1, 16), torch.arange(65537, dtype=torch.int32)
    with running_on("triton"), pytest.raises(ValueError, match="sequences = 65536 exceeds the 65535"):
        attention_varlen(packed, packed, packed, cu, cu, 1, 1)
    monkeypatch.setitem(_dispatch.PREFERENCE["attention"], "cpu", ("triton", "torch"))  # as on CUDA
    out = attention(q[:, :, :, :4], q[:, :, :, :4], torch.ones(65536, 1, 1, 4))
    log = fastllm.dispatch_log()["attention"]
    assert log["backend"] == "torch" and "batch = 65536 exceeds the 65535" in log["skipped"]["triton"]
    assert torch.equal(out, torch.ones_like(out))


def test_tiles_that_do_not_fit_fall_back_to_smaller_ones():
    """Where Triton cannot fit a config's tiles (OutOfResources at compile time: a tuned winner measured without a
    mask, a GPU with less shared memory), run_fitting tries one stage fewer, then halves the larger block, warns,
    and remembers the tiles that fit for that kernel, variant and device; nothing fits, or tiles given with
    shrink=False: the error."""
    from triton.runtime.errors import OutOfResources

    from fastllm.kernels import _attn_common as tk

    class Kernel:  # a stand-in for a Triton kernel whose shared memory grows with its tiles
        def __init__(self, limit):
            self.limit, self.launched = limit, []

        def __getitem__(self, grid):
            def run(*args, BLOCK_M, BLOCK_N, num_warps, num_stages, **constexprs):
                need = BLOCK_M * BLOCK_N * num_stages * (2 if constexprs["MASK_KIND"] else 1)
                if need > self.limit:
                    raise OutOfResources(need, self.limit, "shared memory")
                self.launched.append((grid, BLOCK_M, BLOCK_N, num_stages))
            return run

    def grid(tiles):
        return (100 // tiles.block_m,)

    kernel, cfg, cpu = Kernel(64 * 64), tk.AttnConfig(128, 64, 8, 3), torch.device("cpu")
    with pytest.raises(OutOfResources):  # tiles a caller chose (the tuner's candidates): exactly those
        tk.run_fitting(kernel, grid, cfg, cpu, (1, 2), dict(MASK_KIND=0), shrink=False)
    with pytest.warns(RuntimeWarning, match="do not fit"):
        assert tk.run_fitting(kernel, grid, cfg, cpu, (1, 2), dict(MASK_KIND=0)) == tk.AttnConfig(64, 64, 8, 1)
    with pytest.warns(RuntimeWarning, match="do not fit"):  # a float mask needs more: its own tiles
        assert tk.run_fitting(kernel, grid, cfg, cpu, (1, 2), dict(MASK_KIND=2)) == tk.AttnConfig(32, 64, 8, 1)
    assert kernel.launched == [((1,), 64, 64, 1), ((3,), 32, 64, 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered: no more tries, no warning
        assert tk.run_fitting(kernel, grid, cfg, cpu, (1, 2), dict(MASK_KIND=2)) == tk.AttnConfig(32, 64, 8, 1)
    assert kernel.launched[2:] == [((3,), 32, 64, 1)]
    with pytest.raises(OutOfResources):  # explicit tiles are never swapped for remembered ones
        tk.run_fitting(kernel, grid, cfg, cpu, (1, 2), dict(MASK_KIND=2), shrink=False)
    with pytest.raises(OutOfResources):
        tk.run_fitting(Kernel(16 * 16 - 1), grid, tk.AttnConfig(32, 16, 4, 2), cpu, (), dict(MASK_KIND=0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", ["top_left", "bottom_right"])
def test_triton_small_tiles(device, causal):
    """Forced 16 x 16 tiles: many blocks, so the full / diagonal / edge key ranges all occur (Lq < and > Lk).
    Bottom-right, also Lk - Lq = 14 and 1 (mod 16): the diagonal then ends one or two keys before, or one key
    past, a tile boundary, where an off-by-one in a block range (the forward's full / masked key blocks, the
    backward's first and fully-seeing query blocks) drops or unmasks a key."""
    from fastllm.kernels import attention as tk

    cfg = tk.AttnConfig(16, 16, 4, 1)
    for lq, lk in ((50, 70), (70, 50)) + (((20, 34), (18, 19)) if causal == "bottom_right" else ()):
        q, k, v = (randn((1, h, n, 24), torch.float32, device, seed=i) for i, (h, n) in
                   enumerate(((4, lq), (2, lk), (2, lk))))
        mask = (torch.rand(1, 4, lq, lk, generator=torch.Generator().manual_seed(lq)) > 0.1).to(device)
        dout = randn((1, 4, lq, 24), torch.float32, device, seed=8)
        br = causal == "bottom_right"
        out, lse2 = tk.attention_fwd(q, k, v, mask, scale=0.25, is_causal=True, bottom_right=br, config=cfg)
        grads = tk.attention_bwd(dout, None, q, k, v, mask, out, lse2, scale=0.25, is_causal=True, bottom_right=br,
                                 config=cfg)
        tmask = _torch_mask(mask, causal, lq, lk, device)
        res = []
        for dt in (torch.float32, torch.float64):
            leaves = [t.detach().to(dt).clone().requires_grad_() for t in (q, k, v)]
            o = F.scaled_dot_product_attention(*leaves, attn_mask=tmask, scale=0.25, enable_gqa=True)
            o.backward(dout.to(dt))
            res.append([o] + [t.grad for t in leaves])
        for name, o, t, r in zip(("out", "dq", "dk", "dv"), (out,) + grads, *res):
            assert_close(name, o, t, r)


def test_bad_input():
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    cases = [
        (TypeError, "query", dict(query=torch.ones(1, 4, 3, 8, dtype=torch.int32))),
        (TypeError, "key", dict(key=k.half(), enable_gqa=True)),
        (ValueError, "key", dict(key=torch.randn(1, 2, 5, 8, device="meta"), enable_gqa=True)),
        (ValueError, "query", dict(query=torch.randn(1, 4, 3, 300), key=torch.randn(1, 2, 5, 300),
                                   value=torch.randn(1, 2, 5, 300), enable_gqa=True)),
        (ValueError, "value", dict(value=torch.randn(1, 2, 5, 257), enable_gqa=True)),
        (ValueError, "key", dict(key=torch.randn(1, 2, 5, 9), enable_gqa=True)),
        (ValueError, "value", dict(value=torch.randn(1, 2, 6, 8), enable_gqa=True)),
        (ValueError, "attn_mask", dict(attn_mask=torch.ones(4, 5, dtype=torch.bool), enable_gqa=True)),
        (ValueError, "attn_mask", dict(attn_mask=torch.ones(2, 1, 4, 3, 5, dtype=torch.bool), enable_gqa=True)),
        (TypeError, "attn_mask", dict(attn_mask=torch.ones(3, 5, dtype=torch.int32), enable_gqa=True)),
        (TypeError, "attn_mask must be a torch.Tensor", dict(attn_mask=[[True] * 5] * 3, enable_gqa=True)),
        (ValueError, "need a heads dimension", dict(key=torch.randn(5, 8), value=torch.randn(5, 8), enable_gqa=True)),
        (ValueError, "enable_gqa", dict()),  # Hq = 4, Hkv = 2 without enable_gqa
        (ValueError, "key", dict(query=torch.randn(1, 3, 3, 8), enable_gqa=True)),  # 3 heads, 2 kv heads
        (ValueError, "query", dict(query=torch.randn(8), key=torch.randn(8), value=torch.randn(8))),
        (ValueError, "dropout_p", dict(dropout_p=1.5, enable_gqa=True)),
        (ValueError, "causal_alignment", dict(causal_alignment="center", enable_gqa=True)),
        (TypeError, "scale", dict(scale="big", enable_gqa=True)),
        (TypeError, "is_causal", dict(is_causal=None, enable_gqa=True)),
    ]
    for exc, word, kwargs in cases:
        args = dict(query=q, key=k, value=v) | kwargs
        with pytest.raises(exc, match=word):
            attention(**args)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_opcheck(device, backend):
    q, k, v = (torch.randn(1, h, n, 16, device=device, requires_grad=True) for h, n in ((4, 5), (2, 7), (2, 7)))
    mask = torch.rand(1, 4, 5, 7, device=device) > 0.3
    out = torch.randn(1, 4, 5, 16, device=device)
    lse2 = torch.randn(1, 4, 5, device=device)
    with running_on(backend):
        for m in (None, mask):
            torch.library.opcheck(torch.ops.fastllm.attention.default, (q, k, v, m, 0.25, True, True, 0.0, 0, True))
        qd, kd, vd = q.detach(), k.detach(), v.detach()  # no double backward
        args = (torch.randn_like(out), lse2, qd, kd, vd, mask, out, lse2, 0.25, False, False, 0.0, 0, True)
        torch.library.opcheck(torch.ops.fastllm.attention_backward.default, args)


def test_compiles_without_graph_breaks():
    def f(q, k, v, m):
        return attention(q, k, v, attn_mask=m, is_causal=True).sum(-1)

    q, k, v = (torch.randn(1, 2, 6, 16, requires_grad=True) for _ in range(3))
    m = torch.rand(6, 6) > 0.2
    eager = f(q, k, v, m)
    out = torch.compile(f, fullgraph=True, dynamic=False)(q, k, v, m)
    torch.testing.assert_close(out, eager)
    gq = torch.autograd.grad(out.sum(), q)[0]
    torch.testing.assert_close(gq, torch.autograd.grad(eager.sum(), q)[0])


def _compile_for_sm90(kernel, dtype, d, mask_kind, causal, dropout, varlen=False, atomic=False):
    """Shared memory (bytes) of one kernel variant compiled ahead of time for sm_90 (H100): no GPU needed."""
    from fastllm.kernels import attention as tk

    t = "*" + {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    fn = {"fwd": tk._fwd_kernel, "dkdv": tk._dkdv_kernel, "dq": tk._dq_kernel}[kernel]
    cfg = tk.pick_config(kernel, d, d, dtype)
    consts = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, D_P=d, DV_P=d, MASK_KIND=mask_kind, IS_CAUSAL=causal,
                  BOTTOM_RIGHT=varlen, VARLEN=varlen, DROPOUT=dropout, ATOMIC_DQ=atomic,
                  DOT=tk.DOT_IEEE32 if dtype == torch.float32 else tk.DOT_NATIVE, EXACT_BF16=False)
    ptrs = {"M": {0: t, 1: "*u8", 2: "*fp32"}[mask_kind], "LSE": "*fp32", "DELTA": "*fp32", "DQ_ACC": "*fp32",
            "CU_Q": "*i32", "CU_K": "*i32", **{name: t for name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV_OUT")}}
    scalars = {"qk_scale": "fp32", "sm_scale": "fp32", "dropout_p": "fp32", "seed": "i64"}
    return compile_for_sm90(fn, ptrs, consts, cfg.num_warps, cfg.num_stages, scalars)


# (dtype, head dim, [(mask kind, causal, dropout, varlen, atomic dq), ...]): every code path once, tensor-core
# and fp32 dots, wgmma (D <= 128) and mma.sync (D = 256) tiles; a cold compile of all of it takes about a minute.
_COMPILE_CASES = [("bf16", 128, [(0, True, True, False, False), (2, False, False, False, True),
                                 (0, True, False, True, True)]),
                  ("fp32", 64, [(1, True, False, False, False)]),
                  ("fp16", 256, [(1, False, False, False, True)])]


def test_kernels_compile_for_h100():
    """Each kernel, with the tiles pick_config gives, compiles for sm_90 and fits its 227 KiB of shared memory
    (the interpreter runs kernels that the compiler rejects, e.g. a constexpr branch returning two types)."""
    compile_check(__file__)


if __name__ == "__main__" and sys.argv[1:] == ["compile-check"]:
    for name, d, variants in _COMPILE_CASES:
        dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
        for kernel in ("fwd", "dkdv", "dq"):
            for variant in variants:
                shared = _compile_for_sm90(kernel, dt, d, *variant)
                print(name, d, kernel, variant, "shared", shared)
                assert shared <= 227 * 1024, "too much shared memory"
