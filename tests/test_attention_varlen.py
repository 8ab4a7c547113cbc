"""fastllm.attention_varlen (packed sequences) against torch's SDPA run on each sequence alone, in the same
dtype and in float64, forward and gradients, on every backend (Triton under the interpreter on CPU)."""
import random
import sys

import pytest
import torch
import torch.nn.functional as F

import fastllm
from fastllm import attention_varlen
from fastllm import reference as ref
from helpers import assert_close, device_backends, randn, running_on
from test_attention import _grad_term_scales, _torch_mask

BACKENDS = device_backends("attention_varlen")
ALIGN = {"top_left": "top_left", "bottom_right": "bottom_right", "none": "top_left"}


def _cu(lengths, device):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32, device=device)


def _packed(lengths, h, d, dtype, device, seed):
    return randn((sum(lengths), h, d), dtype, device, seed=seed, scale=1.5).requires_grad_()


def _per_sequence_sdpa(q, k, v, lq, lk, causal):
    """torch's SDPA on each sequence alone, packed back: (Tq, Hq, Dv)."""
    outs, cq, ck = [], 0, 0
    for a, b in zip(lq, lk):
        qs, ks, vs = (t.transpose(0, 1)[None] for t in (q[cq:cq + a], k[ck:ck + b], v[ck:ck + b]))
        m = _torch_mask(None, causal, a, b, q.device)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=m, is_causal=causal == "top_left", enable_gqa=True)
        outs.append(o[0].transpose(0, 1))
        cq, ck = cq + a, ck + b
    return torch.cat(outs)


def _run(lq, lk, hq, hkv, d, dtype, causal, backend, device, seed, deterministic=False):
    """[out, dq, dk, dv] of fastllm, torch in dtype and torch in float64, and the gradient term scales."""
    dout = randn((sum(lq), hq, d), dtype, device, seed=seed + 9)
    results = []
    for kind in ("ours", "torch", "ref"):
        dt = torch.float64 if kind == "ref" else dtype
        leaves = [_packed(lens, h, d, dt, device, seed + i)
                  for i, (lens, h) in enumerate(((lq, hq), (lk, hkv), (lk, hkv)))]
        if kind == "ours":
            with running_on(backend):
                out = attention_varlen(*leaves, _cu(lq, device), _cu(lk, device), max(lq), max(lk),
                                       is_causal=causal != "none", causal_alignment=ALIGN[causal],
                                       deterministic=deterministic)
                out.backward(dout)
        else:
            out = _per_sequence_sdpa(*leaves, lq, lk, causal)
            out.backward(dout.to(dt))
        results.append([out] + [t.grad for t in leaves])
    scales = {"dq": 0.0, "dk": 0.0}
    q, k, v = (t.detach() for t in leaves)
    cq, ck = 0, 0
    for a, b in zip(lq, lk):
        if a and b:
            s = _grad_term_scales(*(t.transpose(0, 1)[None] for t in (q[cq:cq + a], k[ck:ck + b], v[ck:ck + b])),
                                  _torch_mask(None, causal, a, b, device), causal == "top_left",
                                  dout[cq:cq + a].double().transpose(0, 1)[None])
            scales = {n: max(scales[n], s[n]) for n in scales}
        cq, ck = cq + a, ck + b
    return results, scales


def _compare(dtype, results, scales):
    for name, o, t, r in zip(("out", "dq", "dk", "dv"), *results):
        assert o.shape == r.shape and o.dtype == dtype, (name, o.shape, o.dtype)
        assert_close(name, o, t, r, scale=scales.get(name))


def _random_cases(n, seed=0):
    """Ragged lengths including 0, 1, 17 and some past a tile; Lq != Lk per sequence; GQA; odd head dims."""
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        nseq = rng.choice([1, 3, 4])
        lq = [rng.choice([0, 1, 5, 17, 33, 70]) for _ in range(nseq)]
        lk = [a if rng.random() < 0.5 else rng.choice([1, 17, 40, 70]) for a in lq]
        cases.append(dict(lq=lq, lk=lk, heads=rng.choice([(2, 2), (4, 2), (3, 1)]), d=rng.choice([16, 40, 64]),
                          dtype=[torch.float32, torch.float16, torch.bfloat16][i % 3],
                          causal=rng.choice(["none", "top_left", "bottom_right"]), seed=300 + i))
    return cases


CASES = _random_cases(12)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"q{c['lq']}k{c['lk']}H{c['heads']}D{c['d']}-{c['causal']}-"
                                                     f"{str(c['dtype'])[6:]}")
def test_matches_torch_per_sequence(device, backend, case):
    dtype = case["dtype"]
    results, scales = _run(case["lq"], case["lk"], *case["heads"], case["d"], dtype, case["causal"], backend, device,
                           case["seed"])
    _compare(dtype, results, scales)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_equal_lengths_equal_dense_attention(device, backend):
    """Packed sequences of one length give what fastllm.attention gives on the (B, H, L, D) batch."""
    b, l, h, d = 3, 21, 4, 32
    q, k, v = (randn((b, l, h, d), torch.float32, device, seed=i) for i in range(3))
    with running_on(backend):
        dense = fastllm.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        packed, lse = attention_varlen(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), _cu([l] * b, device),
                                       _cu([l] * b, device), l, l, is_causal=True, return_lse=True)
    torch.testing.assert_close(packed, dense.transpose(1, 2).flatten(0, 1), rtol=1e-6, atol=1e-6)
    s = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2)).double() * d ** -0.5
    s = s.masked_fill(~torch.ones(l, l, dtype=torch.bool, device=device).tril(), float("-inf"))
    torch.testing.assert_close(lse, s.logsumexp(-1).transpose(0, 1).flatten(1).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_strided_cu_seqlens(device, backend):
    """cu_seqlens as [::2] views with junk between their entries give what dense ones give, forward and backward
    (the Triton kernels index them without a stride)."""
    lq, lk = [5, 17, 1], [9, 3, 20]
    grads = []
    for strided in (False, True):
        leaves = [_packed(lens, h, 16, torch.float32, device, seed=i) for i, (lens, h) in enumerate(((lq, 4), (lk, 2),
                                                                                                   (lk, 2)))]
        cu = [_cu(lens, device) for lens in (lq, lk)]
        if strided:
            cu = [torch.stack([c, torch.full_like(c, 1 << 30)], 1).flatten()[::2] for c in cu]
        with running_on(backend):
            out = attention_varlen(*leaves, *cu, max(lq), max(lk), is_causal=True)
            out.backward(randn(out.shape, torch.float32, device, seed=7))
        grads.append([out.detach()] + [t.grad for t in leaves])
    for name, dense, strided in zip(["out", "dq", "dk", "dv"], *grads):
        torch.testing.assert_close(strided, dense, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("strided", ["q", "k", "v"])
def test_cpu_strided_head_dim(strided):
    """A head dim whose values are not adjacent (a [..., ::2] view) on the CPU default path: ATen's flash kernel
    would misread it, so it takes the reference and matches torch per sequence."""
    lengths = [5, 9, 3]
    t = {n: _packed(lengths, h, 64, torch.float32, "cpu", i).detach() for i, (n, h) in enumerate((("q", 4), ("k", 2),
                                                                                              ("v", 2)))}
    t = {n: x[..., ::2] if n == strided else x[..., :32] for n, x in t.items()}
    cu = _cu(lengths, "cpu")
    out = attention_varlen(t["q"], t["k"], t["v"], cu, cu, 9, 9, is_causal=True)
    c = {n: x.contiguous() for n, x in t.items()}
    torch.testing.assert_close(out, _per_sequence_sdpa(c["q"], c["k"], c["v"], lengths, lengths, "top_left"),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_deterministic_backward_is_bit_identical(device, backend):
    lq, lk = [9, 40, 1], [30, 40, 17]
    grads = []
    for _ in range(2):
        leaves = [_packed(lens, h, 24, torch.bfloat16, device, i)
                  for i, (lens, h) in enumerate(((lq, 4), (lk, 2), (lk, 2)))]
        with running_on(backend):
            out = attention_varlen(*leaves, _cu(lq, device), _cu(lk, device), 40, 40, is_causal=True,
                                   deterministic=True)
            out.backward(torch.ones_like(out))
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_dropout_uses_the_kernels_own_mask(device, backend):
    """With dropout, each sequence gets the kernel's keep mask rows for its queries (keys from 0)."""
    lq, lk, hq, hkv, d, p = [7, 20], [12, 25], 4, 2, 16, 0.3
    leaves = [_packed(lens, h, d, torch.float32, device, i)
              for i, (lens, h) in enumerate(((lq, hq), (lk, hkv), (lk, hkv)))]
    g = randn((sum(lq), hq, d), torch.float32, device, seed=5)
    cu_q, cu_k = _cu(lq, device), _cu(lk, device)
    torch.manual_seed(99)
    with running_on(backend):
        out = attention_varlen(*leaves, cu_q, cu_k, max(lq), max(lk), dropout_p=p, is_causal=True)
        out.backward(g)
    torch.manual_seed(99)
    seed = sys.modules["fastllm.ops.attention"]._draw_seed()
    shape = (1, hq, sum(lq), max(lk))
    if backend == "triton":
        from fastllm.kernels.attention import dropout_keep_mask
        keep = dropout_keep_mask(shape, p, seed, device)
    else:
        keep = ref.dropout_keep(shape, p, seed, device)
    expected = []
    for dt in (torch.float32, torch.float64):
        q, k, v = (t.detach().to(dt) for t in leaves)
        o, lse2 = ref.attention_varlen_fwd(q, k, v, cu_q, cu_k, d ** -0.5, True, False, p, keep)
        expected.append((o,) + ref.attention_varlen_bwd(g.to(dt), None, q, k, v, cu_q, cu_k, o, lse2, d ** -0.5,
                                                        True, False, p, keep))
    for name, o, t, r in zip(("out", "dq", "dk", "dv"), (out,) + tuple(t.grad for t in leaves), *expected):
        assert_close(name, o, t, r)


def test_opcheck():
    q, k, v = (randn((n, h, 16), torch.float32, "cpu", seed=i) for i, (n, h) in enumerate(((10, 4), (14, 2), (14, 2))))
    cu_q, cu_k = _cu([3, 7], "cpu"), _cu([6, 8], "cpu")
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), cu_q, cu_k, 7, 8, 0.25, True, True, 0.0, 0,
            False)
    torch.library.opcheck(torch.ops.fastllm.attention_varlen.default, args)


def _bad(**overrides):
    q, k, v = (torch.randn(n, h, 16) for n, h in ((10, 4), (14, 2), (14, 2)))
    args = dict(query=q, key=k, value=v, cu_seqlens_q=_cu([3, 7], "cpu"), cu_seqlens_k=_cu([6, 8], "cpu"),
                max_seqlen_q=7, max_seqlen_k=8)
    args.update(overrides)
    return args


@pytest.mark.parametrize("overrides,match", [
    (dict(cu_seqlens_q=torch.tensor([1, 3, 10], dtype=torch.int32)), "cu_seqlens_q must start at 0"),
    (dict(cu_seqlens_q=torch.tensor([0, 7, 3, 10], dtype=torch.int32)), "cu_seqlens_q must start at 0, never decrease"),
    (dict(cu_seqlens_k=torch.tensor([0, 6, 13], dtype=torch.int32)), "end at the 14 packed tokens"),
    (dict(cu_seqlens_k=torch.tensor([0.0, 6.0, 14.0])), "cu_seqlens_k must be a 1-D int32"),
    (dict(cu_seqlens_k=torch.tensor([0, 14], dtype=torch.int32), max_seqlen_k=14), "same number of sequences"),
    (dict(max_seqlen_q=6), "max_seqlen_q is 6 but cu_seqlens_q holds a sequence of 7"),
    (dict(max_seqlen_k=8.0), "max_seqlen_k must be a non-negative int"),
    (dict(query=torch.randn(10, 64)), "query must be 3-D"),
    (dict(key=torch.randn(14, 3, 16), value=torch.randn(14, 3, 16)), "key has 3 heads, which must divide"),
    (dict(value=torch.randn(13, 2, 16)), "value .* must have key's"),
    (dict(key=torch.randn(14, 2, 16, dtype=torch.float16)), "key has dtype torch.float16"),
    (dict(key=torch.randn(14, 2, 8)), "key's head dim 8 must equal query's 16"),
    (dict(cu_seqlens_q=[0, 3, 10]), "cu_seqlens_q must be a torch.Tensor"),
    (dict(query=torch.randn(10, 4, 300), key=torch.randn(14, 2, 300), value=torch.randn(14, 2, 300)),
     "exceeds the supported maximum 256"),
])
def test_bad_input_names_the_argument(overrides, match):
    with pytest.raises((ValueError, TypeError), match=match):
        attention_varlen(**_bad(**overrides))
