"""fastllm.qmatmul on every backend (C++ AVX2, C++ scalar, CUDA GEMV, Triton GEMM, torch reference)
against dequantise-then-matmul in float64, both activation modes, every format, odd M and N, several
K; gradients, strides, empty input, bad input, opcheck and torch.compile. The CUDA GEMV takes
act="float" and M <= 8 only, the Triton GEMM act="float" only: their cases outside that skip (the
dispatcher sends them elsewhere, test_cuda_dispatch_limits). tests/test_qmatmul_triton.py has the
Triton kernel's own tile, split-K and compile checks."""
import pytest
import torch
import torch.nn.functional as F

import fastllm
from fastllm import _backend
from fastllm.ops.qmatmul import CUDA_GEMV_MAX_M, _exact
from fastllm.quant.formats import int4_exact
from fastllm.reference import dequantize_activations, qmatmul_fwd, quantize_activations
from helpers import DTYPES, assert_close, device_backends, needs_cuda, randn, running_on

FORMATS = [("int8", None), ("int8", 32), ("int4", 32), ("int4", 64), ("int4", 128), ("int4_asym", 32),
           ("int4_asym", 128)]
SHAPES = [(1, 13, 128), (3, 37, 256), (9, 19, 384), (17, 1, 128), (2, 33, 2048), (4, 7, 32),
          (5, 9, 160)]  # (M, N, K): K = 32 and 160 give an odd number of 32-blocks. No case has a single
# output: the RMS rule compares with torch's error on the same outputs, and for one output that is a
# coin toss (torch's one sum may round almost exactly: every CPU path then misses 3-9% of random draws)


def _case(m, n, k, dtype, device, seed, scheme, group, with_bias):
    x = randn((m, k), dtype, device, seed=seed, shift=0.3)
    q = fastllm.quantize(randn((n, k), torch.float32, device, seed=seed + 1, scale=0.05), scheme, group)
    b = randn((n,), dtype, device, seed=seed + 2) if with_bias else None
    return x, q, b


def _torch_peer(x, q, b, act):
    """torch's own F.linear in x's dtype on the same (dequantised) operands."""
    xa = dequantize_activations(*quantize_activations(x)) if act == "int8" else x
    return F.linear(xa.to(x.dtype), q.dequantize(x.dtype), b)


def _takes(backend, m, act):
    """Whether `backend` has a kernel for M rows of x in mode act (the CUDA GEMV: float, M <= 8; the
    Triton GEMM: float)."""
    if backend == "triton":
        return act == "float"
    return backend != "cuda" or (act == "float" and m <= CUDA_GEMV_MAX_M)


def _check(x, q, b, act, backend):
    with running_on(backend):
        y = fastllm.qmatmul(x, q, b, act=act)
    ref = qmatmul_fwd(x.double().view(-1, x.shape[-1]), q.data, q.scales, q.mins,
                      None if b is None else b.double(), q.format, act).view(y.shape)
    if act == "int8":  # the activations are quantised from x as given, then used in float64
        qx, dx = quantize_activations(x.reshape(-1, x.shape[-1]))
        xa = (qx.double().view(qx.shape[0], -1, 32) * dx.double()[..., None]).view(qx.shape)
        ref = (xa @ q.dequantize(torch.float64).t() + (0 if b is None else b.double())).view(y.shape)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], q.shape[0])
    assert_close(f"qmatmul {q.scheme}/{q.group_size} act={act}", y, _torch_peer(x, q, b, act), ref)


@pytest.mark.parametrize("device,backend", device_backends("qmatmul"))
@pytest.mark.parametrize("act", ["float", "int8"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scheme,group", FORMATS, ids=str)
def test_qmatmul_matches_reference(device, backend, act, dtype, scheme, group):
    if not _takes(backend, 1, act):
        pytest.skip(f"{backend} has no act={act!r} kernel")
    for i, (m, n, k) in enumerate(SHAPES):
        if k % (group or 32) or not _takes(backend, m, act):
            continue
        _check(*_case(m, n, k, dtype, device, i * 7 + (group or 0), scheme, group, i % 2 == 0), act, backend)


def test_int8_activation_quantisation_is_bit_identical():
    """The C++ kernels quantise the activations exactly as quantize_activations: a weight of one-hot
    rows (int8, scale 1) returns qx * dx itself, also at rounding ties and where 127 / amax rounded twice
    would differ."""
    k = 64
    x = torch.randn(3, k) * 3
    x[0, :32] = torch.cat([torch.tensor([127.0]), torch.arange(-15, 16) + 0.5])  # 127 / amax = 1: exact .5 ties
    # amax a = 3.8047821: 127 / a divided once (as the kernels do) is 33.379047, but rounded twice (1 / a, then
    # times 127) 33.379044; these x then round to different integers with the two factors
    a = torch.tensor(3.8047821)
    inv, inv2 = torch.full_like(a, 127.0) / a, a.reciprocal() * 127
    near = ((torch.arange(31) + 0.5) / inv.double()).float()
    near = torch.stack([near, torch.nextafter(near, near + 1), torch.nextafter(near, near - 1)], -1).flatten()
    split = near[torch.round(near * inv) != torch.round(near * inv2)][:31]
    assert split.numel() > 0
    x[1, 32:] = torch.cat([a[None], split, torch.zeros(31 - split.numel())])
    q = fastllm.QuantizedWeight(torch.eye(k, dtype=torch.int8), torch.ones(k, 1), None, "int8", None, (k, k))
    for backend in ("cpu", "cpu-avx2", "cpu-scalar"):
        with running_on(backend):
            y = fastllm.qmatmul(x, q, act="int8")
        assert torch.equal(y, dequantize_activations(*quantize_activations(x))), backend


@pytest.mark.parametrize("device,backend", device_backends("qmatmul"))
@pytest.mark.parametrize("act", ["float", "int8"])
@pytest.mark.parametrize("scheme,group", [("int8", None), ("int4", 32), ("int4_asym", 32)], ids=str)
def test_qmatmul_k_chunks_and_row_tiles(device, backend, act, scheme, group):
    """M = 40 rows of x make the AVX2 driver (int8 mode) split K = 1056 (33 blocks) into chunks of 8
    blocks, the odd block in the last one, and N = 37 into row tiles of 16 and a partial one; the float
    GEMM into K chunks of 7, 7, 7, 7 and 5 blocks (on 8 lanes: panels of 16 + 16 + 8 rows, micro-tiles of 6 and
    12 weight rows; on 16: 32 + 16 rows, 8 of them real, micro-tiles of 12 and 24), the AVX-512 int8 GEMM into
    chunks of 17 and 16, each with one partial tile of 48 rows. On CUDA (M = 8) K = 1056 is a tile of 32 chunks
    and one of 1, N = 37 two blocks of 16 channels and a partial one."""
    m = CUDA_GEMV_MAX_M if backend == "cuda" else 40
    if not _takes(backend, m, act):
        pytest.skip(f"{backend} has no act={act!r} kernel")
    _check(*_case(m, 37, 1056, torch.float32, device, 3, scheme, group, True), act, backend)


@pytest.mark.parametrize("device,backend", device_backends("qmatmul"))
@pytest.mark.parametrize("scheme,group", [("int8", None), ("int4_asym", 32)], ids=str)
def test_qmatmul_rows_in_passes(device, backend, scheme, group):
    """M = 549: the CPU GEMMs run passes of 256, 256 and 37 rows (x, its int8 form and y offset per pass;
    bfloat16 x: the AVX512_BF16 GEMM's rows with a row stride of 200)."""
    for act in ("float", "int8"):
        if _takes(backend, 549, act):
            _check(*_case(549, 29, 160, torch.float32, device, 19, scheme, group, True), act, backend)
    _, q, b = _case(549, 29, 160, torch.bfloat16, device, 21, scheme, group, True)
    _check(randn((549, 200), torch.bfloat16, device, seed=22)[:, 20:180], q, b, "float", backend)


@pytest.mark.parametrize("device,backend", device_backends("qmatmul"))
@pytest.mark.parametrize("scheme,group", [("int8", 128), ("int4", 128), ("int4_asym", 64)], ids=str)
def test_qmatmul_groups_across_k_chunks(device, backend, scheme, group):
    """The AVX-512 int8 GEMM's two K chunks split a group in two: K = 1152 (chunks of 18 blocks) the group of
    128 at blocks 16-19, K = 1088 (chunks of 17) the group of 64 at blocks 16-17; int4_asym adds that
    group's min term once."""
    k = 1152 if group == 128 else 1088
    for act in ("float", "int8"):
        if _takes(backend, 20, act):
            _check(*_case(20, 50, k, torch.float32, device, 17, scheme, group, True), act, backend)


@pytest.mark.parametrize("device,backend", device_backends("qmatmul"))
@pytest.mark.parametrize("scheme,group", FORMATS, ids=str)
def test_qmatmul_single_row_long_k(device, backend, scheme, group):
    """M = 1 (the AVX-512 int8 mode takes 4 weight rows at a time: N = 21 leaves one alone) with a K
    long enough for several K chunks there (64 units each), ending in a partial unit where the group
    allows it (K = 8224: 257 blocks)."""
    k = 8224 if (group or 32) == 32 else 8320
    for act in ("float", "int8"):
        if _takes(backend, 1, act):
            _check(*_case(1, 21, k, torch.float32, device, 5, scheme, group, True), act, backend)


@pytest.mark.parametrize("device,backend", device_backends("qmatmul"))
@pytest.mark.parametrize("scheme,group", FORMATS, ids=str)
def test_qmatmul_one_and_two_rows_small_k(device, backend, scheme, group):
    """M = 1 (the AVX-512 decode kernels: 4 int4 weight rows per pass, int4 units of 4 blocks, one
    contiguous range of 16-row tiles per thread) and M = 2 (the general path) on SmolLM2-like shapes:
    K from one block (a single group, one partial unit) to several units ending in a partial one,
    N below a pass, not a multiple of 4, over several tiles, and large enough to run on all threads."""
    g = group or 32
    cases = [(7, 32), (37, 96), (21, 160), (600, 64), (45, 576), (19, 1536)]  # (N, K)
    for i, (n, k) in enumerate(cases):
        if k % g:
            continue
        for m in (1, 2):
            for act in ("float", "int8"):
                if _takes(backend, m, act):
                    _check(*_case(m, n, k, torch.float32, device, 11 * i + m, scheme, group, i % 2 == 1), act, backend)


@pytest.mark.parametrize("device,backend", device_backends("qmatmul"))
def test_qmatmul_single_row_weights_that_round(device, backend):
    """int4_asym weights u d + m that fp32 rounds, m far from d in magnitude (both ways), among ordinary rows in
    every position of a group of 4 weight rows (the AVX-512 M = 1 kernel's register tiles), x alternating in sign:
    the weights are the rounded values, as formats.py dequantises them. With m = 1, d = 2^-24 the rounding is
    most of each result, with m = 2^-24, d = 1 within half an ulp of it. Then x with an element of 2^120 against
    scales of 2^-20: products of x with the unscaled (u - 8) would overflow where the result does not."""
    n, k = 11, 64
    x = torch.ones(1, k, device=device)
    x[0, 1::2] = -1.0
    for rows, d, m in (((1, 6), 2.0 ** -24, 1.0), ((4, 10), 1.0, 2.0 ** -24)):
        q = fastllm.quantize(randn((n, k), torch.float32, device, seed=3, scale=0.05), "int4_asym", 32)
        for row in rows:
            q.scales[row], q.mins[row] = d, m
        _check(x, q, None, "float", backend)
    xb = randn((1, k), torch.float32, device, seed=4)
    xb[0, 5] = 2.0 ** 120
    q.scales[:] = 2.0 ** -20
    with running_on(backend):
        assert torch.isfinite(fastllm.qmatmul(xb, q)).all()
    _check(xb, q, None, "float", backend)


def test_int4_exact_condition():
    """formats.int4_exact, which lets the CPU float mode factor the scales out at M = 1, against brute force: for
    float16 pairs (d, m) of every exponent spread, subnormals, zeros and signs, int4_asym pairs it accepts give
    u d + m exact in float32 for every u (float64 holds them exactly); it accepts whole spreads of -8..12 and the
    weights fastllm.quantize makes, and refuses non-finite scales and a pair that rounds."""
    g = torch.Generator().manual_seed(0)
    exps = torch.randint(-26, 16, (2, 20000), generator=g).double()
    d, m = (torch.rand(2, 20000, generator=g, dtype=torch.float64) + 1) * 2.0 ** exps
    d, m = d * torch.where(torch.rand(20000, generator=g) < 0.5, -1, 1), -m
    d[:50], m[50:100] = 0.0, 0.0
    d, m = d.half(), m.half()
    u = torch.arange(16, dtype=torch.float64)[:, None]
    exact = ((u * d.double() + m.double()).float().double() == u * d.double() + m.double()).all(0)
    accepted = torch.tensor([int4_exact(d[i:i + 1], m[i:i + 1]) for i in range(d.numel())])
    assert not (accepted & ~exact).any()
    spread = torch.frexp(m.float())[1].clamp(min=-13) - torch.frexp(d.float())[1].clamp(min=-13)
    assert accepted[(spread >= -8) & (spread <= 12)].all()
    for scheme in ("int4", "int4_asym"):
        q = fastllm.quantize(torch.randn(64, 256, generator=g), scheme, 32)
        assert int4_exact(q.scales, q.mins)
        q.scales[3, 1] = float("inf")
        assert not int4_exact(q.scales, q.mins)
    assert not int4_exact(torch.tensor([2.0 ** -24]).half(), torch.tensor([1.0]).half())


@pytest.mark.parametrize("device,backend", device_backends("qmatmul"))
@pytest.mark.parametrize("scheme,group", [f for f in FORMATS if f[0] != "int8"], ids=str)
def test_qmatmul_single_row_both_kernels(device, backend, scheme, group):
    """M = 1 float mode on SmolLM2-like shapes (see test_qmatmul_one_and_two_rows_small_k) through both AVX-512
    kernels: the integer-digit one, for weights exact in float32 (formats.int4_exact), and the dequantising one,
    once a weight is made inexact in place after a first call (the exactness remembered for the weight must be
    dropped): a row of int4_asym (d, m) = (2^-24, 1) against x of alternating sign, where the rounding of
    u d + m is most of the result (test_qmatmul_single_row_weights_that_round; K = 1536), or an infinite int4 scale. The
    first x holds an element 10^4 times the others, a block of zeros and a block of tiny values."""
    g = group or 32
    for i, (n, k) in enumerate([(7, 32), (37, 96), (21, 160), (45, 576), (19, 1536)]):
        if k % g:
            continue
        x, q, b = _case(1, n, k, torch.float32, device, 31 * i, scheme, group, i % 2 == 0)
        x[0, 3] = 1e4
        if k >= 96:
            x[0, 32:64] = 0.0
            x[0, 64:96] *= 1e-12
        _check(x, q, b, "float", backend)
        assert _exact(q.scales, q.mins, q.format)
        row = n // 2
        if scheme == "int4_asym":  # (at K = 1536 only: at small K the other CPU paths' sums, in another order than
            if k != 1536:          # torch's, can be 1.8-4.6x its error on such a row, or 0.03x: a coin toss)
                continue
            q.scales[row], q.mins[row] = 2.0 ** -24, 1.0
            xa = torch.ones(1, k, device=device)
            xa[0, 1::2] = -1.0
            _check(xa, q, None, "float", backend)
        else:
            q.scales[row, -1] = float("inf")
            with running_on(backend):
                y = fastllm.qmatmul(x, q)
            assert not torch.isfinite(y[0, row]) and torch.isfinite(y[0, :row]).all()
        assert not _exact(q.scales, q.mins, q.format)


@pytest.mark.parametrize("device,backend", device_backends("qmatmul"))
@pytest.mark.parametrize("scheme", ["int4", "int4_asym"])
def test_qmatmul_single_row_outliers_against_zero_weights(device, backend, scheme):
    """Activation outliers (10^2 to 10^8 times the rest, one or two in a block, as in real LLMs' down projections)
    meeting a zero weight column: the rest of the block must keep its own accuracy (the digit kernel's error is
    relative to the block's largest |x|, so it refuses blocks spread that far; reviewer's case)."""
    w = randn((64, 256), torch.float32, device, seed=8, scale=0.05)
    w[:, 3] = w[:, 200] = w[:, 201] = 0.0
    q = fastllm.quantize(w, scheme, 32)
    for big in (1e2, 1e3, 1e4, 1e8):
        x = randn((1, 256), torch.float32, device, seed=9)
        x[0, 3] = big
        x[0, 200], x[0, 201] = big, -big / 3
        _check(x, q, None, "float", backend)


@pytest.mark.parametrize("device,backend", device_backends("qmatmul"))
@pytest.mark.parametrize("scheme", ["int4", "int4_asym"])
def test_qmatmul_single_row_activation_range(device, backend, scheme):
    """The digit kernel takes x whose every element is 0 or 2^-60 <= |x| < 2^60; x at both ends of that range, and
    outside it (the dequantising kernel: subnormal and huge x too), match the reference."""
    q = fastllm.quantize(randn((21, 256), torch.float32, device, seed=4, scale=0.05), scheme, 32)
    for lo, hi in ((2.0 ** -60, 2.0 ** 59.9), (2.0 ** -61, 1.0), (1.0, 2.0 ** 60), (2.0 ** -60, 2.0 ** -59),
                   (2.0 ** -140, 2.0 ** -130), (2.0 ** -120, 2.0 ** -118), (2.0 ** 100, 2.0 ** 120)):
        x = randn((1, 256), torch.float32, device, seed=5).abs().clamp(1.0, 2.0)
        x = torch.where(torch.arange(256, device=device) % 3 == 0, x * lo, x * hi / 2)
        x[0, 1::2] *= -1
        _check(x, q, None, "float", backend)
        if 2.0 ** -126 < lo and hi < 2.0 ** -100:  # normal results far below _check's absolute floor: relative check
            with running_on(backend):
                y = fastllm.qmatmul(x, q).double()
            ref = x.double() @ q.dequantize(torch.float64).t()
            assert (y - ref).abs().max() <= 1e-5 * ref.abs().max(), (lo, hi)


@pytest.mark.parametrize("device,backend", device_backends("qmatmul"))
@pytest.mark.parametrize("scheme,group", [f for f in FORMATS if f[0] != "int8"], ids=str)
def test_qmatmul_bfloat16_single_row(device, backend, scheme, group):
    """M = 1 with bfloat16 x (on AVX512_BF16 CPUs the vdpbf16ps kernel, two blocks per step): K with an odd
    number of blocks (the last step half empty: 1, 3, 5 and 33 blocks) and an even one, N below a pass of 4
    weight rows, not a multiple of 4 and over many 16-row tiles on all threads, groups of 1-4 blocks, with
    and without bias; then NaN and inf activations reach every output."""
    g = group or 32
    cases = [(7, 32), (37, 96), (21, 160), (45, 576), (600, 1056), (19, 1536)]  # (N, K)
    for i, (n, k) in enumerate(cases):
        if k % g == 0:
            _check(*_case(1, n, k, torch.bfloat16, device, 5 * i + 1, scheme, group, i % 2 == 0), "float", backend)
    x, q, _ = _case(1, 9, 160 if g == 32 else 256, torch.bfloat16, device, 3, scheme, group, False)
    for value in (float("nan"), float("inf")):
        bad = x.clone()
        bad[0, 37] = value
        with running_on(backend):
            assert not torch.isfinite(fastllm.qmatmul(bad, q)).any(), value


@pytest.mark.parametrize("device,backend", device_backends("qmatmul"))
@pytest.mark.parametrize("scheme,group", [f for f in FORMATS if f[0] != "int8"], ids=str)
def test_qmatmul_bfloat16_rows(device, backend, scheme, group):
    """bfloat16 x with int4 weights at M = 2-11 (on AVX512_BF16 CPUs register tiles of 4 weight rows x up to 4
    rows of x, in even passes) and from 12 rows on (the GEMM: panels of 16 and 32 rows, tiles of 48 weight rows,
    K chunks of 8 blocks): N = 101 spans 16- and 48-row tiles with a partial last one, K = 1152 is 36 blocks
    (groups up to 4 blocks), K = 1056 33 (an odd count, groups of 1)."""
    shapes = [(101, 1152)] + ([(53, 1056)] if (group or 32) == 32 else [])
    for n, k in shapes:
        for i, m in enumerate((2, 3, 5, 8, 11, 12, 16, 40)):
            _check(*_case(m, n, k, torch.bfloat16, device, 31 * i + n, scheme, group, i % 2 == 0), "float", backend)


@pytest.mark.parametrize("device,backend", device_backends("qmatmul"))
@pytest.mark.parametrize("scheme", ["int4", "int4_asym"])
@pytest.mark.parametrize("group", [32, 128])
def test_qmatmul_bfloat16_exact_sums(device, backend, scheme, group):
    """Sums that are exact in bfloat16 must come out exactly, whichever kernel runs: x is 0 but for 6 entries of
    +-1 per row (one in the last block), the scales 1/16 or 1/32 and the mins multiples of them, so every output is
    a multiple of 1/32 below 8 (8 significant bits at most). A lane of the wrong block or row, or a scale of the
    wrong group, shows as a wrong value rather than a small error under the tolerance."""
    n, k = 45, 1056 if group == 32 else 1152
    g = torch.Generator().manual_seed(group + len(scheme))
    data = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
    scales = (2.0 ** -torch.randint(4, 6, (n, k // group), generator=g).float()).half()
    mins = None if scheme == "int4" else (scales.float() * torch.randint(-8, 1, scales.shape, generator=g)).half()
    q = fastllm.QuantizedWeight(data, scales, mins, scheme, group, (n, k)).to(device)
    for m in (1, 3, 8, 12, 33):
        x = torch.zeros(m, k)
        for i in range(m):
            at = torch.cat([torch.randperm(k - 32, generator=g)[:5], torch.randint(k - 32, k, (1,), generator=g)])
            x[i, at] = torch.randint(0, 2, (6,), generator=g).float() * 2 - 1
        x = x.to(device, torch.bfloat16)
        ref = x.double() @ q.dequantize(torch.float64).t()
        assert (ref * 32 == (ref * 32).round()).all() and ref.abs().max() < 8  # exact in bfloat16
        with running_on(backend):
            y = fastllm.qmatmul(x, q)
        assert torch.equal(y, ref.to(torch.bfloat16)), (m, (y.double() - ref).abs().max())


@pytest.mark.parametrize("device,backend", device_backends("qmatmul"))
@pytest.mark.parametrize("scheme,group", [("int4", 32), ("int4_asym", 32), ("int4_asym", 128)], ids=str)
def test_qmatmul_bfloat16_extremes(device, backend, scheme, group):
    """bfloat16 x that the AVX512_BF16 kernels cannot take as they are gives exactly what the fp32 path (the
    "cpu-avx512" cap) gives, at M = 1, 5 and 12: inf, NaN; subnormal (vdpbf16ps flushes it) and small normal
    values whose products cancel to a subnormal sum (flushed too); |x| >= 2^64 (a scaled block sum could
    overflow). Infinite scales and mins make exactly the reference's outputs non-finite."""
    if backend != "cpu":
        pytest.skip("the AVX512_BF16 kernels' fall-back, against the fp32 path")
    k = 256
    for m in (1, 5, 12):
        x, q, _ = _case(m, 9, k, torch.bfloat16, device, 41 + m, scheme, group, False)
        q.data[:, :2] = q.data[:, :2] & 0xF0 | 9  # elements 0 and 1: u = 9 in every row,
        q.scales[:, 0] = 1024.0  # and a scale that brings their tiny sum back to a normal output
        for name in ("inf", "nan", "subnormal", "cancelling", "huge"):
            bad = x.clone()
            if name in ("inf", "nan"):
                bad[m // 2, 77] = -float(name)
            elif name == "subnormal":
                bad[0] = 3e-39 * torch.sign(bad[0].float())
            elif name == "cancelling":  # 2^-125 (1 + 1/128) and -2^-125 times u - 8 = 1: normal, their sum is not
                bad[0, :2] = torch.tensor([2.0 ** -125 * (1 + 2 ** -7), -(2.0 ** -125)])
                bad[0, 2:] = 0
            else:
                bad[0] = 2.0 ** 64 * torch.sign(bad[0].float())
            with running_on(backend):
                y = fastllm.qmatmul(bad, q)
            with running_on("cpu-avx512"):
                expected = fastllm.qmatmul(bad, q)
            torch.testing.assert_close(y, expected, rtol=0, atol=0, equal_nan=True, msg=f"{name} at M = {m}")
        corrupt = fastllm.QuantizedWeight(q.data, q.scales.clone(), None if q.mins is None else q.mins.clone(),
                                          scheme, group, q.shape)
        corrupt.scales[2, 1] = float("inf")
        if corrupt.mins is not None:
            corrupt.mins[5, 0] = float("-inf")
        x = x.abs()  # one sign: the reference's infinities do not all meet opposite ones
        with running_on(backend):
            y = fastllm.qmatmul(x, corrupt)
        ref = x.double() @ corrupt.dequantize(torch.float64).t()
        assert torch.equal(torch.isfinite(y), torch.isfinite(ref))
        assert torch.isfinite(ref[:, [0, 1, 3, 4, 6, 7, 8]]).all()


@pytest.mark.parametrize("device,backend", device_backends("qmatmul"))
@pytest.mark.parametrize("scheme,group", FORMATS, ids=str)
def test_qmatmul_few_rows_register_tiles(device, backend, scheme, group):
    """M = 2-7 in float mode (the AVX-512 register tiles of 4 weight rows x up to 4 rows of x: M = 5-7 in two
    uneven passes), and 8-10 where 16-lane FMAs pay ("cpu-avx512" forces that; three passes at 9 and 10):
    N = 37 is two 16-row tiles of 4 + 4 + 4 + 4 rows and one of 4 + 1, K = 1152 (36 blocks) runs in K chunks
    of 18-64 blocks, chunk ends splitting a group of 128 at M = 6 and 7."""
    for m in (2, 3, 5, 6, 7, 8, 9, 10):
        for act in ("float", "int8"):
            if _takes(backend, m, act):
                _check(*_case(m, 37, 1152, torch.float32, device, 23 + m, scheme, group, m % 2 == 1), act, backend)


@pytest.mark.parametrize("device,backend", device_backends("qmatmul"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scheme,group", [("int8", None), ("int8", 32), ("int4", 64), ("int4_asym", 32)], ids=str)
def test_qmatmul_many_rows(device, backend, dtype, scheme, group):
    """Prefill-sized M: the float GEMM (from 11 rows) on 8-lane vectors in panels of 16 rows, the last one
    partial (11) or of 8 rows where at most 8 are left (24: 16 + 8, 33: 32 + 1, 70: 64 + 6), on 16-lane ones
    ("cpu-avx512", and "cpu" where cpu_zmm_fma_gain() >= 1.5) in panels of 32 rows, the last one of 16 where at most 16 are left
    (11, 16: one of 16; 24: one of 32; 33: 32 + 1; 70: 64 + 6), micro-tiles of 12 and 24 weight rows;
    the AVX-512 int8 GEMM (from 12 rows) in one-vector panels up to 16 rows (16), two-vector panels of 32
    above, the last one partial. N = 53: a tile of 48 weight rows and one of 5, its micro-tiles padded with
    zero rows; K = 832: 26 blocks, float mode's four K chunks of 7, 7, 7 and 5 blocks, int8 mode's one
    chunk, whose int4_asym groups of one block each add a min term;
    with and without bias."""
    for i, m in enumerate((11, 16, 24, 33, 70)):
        for act in ("float", "int8"):
            if _takes(backend, m, act):
                _check(*_case(m, 53, 832, dtype, device, 13 * i, scheme, group, i % 2 == 0), act, backend)


@pytest.mark.parametrize("device,backend", device_backends("qmatmul"))
@pytest.mark.parametrize("act", ["float", "int8"])
def test_non_finite_activations_give_non_finite_outputs(device, backend, act):
    if not _takes(backend, 3, act):
        pytest.skip(f"{backend} has no act={act!r} kernel")
    q = fastllm.quantize(randn((6, 64), torch.float32, device, seed=1), "int4", 32)
    x = randn((3, 64), torch.float32, device, seed=2)
    x[0, 3], x[2, 40] = float("nan"), float("inf")
    with running_on(backend):
        y = fastllm.qmatmul(x, q, act=act)
    assert torch.isnan(y[0]).all() and not torch.isfinite(y[2]).any() and torch.isfinite(y[1]).all()


@pytest.mark.parametrize("device,backend", device_backends("qmatmul"))
@pytest.mark.parametrize("act", ["float", "int8"])
@pytest.mark.parametrize("scheme,group", [("int8", 32), ("int4", 32), ("int4_asym", 32), ("int4", 64)], ids=str)
def test_non_finite_scale_stays_in_its_row(device, backend, act, scheme, group):
    """A NaN or inf scale (a corrupt weight file) makes its own output channel non-finite and no other:
    K = 192 / 160 ends in a partial 64-byte unit on the AVX-512 path, whose lanes past the row's last
    block must not read the next row's scales, at M = 1 (decode; also with bfloat16 x, whose AVX512_BF16
    kernel ends in half a step there), 2 and 12 (the GEMMs, fp32 and bfloat16)."""
    k = 192 if group == 64 else 160
    for m, dtype in ((1, torch.float32), (2, torch.float32), (12, torch.float32), (1, torch.bfloat16),
                     (12, torch.bfloat16)):
        if not _takes(backend, m, act):
            continue
        x, q, _ = _case(m, 5, k, dtype, device, 7, scheme, group, False)
        q.scales[2] = float("nan")
        q.scales[3, -1] = float("inf")
        with running_on(backend):
            y = fastllm.qmatmul(x, q, act=act)
        assert not torch.isfinite(y[:, 2:4]).any(), (m, y[:, 2:4])
        ok = [0, 1, 4]
        good = fastllm.QuantizedWeight(q.data[ok], q.scales[ok], None if q.mins is None else q.mins[ok], q.scheme,
                                       q.group_size, (3, k))
        with running_on(backend):
            torch.testing.assert_close(y[:, ok], fastllm.qmatmul(x, good, act=act))


@pytest.mark.parametrize("device,backend", device_backends("qmatmul"))
def test_qmatmul_strides_batch_dims_and_empty(device, backend):
    q = fastllm.quantize(randn((11, 96), torch.float32, device, seed=1), "int4_asym", 32)
    b = randn((11,), torch.float32, device, seed=2)
    big = randn((6, 200), torch.float32, device, seed=3)
    _check(big[1:5, 50:146], q, b, "float", backend)  # row stride 200
    act = "int8" if _takes(backend, 5, "int8") else "float"
    _check(randn((96, 5), torch.float32, device, seed=4).t(), q, b, act, backend)  # column-major: copied
    _check(randn((2, 3, 96), torch.bfloat16, device, seed=5), q, None, "float", backend)
    _check(randn((3, 96), torch.float32, device, seed=6), q, randn((22,), torch.float32, device, seed=7)[::2], "float",
           backend)  # a sliced bias: the kernels read a dense copy
    _check(randn((3, 96), torch.float32, device, seed=8), q, randn((1,), torch.float32, device, seed=9).expand(11),
           "float", backend)  # an expanded bias (stride 0)
    x = torch.empty(0, 96, device=device, requires_grad=True)
    with running_on(backend):
        y = fastllm.qmatmul(x, q, b)
    y.sum().backward()
    assert y.shape == (0, 11) and x.grad.shape == (0, 96)


@pytest.mark.parametrize("device,backend", device_backends("qmatmul"))
@pytest.mark.parametrize("act", ["float", "int8"])
def test_qmatmul_gradients(device, backend, act):
    """dx = dy @ dequantize(W) (straight through the int8 rounding), dbias = sum dy."""
    if not _takes(backend, 8, act):
        pytest.skip(f"{backend} has no act={act!r} kernel")
    q = fastllm.quantize(randn((13, 64), torch.float32, device, seed=1), "int4", 32)
    x = randn((2, 4, 64), torch.float32, device, seed=2).requires_grad_()
    b = randn((13,), torch.float32, device, seed=3).requires_grad_()
    dy = randn((2, 4, 13), torch.float32, device, seed=4)
    with running_on(backend):
        fastllm.qmatmul(x, q, b, act=act).backward(dy)
    x64, b64 = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    F.linear(x64, q.dequantize(torch.float64), b64).backward(dy.double())
    x32, b32 = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    F.linear(x32, q.dequantize(), b32).backward(dy)
    assert_close("dx", x.grad, x32.grad, x64.grad)
    assert_close("dbias", b.grad, b32.grad, b64.grad)


def test_qmatmul_bad_input():
    q = fastllm.quantize(torch.randn(8, 64), "int4", 32)
    x = torch.randn(3, 64)
    with pytest.raises(TypeError, match="x"):
        fastllm.qmatmul(torch.ones(3, 64, dtype=torch.int32), q)
    with pytest.raises(ValueError, match="x"):
        fastllm.qmatmul(torch.randn(3, 96), q)
    with pytest.raises(ValueError, match="x"):
        fastllm.qmatmul(torch.tensor(1.0), q)
    with pytest.raises(TypeError, match="qweight"):
        fastllm.qmatmul(x, torch.randn(8, 64))
    with pytest.raises(ValueError, match="qweight"):
        fastllm.qmatmul(torch.randn(3, 64, device="meta"), q)
    with pytest.raises(ValueError, match="bias"):
        fastllm.qmatmul(x, q, torch.randn(9))
    with pytest.raises(TypeError, match="bias"):
        fastllm.qmatmul(x, q, torch.randn(8, dtype=torch.float16))
    with pytest.raises(ValueError, match="act"):
        fastllm.qmatmul(x, q, act="int4")
    q.scales = q.scales[:, :1].contiguous()  # corrupted after construction: caught before the kernel
    with pytest.raises(ValueError, match="scales"):
        fastllm.qmatmul(x, q)


def test_extension_checks_its_arguments():
    ext = _backend.extension()
    q = fastllm.quantize(torch.randn(8, 64), "int4", 32)
    x, y = torch.randn(2, 64), torch.empty(2, 8)

    def call(k=64, group=32, fmt=2, mins=0, data=q.data.data_ptr()):
        ext.cpu_qmatmul(x.data_ptr(), 64, data, q.scales.data_ptr(), mins, 0, y.data_ptr(), 8, 2, 8, k, group, fmt,
                        False, False, 0)

    call()
    for kwargs, msg in [({"k": 48}, "k must"), ({"group": 48}, "group"), ({"fmt": 7}, "qformat"),
                        ({"mins": q.scales.data_ptr()}, "mins"), ({"data": 0}, "null"), ({"fmt": 0}, "group")]:
        with pytest.raises(ValueError, match=msg):
            call(**kwargs)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scheme,group", FORMATS, ids=str)
def test_cuda_gemv_every_row_count_and_k_tile(dtype, scheme, group):
    """M = 1..8 (the four register-tile sizes 1, 2, 4, 8 and the zero rows staged for 3, 5, 6, 7),
    K = 2176 (17 groups of 128; two tiles of 32 chunks and one of 4), N = 37 and 16 (partial and
    exact blocks of 16 channels)."""
    for m in range(1, CUDA_GEMV_MAX_M + 1):
        for n in (37, 16):
            _check(*_case(m, n, 2176, dtype, "cuda", m + n, scheme, group, m % 2 == 1),
                   "float", "cuda")


@needs_cuda
def test_cuda_dispatch_limits():
    """On CUDA: M <= 8 runs the GEMV (when built), more rows the Triton GEMM, act="int8" the reference; the
    dispatch log says why a faster backend was passed over."""
    q = fastllm.quantize(randn((8, 64), torch.float32, "cuda", seed=1), "int4", 32)
    gemv = "cuda" if _backend.why_not("cuda", torch.device("cuda")) is None else "triton"
    for m, act, backend, reason in [(1, "float", gemv, None), (CUDA_GEMV_MAX_M + 1, "float", "triton", "M = 9"),
                                    (1, "int8", "torch", "act")]:
        fastllm.qmatmul(randn((m, 64), torch.float16, "cuda", seed=2), q, act=act)
        log = fastllm.dispatch_log()["qmatmul"]
        assert log["backend"] == backend, (m, act, log)
        assert reason is None or gemv != "cuda" or reason in log["skipped"]["cuda"], log


@pytest.mark.skipif(not getattr(_backend.extension(), "has_cuda", False), reason="fastllm._C built without CUDA")
def test_cuda_extension_checks_its_arguments():
    """The CUDA entry point's checks run before anything touches a device (no GPU needed)."""
    ext = _backend.extension()
    assert ext.cuda_qmatmul_max_m == CUDA_GEMV_MAX_M

    def call(m=2, k=64, group=32, fmt=2, mins=0, data=4096, dt=1):
        ext.cuda_qmatmul(4096, 64, data, 4096, mins, 0, 4096, 8, m, 8, k, group, fmt, dt, 0)

    for kwargs, msg in [({"k": 48}, "k must"), ({"group": 48}, "group"), ({"fmt": 7}, "qformat"),
                        ({"mins": 4096}, "mins"), ({"data": 0}, "null"), ({"fmt": 0}, "group"),
                        ({"m": 9}, "m must be <= 8"), ({"data": 4104}, "16-byte aligned"), ({"dt": 5}, "dtype code")]:
        with pytest.raises(ValueError, match=msg):
            call(**kwargs)


@pytest.mark.parametrize("scheme,group", [("int8", None), ("int4_asym", 32)], ids=str)
def test_qmatmul_opcheck(scheme, group):
    q = fastllm.quantize(torch.randn(9, 64), scheme, group)
    x = torch.randn(2, 3, 64, requires_grad=True)
    b = torch.randn(9, requires_grad=True)
    for act in ("float", "int8"):
        torch.library.opcheck(torch.ops.fastllm.qmatmul.default,
                              (x, q.data, q.scales, q.mins, b, q.scheme, q.group_size or 0, act))


def test_qmatmul_compiles_without_graph_breaks():
    q = fastllm.quantize(torch.randn(16, 64), "int4", 32)
    b = torch.randn(16)

    def f(x):
        return torch.relu(fastllm.qmatmul(x, q, b)) * 2

    x = torch.randn(3, 64, requires_grad=True)
    eager = f(x)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager)
    compiled.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
