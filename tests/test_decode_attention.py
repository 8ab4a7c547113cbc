"""fastllm.decode_attention against the per-sequence float64 reference and torch's SDPA in the same dtype, on every
backend (the Triton kernels run on CPU tensors under TRITON_INTERPRET=1: caches stay small)."""
import contextlib
import sys

import pytest
import torch
import torch.nn.functional as F

import fastllm
from fastllm.reference import decode_attention as ref
from helpers import DEVICES, assert_close, compile_check, device_backends, needs_cuda, randn, running_on

BACKENDS = device_backends("decode_attention")


# ---- case construction -------------------------------------------------------------------------
def make_cache(lens, hkv, d, dtype, device, *, page=None, capacity=None, seed=0):
    """(k_cache, v_cache, cache_seqlens, block_table, k_scale, v_scale) holding random rows at positions < lens[b].
    Everything a kernel must not read is poisoned: positions past a length hold NaN (int8: NaN scales), and a
    paged cache gets a shuffled block table whose unused entries are -1 and spare blocks full of NaN."""
    b = len(lens)
    int8 = dtype == torch.int8
    if page is None:
        shape, table = (b, capacity or max(max(lens), 1), hkv, d), None
    else:
        per_seq = -(-(capacity or max(max(lens), 1)) // page)
        nblocks = b * per_seq + 3
        perm = torch.randperm(nblocks, generator=torch.Generator().manual_seed(seed))
        table = perm[:b * per_seq].view(b, per_seq).clone()
        shape = (nblocks, page, hkv, d)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    pos = torch.arange(shape[1])
    if table is None:
        valid = pos[None] < lens_t[:, None]  # (B, Lmax)
    else:
        seq_of_block = torch.full((shape[0],), -1)
        seq_of_block[table.flatten()] = torch.arange(b).repeat_interleave(table.shape[1])
        first = (table == table).long().cumsum(1) - 1  # block index within its sequence
        start = torch.zeros(shape[0], dtype=torch.long)
        start[table.flatten()] = first.flatten() * page
        used = seq_of_block >= 0
        length = torch.where(used, lens_t[seq_of_block.clamp(min=0)], 0)
        valid = used[:, None] & (start[:, None] + pos[None] < length[:, None])  # (num_blocks, page)
        per_seq_used = -(-lens_t.long() // page)
        table = table.masked_fill(torch.arange(table.shape[1])[None] >= per_seq_used[:, None], -1)
    out = []
    for i in range(2):
        x = randn(shape, torch.float32, "cpu", seed=seed + 10 + i)
        if int8:
            codes, scale = ref.quantize_int8(x)
            out.append((codes, scale.masked_fill(~valid[..., None], float("nan"))))
        else:
            out.append((x.to(dtype).masked_fill(~valid[..., None, None], float("nan")), None))
    (kc, ks), (vc, vs) = out
    move = (lambda t: None if t is None else t.to(device))
    return (move(kc), move(vc), move(lens_t), move(None if table is None else table.int()), move(ks), move(vs))


def torch_same_dtype(q, k_cache, v_cache, lens, table, k_scale, v_scale, scale, causal):
    """torch's own result in q's dtype: SDPA per sequence over its valid prefix (int8 rows dequantised into q's
    dtype), bottom-right causal through an explicit mask."""
    outs = []
    for b in range(q.shape[0]):
        n = torch.arange(int(lens[b]), device=q.device)
        idx = ref.cache_index(n, torch.tensor(b, device=q.device), table, k_cache.shape[1])
        k = ref.dequantize(k_cache[idx], None if k_scale is None else k_scale[idx], q.dtype)
        v = ref.dequantize(v_cache[idx], None if v_scale is None else v_scale[idx], q.dtype)
        lq, lk = q.shape[1], len(n)
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq) if causal else None
        o = F.scaled_dot_product_attention(q[b].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                           attn_mask=mask, scale=scale, enable_gqa=True)
        outs.append(o.transpose(0, 1).nan_to_num(0.0))  # a query with no key: 0
    return torch.stack(outs)


def run_case(case, backend, device, num_splits=None):
    """(ours, torch in dtype, float64 reference) for a case dict."""
    dtype, cache_dtype = case["dtype"], case.get("cache", case["dtype"])
    lens, hq, hkv, d, lq = case["lens"], case["hq"], case["hkv"], case["d"], case["lq"]
    kc, vc, sl, table, ks, vs = make_cache(lens, hkv, d, cache_dtype, device, page=case.get("page"),
                                           capacity=case.get("capacity"), seed=case["seed"])
    q = randn((len(lens), lq, hq, d), dtype, device, seed=case["seed"] + 1)
    causal, scale = case.get("causal", True), d ** -0.5
    with running_on(backend) if backend else contextlib.nullcontext():
        ours = fastllm.decode_attention(q, kc, vc, sl, block_table=table, k_scale=ks, v_scale=vs, causal=causal,
                                        num_splits=num_splits)
    theirs = torch_same_dtype(q, kc, vc, sl, table, ks, vs, scale, causal)
    f64 = (lambda t: t if t is None or t.dtype == torch.int8 else t.double())
    expected = ref.decode_attention(q.double(), f64(kc), f64(vc), sl, table, ks, vs, scale=scale, causal=causal)
    return ours, theirs, expected


CASES = {
    "contig-bf16-lq1-ragged": dict(lens=[1, 37, 130], lq=1, hq=4, hkv=2, d=64, dtype=torch.bfloat16, seed=1),
    "paged-fp16-lq4-block-edges": dict(lens=[16, 33, 64], lq=4, hq=4, hkv=2, d=40, page=16, dtype=torch.float16,
                                       seed=2),
    "paged-fp32-len0-len1": dict(lens=[48, 1, 0], lq=1, hq=2, hkv=2, d=16, page=16, dtype=torch.float32, seed=3),
    "contig-bf16-noncausal-lq3": dict(lens=[3, 300], lq=3, hq=6, hkv=3, d=64, dtype=torch.bfloat16, causal=False,
                                      seed=4),
    "paged-bf16-lq16-two-row-blocks": dict(lens=[20, 129], lq=9, hq=8, hkv=1, d=16, page=32, dtype=torch.bfloat16,
                                           seed=5),
    "contig-fp16-queries-before-start": dict(lens=[2, 70], lq=5, hq=4, hkv=2, d=40, capacity=90,
                                             dtype=torch.float16, seed=6),
    "paged-int8-bf16-lq2": dict(lens=[17, 160, 1], lq=2, hq=4, hkv=2, d=64, page=16, dtype=torch.bfloat16,
                                cache=torch.int8, seed=7),
    "contig-int8-fp16": dict(lens=[64, 5], lq=1, hq=2, hkv=2, d=40, dtype=torch.float16, cache=torch.int8, seed=8),
    "contig-int8-fp32-lq3": dict(lens=[90, 31], lq=3, hq=4, hkv=1, d=16, dtype=torch.float32, cache=torch.int8,
                                 seed=9),
}


# ---- correctness -------------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(device, backend, name):
    ours, theirs, expected = run_case(CASES[name], backend, device)
    assert ours.shape == expected.shape and ours.dtype == CASES[name]["dtype"]
    assert_close(name, ours, theirs, expected)


SPLIT_CASES = {name: CASES[name] for name in ["paged-fp16-lq4-block-edges", "paged-int8-bf16-lq2",
                                               "contig-bf16-noncausal-lq3", "paged-bf16-lq16-two-row-blocks"]}
SPLIT_CASES["contig-fp32-d20-lq6-gqa3"] = dict(lens=[40, 7, 150], lq=6, hq=12, hkv=4, d=20, dtype=torch.float32,
                                               seed=30)  # 72 query rows over 4 kv heads; D not a multiple of 8


@pytest.mark.parametrize("device,backend", [p for p in BACKENDS if p.values[1] in ("triton", "cpu", "cpu-scalar")])
@pytest.mark.parametrize("num_splits", [3, 13])
@pytest.mark.parametrize("name", list(SPLIT_CASES))
def test_forced_split_counts(device, backend, num_splits, name):
    """Any number of splits (more than a short sequence has tiles or keys, too: empty splits) gives the same
    result. The last two cases have 9 x 8 and 6 x 12 query rows per sequence: the C++ kernel's passes of 64 rows,
    the second pass starting inside a kv head's group, and its tail loads for D = 20."""
    ours, theirs, expected = run_case(SPLIT_CASES[name], backend, device, num_splits=num_splits)
    assert_close(name, ours, theirs, expected)


def test_cpu_split_count_past_the_length():
    """A forced split count beyond the longest length uses one split per position (the rest would be empty)."""
    case = CASES["contig-bf16-lq1-ragged"]
    ours, theirs, expected = run_case(case, "cpu", "cpu", num_splits=10 ** 6)
    assert_close("out", ours, theirs, expected)


@pytest.mark.parametrize("name,case", [
    ("long-fp32-gqa3", dict(lens=[4500, 700, 2049], lq=2, hq=6, hkv=2, d=32, dtype=torch.float32, seed=21)),
    ("long-bf16-paged-one-seq", dict(lens=[2500], lq=1, hq=9, hkv=3, d=64, page=64, dtype=torch.bfloat16, seed=22))])
def test_cpu_long_sequences_split_by_default(name, case):
    """The C++ kernel's own choice of splits: at most 1024 keys per split (4500 keys: at least 5, the shorter
    sequences' last ones empty) and, for one sequence on a few threads, 4 per thread (2500 keys, 2 threads: 8)."""
    ours, theirs, expected = run_case(case, "cpu", "cpu")
    assert_close(name, ours, theirs, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_small_tiles_many_splits(device):
    """16-position tiles over 16-position pages, 7 splits: tiles, pages and chunks meet at every boundary."""
    from fastllm.kernels import decode_attention as kd

    case = dict(lens=[15, 16, 17, 111], lq=2, hq=4, hkv=2, d=24, page=16, dtype=torch.float32, seed=11)
    kc, vc, sl, table, _, _ = make_cache(case["lens"], 2, 24, torch.float32, device, page=16, seed=11)
    q = randn((4, 2, 4, 24), torch.float32, device, seed=12)
    out = kd.decode_attention(q, kc, vc, sl, table, scale=0.3, num_splits=7, config=kd.DecodeConfig(16))
    theirs = torch_same_dtype(q, kc, vc, sl, table, None, None, 0.3, True)
    assert_close("out", out, theirs, ref.decode_attention(q.double(), kc.double(), vc.double(), sl, table, scale=0.3))


def test_cpu_default_path_is_the_cpp_kernel():
    """Not forced: CPU tensors take the C++ kernel and match the reference."""
    case = CASES["paged-int8-bf16-lq2"]
    ours, theirs, expected = run_case(case, None, "cpu")
    assert fastllm.dispatch_log()["decode_attention"]["backend"] == "cpu"
    assert_close("out", ours, theirs, expected)


def test_cpu_strided_rows_fall_back_to_torch():
    """A cache whose head dim is strided is not for the C++ kernel (it reads rows with unit stride): the batched
    torch path runs it, the dispatch log says why, and the answer is the same."""
    kc, vc, sl, _, _, _ = make_cache([5, 19], 2, 16, torch.float32, "cpu", seed=13)
    kc, vc = (t.transpose(2, 3).contiguous().transpose(2, 3) for t in (kc, vc))  # same values, head-dim stride 2
    q = randn((2, 1, 4, 16), torch.float32, "cpu", seed=14)
    out = fastllm.decode_attention(q, kc, vc, sl)
    log = fastllm.dispatch_log()["decode_attention"]
    assert log["backend"] == "torch" and "unit stride" in log["skipped"]["cpu"]
    expected = ref.decode_attention(q.double(), kc.double(), vc.double(), sl, scale=0.25)
    assert_close("out", out, torch_same_dtype(q, kc, vc, sl, None, None, None, 0.25, True), expected)


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_strided_lengths(device, backend, paged):
    """cache_seqlens a [::2] view with junk between its entries: every kernel reads a dense copy of it (the C++
    one's must live until the kernel returns; the Triton kernels index it without a stride)."""
    kc, vc, sl, table, _, _ = make_cache([48, 1, 30], 2, 16, torch.float32, device, page=16 if paged else None,
                                         seed=15)
    strided = torch.stack([sl, torch.full_like(sl, 1 << 30)], 1).flatten()[::2]
    q = randn((3, 1, 2, 16), torch.float32, device, seed=16)
    with running_on(backend):
        dense = fastllm.decode_attention(q, kc, vc, sl, block_table=table)
        for _ in range(20 if backend == "cpu" else 1):  # (a dangling copy is overwritten only sometimes)
            out = fastllm.decode_attention(q, kc, vc, strided, block_table=table)
            torch.testing.assert_close(out, dense, rtol=0, atol=0)


def test_batches_past_cuda_grid_limits_are_not_for_the_kernels():
    """The Triton kernels of decode_attention and kv_cache_append hold the batch in a grid dimension of at most
    65535 programs on CUDA: more is refused with the reason."""
    b = 65536
    kc, vc = torch.zeros(b, 2, 1, 16), torch.zeros(b, 2, 1, 16)
    lens, new = torch.ones(b, dtype=torch.int32), torch.zeros(b, 1, 1, 16)
    with running_on("triton"), pytest.raises(ValueError, match="batch = 65536 exceeds the 65535"):
        fastllm.decode_attention(new, kc, vc, lens)
    with running_on("triton"), pytest.raises(ValueError, match="batch = 65536 exceeds the 65535"):
        fastllm.kv_cache_append(kc, vc, new, new, lens)


def test_num_splits_heuristic(monkeypatch):
    """With an H100's 132 SMs: split only while B x Hkv programs leave SMs idle, >= 256 positions per split."""
    from fastllm.kernels import decode_attention as kd

    monkeypatch.setattr(kd, "sm_count", lambda device: 132)
    cpu = torch.device("cpu")
    assert kd.num_splits_for(1 * 8, 4096, cpu) == 16  # limited by SPLIT_MIN_TOKENS
    assert kd.num_splits_for(1 * 8, 32768, cpu) == 33  # 2 programs per SM
    assert kd.num_splits_for(16 * 8, 32768, cpu) == 3
    assert kd.num_splits_for(64 * 8, 4096, cpu) == 1  # the batch fills the GPU
    assert kd.num_splits_for(1, 1 << 20, cpu) == kd.MAX_SPLITS
    assert kd.num_splits_for(4, 100, cpu) == 1


# ---- bad input ---------------------------------------------------------------------------------
def test_bad_input():
    kc, vc, sl, table, _, _ = make_cache([5, 20], 2, 16, torch.float32, "cpu", page=16)
    q = torch.randn(2, 1, 4, 16)
    ks = torch.ones(kc.shape[:3])
    cases = [
        (TypeError, "q", dict(q=q.int())),
        (ValueError, "q must be 4-D", dict(q=q[0])),
        (TypeError, "k_cache", dict(q=q.half())),
        (ValueError, "v_cache", dict(v_cache=vc[:, :8])),
        (ValueError, "k_cache has 2 kv heads, which must divide q's 3 heads", dict(q=torch.randn(2, 1, 3, 16))),
        (ValueError, "head dim", dict(q=torch.randn(2, 1, 4, 8))),
        (TypeError, "cache_seqlens", dict(cache_seqlens=sl.long())),
        (ValueError, "cache_seqlens", dict(cache_seqlens=sl[:1])),
        (ValueError, "cache_seqlens\\[1\\] = 40 exceeds", dict(cache_seqlens=torch.tensor([5, 40], dtype=torch.int32))),
        (ValueError, "cache_seqlens\\[0\\] = -1", dict(cache_seqlens=torch.tensor([-1, 4], dtype=torch.int32))),
        (ValueError, "block_table\\[1, 1\\] = 99", dict(block_table=table.clone().index_put_(
            (torch.tensor(1), torch.tensor(1)), torch.tensor(99, dtype=torch.int32)))),
        (ValueError, "block_table", dict(block_table=table.long())),
        (ValueError, "k_cache", dict(block_table=None)),
        (ValueError, "k_scale is only", dict(k_scale=ks)),
        (ValueError, "k_scale is required", dict(k_cache=kc.to(torch.int8), v_cache=vc.to(torch.int8))),
        (ValueError, "k_scale must be float32 of shape", dict(k_cache=kc.to(torch.int8), v_cache=vc.to(torch.int8),
                                                              k_scale=ks[:, :8], v_scale=ks)),
        (ValueError, "k_cache must be 4-D", dict(k_cache=kc[..., 0], v_cache=vc[..., 0])),
        (ValueError, "q's head dim 300 exceeds", dict(q=torch.randn(2, 1, 4, 300),
                                                      k_cache=kc.new_zeros(*kc.shape[:3], 300),
                                                      v_cache=vc.new_zeros(*vc.shape[:3], 300))),
        (TypeError, "k_cache must be float32, float16, bfloat16, int8", dict(k_cache=kc.to(torch.int16),
                                                                             v_cache=vc.to(torch.int16))),
        (ValueError, "num_splits", dict(num_splits=0)),
        (TypeError, "causal", dict(causal=1)),
        (TypeError, "scale", dict(scale="x")),
        (ValueError, "device", dict(cache_seqlens=sl.to("meta"))),
    ]
    for exc, word, kwargs in cases:
        args = dict(q=q, k_cache=kc, v_cache=vc, cache_seqlens=sl, block_table=table) | kwargs
        with pytest.raises(exc, match=word):
            fastllm.decode_attention(**args)


def test_unused_block_table_entries_are_not_checked():
    """Entries past a sequence's blocks may hold anything (here -1, as make_cache leaves them)."""
    kc, vc, sl, table, _, _ = make_cache([5, 40], 1, 16, torch.float32, "cpu", page=16, capacity=64)
    assert (table == -1).any()
    fastllm.decode_attention(torch.randn(2, 1, 1, 16), kc, vc, sl, block_table=table)


# ---- custom op, compile, CUDA graphs -----------------------------------------------------------
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_opcheck(device, backend):
    for case in ("paged-int8-bf16-lq2", "contig-fp16-queries-before-start"):
        c = CASES[case]
        kc, vc, sl, table, ks, vs = make_cache(c["lens"], c["hkv"], c["d"], c.get("cache", c["dtype"]), device,
                                               page=c.get("page"), capacity=c.get("capacity"))
        q = randn((len(c["lens"]), c["lq"], c["hq"], c["d"]), c["dtype"], device, seed=0)
        with running_on(backend):
            torch.library.opcheck(torch.ops.fastllm.decode_attention.default,
                                  (q, kc, vc, sl, table, ks, vs, 0.125, True, 0))


def test_compiles_without_graph_breaks():
    kc, vc, sl, table, _, _ = make_cache([5, 20], 2, 16, torch.float32, "cpu", page=16)
    q = torch.randn(2, 1, 4, 16)

    def step(q, kc, vc, sl, table):
        return fastllm.decode_attention(q, kc, vc, sl, block_table=table) * 2

    eager = step(q, kc, vc, sl, table)
    torch.testing.assert_close(torch.compile(step, fullgraph=True, dynamic=False)(q, kc, vc, sl, table), eager)


@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("cache", [torch.bfloat16, torch.int8])
def test_cuda_graph_capture_and_replay(backend, cache):
    """A decode step (append with rotary, then attention) captured once and replayed with new lengths and new
    tokens gives what the same step gives eagerly."""
    dev, hq, hkv, d, page = "cuda", 8, 2, 64, 16
    kc, vc, sl, table, ks, vs = make_cache([40, 100, 7], hkv, d, cache, dev, page=page, capacity=256)
    kc, vc = kc.nan_to_num(0.0), vc.nan_to_num(0.0)
    table = torch.randperm(kc.shape[0], device=dev)[:3 * 16].view(3, 16).int()
    ks, vs = (None, None) if ks is None else (ks.nan_to_num(0.0), vs.nan_to_num(0.0))
    pos = torch.arange(512, device=dev)[:, None] * 10000 ** (-torch.arange(d // 2, device=dev) / (d // 2))
    cos, sin = torch.cat([pos.cos()] * 2, -1), torch.cat([pos.sin()] * 2, -1)
    k_new, v_new = (randn((3, 1, hkv, d), torch.bfloat16, dev, seed=s) for s in (1, 2))
    q = randn((3, 1, hq, d), torch.bfloat16, dev, seed=3)

    def step(kc, vc, ks, vs):
        qr = fastllm.kv_cache_append(kc, vc, k_new, v_new, sl, block_table=table, k_scale=ks, v_scale=vs, cos=cos,
                                     sin=sin, q=q)
        return fastllm.decode_attention(qr, kc, vc, sl + 1, block_table=table, k_scale=ks, v_scale=vs)

    state = [t.clone() if t is not None else None for t in (kc, vc, ks, vs)]
    with running_on(backend):
        step(*[t.clone() if t is not None else None for t in state])  # warm up (compile) outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step(*state)
        for lens in ([41, 101, 8], [200, 3, 0]):
            sl.copy_(torch.tensor(lens, device=dev))
            for t, s in zip((k_new, v_new, q), (4, 5, 6)):
                t.copy_(randn(t.shape, t.dtype, dev, seed=s + lens[0]))
            fresh = [t.clone() if t is not None else None for t in state]
            graph.replay()
            expected = step(*fresh)
            torch.testing.assert_close(out, expected, atol=0, rtol=0)
            for a, b in zip(state, fresh):
                if a is not None:
                    assert torch.equal(a, b)


def test_kernels_compile_for_h100():
    """The split and combine kernels compile for sm_90 (fp16/bf16/int8/fp32 caches, paged and contiguous) within
    the shared memory of an H100 (the interpreter accepts kernels the compiler rejects)."""
    compile_check(__file__)


def _compile_all():
    from fastllm.kernels import decode_attention as kd
    from helpers import compile_for_sm90

    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int8: "i8"}
    for q_dtype, cache, d, paged, block_m in ((torch.bfloat16, torch.bfloat16, 128, False, 16),
                                              (torch.float16, torch.float16, 128, True, 64),
                                              (torch.bfloat16, torch.int8, 128, True, 16),
                                              (torch.bfloat16, torch.bfloat16, 256, False, 64),
                                              (torch.float32, torch.float32, 64, True, 16)):
        cfg = kd.pick_config(d, cache)
        t, c = "*" + names[q_dtype], "*" + names[cache]
        ptrs = dict(Q=t, K=c, V=c, KS="*fp32", VS="*fp32", BT="*i32", SEQ="*i32", O="*fp32", LSE="*fp32")
        consts = dict(BLOCK_M=block_m, BLOCK_N=cfg.block_n, D_P=d, PAGED=paged, INT8=cache == torch.int8,
                      CAUSAL=True, SPLIT=True, DOT=1 if q_dtype == torch.float32 else 0, EXACT_BF16=False)
        shared = compile_for_sm90(kd._split_kernel, ptrs, consts, cfg.num_warps, cfg.num_stages, {"qk_scale": "fp32"})
        print("split", q_dtype, cache, d, paged, block_m, cfg, "shared", shared)
        assert shared <= 227 * 1024
    shared = compile_for_sm90(kd._combine_kernel, dict(OP="*fp32", LSE="*fp32", O="*bf16"),
                              dict(S_P=kd.MAX_SPLITS, D_P=256, EXACT_BF16=False), 8, 1)
    print("combine shared", shared)


if __name__ == "__main__" and sys.argv[1:] == ["compile-check"]:
    _compile_all()
