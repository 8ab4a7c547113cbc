"""fastllm.kv_cache_append: the rows it writes (rotated, quantised) against the float64 reference and a Hugging
Face-style rotary embedding in the same dtype; nothing else in the cache changes; on every backend."""
import pytest
import torch

import fastllm
from fastllm.reference import decode_attention as ref
from helpers import assert_close, device_backends, randn, running_on
from test_decode_attention import make_cache, torch_same_dtype

BACKENDS = device_backends("kv_cache_append")


def rope_tables(positions: int, r: int, device, dtype=torch.float32):
    """Llama-style cos/sin (positions, R): frequencies 10000^(-2i/R), both halves equal."""
    inv = 10000.0 ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)
    ang = torch.arange(positions, dtype=torch.float64)[:, None] * inv[None]
    return (torch.cat([ang.cos()] * 2, -1).to(dtype).to(device), torch.cat([ang.sin()] * 2, -1).to(dtype).to(device))


def hf_rope(x, cos, sin, pos):
    """transformers' apply_rotary_pos_emb on (B, L, H, D) in x's dtype: x * cos + rotate_half(x) * sin."""
    r = cos.shape[-1]
    c, s = cos[pos][:, :, None].to(x.dtype), sin[pos][:, :, None].to(x.dtype)
    xr = x[..., :r]
    rot = torch.cat((-xr[..., r // 2:], xr[..., :r // 2]), -1)
    return torch.cat((xr * c + rot * s, x[..., r:]), -1)


CASES = {
    "contig-bf16-rope-q": dict(lens=[0, 7, 30], lnew=1, cache=torch.bfloat16, rotary=40, q_heads=4),
    "paged-fp16-rope-partial-lnew5": dict(lens=[14, 3], lnew=5, cache=torch.float16, page=16, rotary=16, q_heads=2),
    "paged-int8-rope-q": dict(lens=[31, 0, 16], lnew=3, cache=torch.int8, page=16, rotary=40, q_heads=4),
    "contig-int8-fp32": dict(lens=[5, 9], lnew=2, cache=torch.int8, dtype=torch.float32),
    "contig-fp32-plain": dict(lens=[1, 12], lnew=4, cache=torch.float32),
    # 3 kv heads, 6 query heads (SmolLM2-135M has 3 kv heads): not powers of two, so tiles have padding rows
    "paged-int8-rope-q-3-kv-heads": dict(lens=[5, 0], lnew=2, cache=torch.int8, page=16, rotary=40, q_heads=6,
                                         hkv=3),
}


def _setup(case, device, seed=0):
    lens, lnew, cache = case["lens"], case["lnew"], case["cache"]
    dtype = case.get("dtype", torch.bfloat16 if cache == torch.int8 else cache)
    hkv, d = case.get("hkv", 2), 40
    kc, vc, sl, table, ks, vs = make_cache(lens, hkv, d, cache, device, page=case.get("page"),
                                           capacity=max(lens) + lnew + 3, seed=seed)
    if table is not None:  # the blocks the new tokens go to (make_cache marks blocks past a length unused)
        full = make_cache([max(lens) + lnew + 3] * len(lens), hkv, d, cache, device, page=case["page"], seed=seed)[3]
        table = torch.where(table >= 0, table, full)
    k_new = randn((len(lens), lnew, hkv, d), dtype, device, seed=seed + 1, scale=2.0)
    v_new = randn((len(lens), lnew, hkv, d), dtype, device, seed=seed + 2)
    rot = case.get("rotary")
    cos, sin = rope_tables(64, rot, device) if rot else (None, None)
    q = randn((len(lens), lnew, case["q_heads"], d), dtype, device, seed=seed + 3) if case.get("q_heads") else None
    return dict(k_cache=kc, v_cache=vc, k_new=k_new, v_new=v_new, cache_seqlens=sl, block_table=table, k_scale=ks,
                v_scale=vs, cos=cos, sin=sin, q=q)


def _written(args):
    """Index of the rows the append writes: (first, second) index tensors (B, Lnew)."""
    b, lnew = args["k_new"].shape[:2]
    pos = args["cache_seqlens"].long()[:, None] + torch.arange(lnew, device=args["k_new"].device)
    return ref.cache_index(pos, torch.arange(b, device=pos.device)[:, None], args["block_table"],
                           args["k_cache"].shape[1]), pos


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(device, backend, name):
    case = CASES[name]
    args = _setup(case, device)
    before = {k: v.clone() for k, v in args.items()
              if k in ("k_cache", "v_cache", "k_scale", "v_scale") and v is not None}
    expected = {k: v.clone() for k, v in before.items()}
    exp_args = dict(args, **expected)
    exp_q = ref.kv_cache_append(*(exp_args[k] for k in ("k_cache", "v_cache", "k_new", "v_new", "cache_seqlens",
                                                         "block_table", "k_scale", "v_scale", "cos", "sin", "q")))
    with running_on(backend):
        q_out = fastllm.kv_cache_append(**args)
    idx, pos = _written(args)
    for name_, t in before.items():  # only the new rows changed (NaN compares equal to itself here)
        keep = torch.ones(t.shape[:2], dtype=torch.bool, device=t.device)
        keep[idx] = False
        assert torch.equal(args[name_][keep].nan_to_num(7.0), t[keep].nan_to_num(7.0)), name_
    if case["cache"] == torch.int8:
        for name_ in ("k_cache", "v_cache", "k_scale", "v_scale"):
            got, want = args[name_][idx], expected[name_][idx]
            if name_.endswith("scale"):
                torch.testing.assert_close(got, want, rtol=2e-7, atol=0)
            else:  # rounding ties may fall either way after the fp32 rotation (an FMA on the GPU)
                diff = (got.int() - want.int()).abs()
                assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01, name_
    else:
        assert torch.equal(args["v_cache"][idx], args["v_new"].to(case["cache"]))
        k64 = args["k_new"].double()
        if args["cos"] is not None:
            k64 = ref.rope(k64, args["cos"].double(), args["sin"].double(), pos)
            theirs = hf_rope(args["k_new"], args["cos"], args["sin"], pos)
            assert_close("k", args["k_cache"][idx], theirs, k64)
        else:
            assert torch.equal(args["k_cache"][idx], args["k_new"])
    if args["q"] is None:
        assert q_out is None
    else:
        q64 = ref.rope(args["q"].double(), args["cos"].double(), args["sin"].double(), pos)
        assert_close("q", q_out, hf_rope(args["q"], args["cos"], args["sin"], pos), q64)
        if backend == "torch":
            assert torch.equal(q_out, exp_q)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_int8_round_trip_within_half_a_step(device, backend):
    """Dequantised rows differ from what was written by at most half a quantisation step (scale / 2)."""
    args = _setup(CASES["contig-int8-fp32"], device)
    with running_on(backend):
        fastllm.kv_cache_append(**args)
    idx, _ = _written(args)
    for c, s, x in (("k_cache", "k_scale", "k_new"), ("v_cache", "v_scale", "v_new")):
        scale = args[s][idx]
        back = ref.dequantize(args[c][idx], scale, torch.float64)
        assert ((back - args[x].double()).abs() <= scale.double()[..., None] * (0.5 + 1e-6)).all()
        assert torch.equal(args[c][idx].abs().amax(-1), torch.full_like(scale, 127, dtype=torch.int8))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_int8_rows_with_nan_and_inf(device, backend):
    """Rows holding NaN, inf or zeros quantise exactly as reference.quantize_int8: a NaN row gets scale NaN and
    codes 0 (it reads back as NaN, as a float cache's row would), an inf row scale inf (NaN back), zeros 0."""
    k_new = randn((1, 4, 2, 16), torch.float32, device, seed=40)
    k_new[0, 0, 0, 3], k_new[0, 1, 1, 0], k_new[0, 2, 0, 5] = float("nan"), float("inf"), -float("inf")
    k_new[0, 3, 1] = 0.0
    k_cache = torch.zeros(1, 4, 2, 16, dtype=torch.int8, device=device)
    v_cache, (k_scale, v_scale) = k_cache.clone(), (torch.zeros(1, 4, 2, device=device) for _ in range(2))
    with running_on(backend):
        fastllm.kv_cache_append(k_cache, v_cache, k_new, k_new.clone(),
                                torch.zeros(1, dtype=torch.int32, device=device), k_scale=k_scale, v_scale=v_scale)
    codes, scale = ref.quantize_int8(k_new)
    for c, s in ((k_cache, k_scale), (v_cache, v_scale)):
        assert torch.equal(c, codes) and torch.equal(s.isnan(), scale.isnan())
        assert torch.equal(s.nan_to_num(), scale.nan_to_num())
    assert scale[0, 0, 0].isnan() and (codes[0, 0, 0] == 0).all() and scale[0, 3, 1] == 0
    back = ref.dequantize(k_cache, k_scale, torch.float32)
    assert back[0, 0, 0].isnan().all() and back[0, 1, 1].isnan().any() and back[0, 2, 0].isnan().any()


@pytest.mark.parametrize("case", ["paged-int8-rope-q", "contig-fp32-plain"])
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_strided_lengths(device, backend, case):
    """cache_seqlens a [::2] view with junk between its entries: every kernel reads a dense copy of it (the C++
    one's must live until the kernel returns; the Triton kernel indexes it without a stride)."""
    args = _setup(CASES[case], device)
    lens = args["cache_seqlens"]
    strided = torch.stack([lens, torch.full_like(lens, 1 << 30)], 1).flatten()[::2]
    dense = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with running_on(backend):
        q_dense = fastllm.kv_cache_append(**dense)
    for _ in range(20 if backend == "cpu" else 1):  # (a dangling copy is overwritten only sometimes)
        again = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        with running_on(backend):
            q_out = fastllm.kv_cache_append(**dict(again, cache_seqlens=strided))
        torch.testing.assert_close(q_out, q_dense, rtol=0, atol=0)
        for name in ("k_cache", "v_cache", "k_scale", "v_scale"):
            torch.testing.assert_close(again[name], dense[name], rtol=0, atol=0, equal_nan=True)


def test_append_then_decode_matches_reference():
    """Three decode steps of a paged int8 cache: append with rotary, then attend (lengths + 1)."""
    args = _setup(CASES["paged-int8-rope-q"], "cpu")
    args["k_new"], args["v_new"], args["q"] = (t[:, :1] for t in (args["k_new"], args["v_new"], args["q"]))
    cache = {k: args[k] for k in ("k_cache", "v_cache", "block_table", "k_scale", "v_scale")}
    for step in range(3):
        with running_on("triton"):
            q = fastllm.kv_cache_append(**args)
            out = fastllm.decode_attention(q, cache["k_cache"], cache["v_cache"], args["cache_seqlens"] + 1,
                                           block_table=cache["block_table"], k_scale=cache["k_scale"],
                                           v_scale=cache["v_scale"])
        lens = args["cache_seqlens"] + 1
        kv = (cache["k_cache"], cache["v_cache"], lens, cache["block_table"], cache["k_scale"], cache["v_scale"])
        expected = ref.decode_attention(q.double(), *kv, scale=40 ** -0.5)
        assert_close(f"step {step}", out, torch_same_dtype(q, *kv, 40 ** -0.5, True), expected)
        args["cache_seqlens"] = lens.int()


def test_bad_input():
    args = _setup(CASES["paged-int8-rope-q"], "cpu")
    cases = [
        (ValueError, "k_new must be 4-D", dict(k_new=args["k_new"][0])),
        (ValueError, "v_new", dict(v_new=args["v_new"][:, :1])),
        (TypeError, "k_new", dict(k_new=args["k_new"].int())),
        (TypeError, "k_cache", dict(k_cache=args["k_cache"].half(), v_cache=args["v_cache"].half(), k_scale=None,
                                    v_scale=None)),
        (ValueError, "heads", dict(k_new=args["k_new"][:, :, :1], v_new=args["v_new"][:, :, :1])),
        (ValueError, "exceeds the cache capacity", dict(cache_seqlens=torch.tensor([31, 0, 46], dtype=torch.int32))),
        (ValueError, "block_table\\[0, 2\\] = -1", dict(block_table=args["block_table"].clone().index_fill_(
            1, torch.tensor([2]), -1))),
        (ValueError, "cos and sin", dict(sin=None)),
        (ValueError, "q is only", dict(cos=None, sin=None)),
        (ValueError, "R even", dict(cos=args["cos"][:, :39], sin=args["sin"][:, :39])),
        (ValueError, "sin \\(64, 38\\) must have cos's shape", dict(sin=args["sin"][:, :38])),
        (ValueError, "positions", dict(cos=args["cos"][:20], sin=args["sin"][:20])),
        (ValueError, "q must be", dict(q=args["q"][:, :1])),
        (TypeError, "q has dtype", dict(q=args["q"].half())),
        (ValueError, "v_scale is required", dict(v_scale=None)),
    ]
    for exc, word, kwargs in cases:
        with pytest.raises(exc, match=word):
            fastllm.kv_cache_append(**(args | kwargs))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_opcheck(device, backend):
    for name in ("paged-int8-rope-q", "contig-fp32-plain"):
        a = _setup(CASES[name], device)
        q_out = torch.empty_like(a["q"]) if a["q"] is not None else None
        with running_on(backend):
            torch.library.opcheck(torch.ops.fastllm.kv_cache_append.default,
                                  (a["k_cache"], a["v_cache"], a["k_new"], a["v_new"], a["cache_seqlens"],
                                   a["block_table"], a["k_scale"], a["v_scale"], a["cos"], a["sin"], a["q"], q_out))
