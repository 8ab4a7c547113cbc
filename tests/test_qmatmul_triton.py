"""The Triton quantised GEMM (kernels/qmatmul.py) on its own: every format and group size, float32 / float16 /
bfloat16 activations, M in every tile bucket (1, 9, 17, 33, 65), odd N, K with a partial last BLOCK_K step, bias,
strided x, forced K splits, the split and tile heuristics, and an ahead-of-time compile for sm_90 (H100).
Against dequantise-then-matmul in float64 with the tolerance rule (tests/helpers.py); on CPU it runs under the
Triton interpreter (fastllm.use_backend("triton"))."""
import sys

import pytest
import torch

import fastllm
from fastllm.reference import qmatmul_fwd
from helpers import DEVICES, DTYPES, assert_close, compile_check, randn, running_on
from test_qmatmul import _case, _check, _torch_peer

FORMATS = [("int8", None), ("int8", 32), ("int8", 64), ("int8", 128), ("int4", 32), ("int4", 64), ("int4", 128),
           ("int4_asym", 32), ("int4_asym", 64), ("int4_asym", 128)]
SHAPES = [(1, 7, 128), (9, 37, 384), (17, 19, 160), (33, 5, 256), (65, 3, 640)]
"""(M, N, K): M in each tile bucket of pick_config (<= 16, <= 32, <= 64, larger; 1 and 9 share the first), odd N,
K = 160 and 640 end in a partial BLOCK_K step (160 is skipped by groups 64 and 128)."""


def _device(device):
    if device == "cpu":
        pytest.importorskip("triton")
    return device


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scheme,group", FORMATS, ids=str)
def test_every_format_and_tile_bucket(device, dtype, scheme, group):
    for i, (m, n, k) in enumerate(SHAPES):
        if k % (group or 32):
            continue
        _check(*_case(m, n, k, dtype, _device(device), 11 * i + (group or 0), scheme, group, i % 2 == 0), "float",
               "triton")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("scheme,group", [("int8", None), ("int4", 32), ("int4_asym", 64)], ids=str)
def test_forced_k_splits(device, splits, scheme, group):
    """K = 320 in BLOCK_K = 64 steps split 2 (3 + 2 steps) or 3 ways (2 + 2 + 1); x strided, bias or not, bf16
    output rounded by the split-sum kernel."""
    from fastllm.kernels import qmatmul as kq

    for with_bias, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        x, q, b = _case(9, 21, 320, dtype, _device(device), splits, scheme, group, with_bias)
        x = torch.cat([x, x], dim=1)[:, 160:480]  # row stride 640
        y = torch.empty(9, 21, dtype=dtype, device=device)
        kq.qmatmul(x, q.data, q.scales, q.mins, b, q.format.code, q.format.group(320), y,
                   config=kq.QConfig(16, 16, 64, 4, 2), splits=splits)
        ref = qmatmul_fwd(x.double(), q.data, q.scales, q.mins, None if b is None else b.double(), q.format)
        assert_close(f"{scheme}/{group} splits={splits}", y, _torch_peer(x, q, b, "float"), ref)


def test_split_and_tile_heuristics(monkeypatch):
    """On an H100 (132 SMs): split K only while the output tiles leave SMs idle, keeping >= 4 steps per split
    and the fp32 partials' traffic within the packed weight's bytes; tiles by M bucket, shrunk to N and K."""
    from fastllm.kernels import qmatmul as kq

    monkeypatch.setattr(kq, "sm_count", lambda device: 132)
    cpu = torch.device("cpu")
    assert kq.num_splits_for(64, 16, 4096, 4096, 128, 4, cpu) == 5      # 264 programs wanted
    assert kq.num_splits_for(64, 16, 4096, 1024, 128, 4, cpu) == 2      # 8 steps of 128: 4 per split
    assert kq.num_splits_for(32, 128, 4096, 4096, 64, 4, cpu) == 2      # partials' bytes bound it
    assert kq.num_splits_for(448, 16, 28672, 8192, 128, 4, cpu) == 1    # the tiles fill the GPU
    assert kq.pick_config(1, 4096, 4096, torch.bfloat16) == kq.CONFIGS[(16, False)]
    assert kq.pick_config(33, 4096, 4096, torch.float16) == kq.CONFIGS[(64, False)]
    assert kq.pick_config(500, 4096, 4096, torch.float32) == kq.CONFIGS[(None, True)]
    assert kq.pick_config(17, 5, 32, torch.bfloat16) == kq.QConfig(32, 16, 32, 4, 4)


def test_triton_backend_limits():
    """The Triton GEMM has the float activation mode only: forcing it for act="int8" names the reason."""
    pytest.importorskip("triton")
    q = fastllm.quantize(randn((8, 64), torch.float32, "cpu", seed=1), "int4", 32)
    with running_on("triton"), pytest.raises(ValueError, match="act='int8'"):
        fastllm.qmatmul(randn((2, 64), torch.float32, "cpu", seed=2), q, act="int8")


def test_kernels_compile_for_h100():
    """The GEMM with the tiles of every M bucket (bf16, every format kind), fp16 with K splits and fp32 compiles for
    sm_90, fits its 227 KiB of shared memory, and fp16/bf16 tiles do not spill registers (no GPU needed)."""
    compile_check(__file__)


def _compile_all():
    from fastllm.kernels import qmatmul as kq
    from fastllm.kernels._common import DOT_IEEE32, DOT_NATIVE
    from helpers import compile_sm90, sm90_resources

    fmts = [(kq.I8_CHANNEL, "*i8", "*fp32"), (kq.I8_GROUP, "*i8", "*fp16"), (kq.I4, "*u8", "*fp16"),
            (kq.I4_ASYM, "*u8", "*fp16")]
    cases = [("bf16", bucket, fmt, False) for bucket in (16, 32, 64, None) for fmt in fmts]
    cases += [("fp16", 16, fmts[3], True), ("fp32", 16, fmts[2], False), ("fp32", None, fmts[0], True)]
    for name, bucket, (code, wt, st), split in cases:
        cfg = kq.CONFIGS[(bucket, name == "fp32")]
        ptrs = dict(X="*" + name, W=wt, S=st, MINS="*fp16", B="*" + name, Y="*" + name, P="*fp32")
        consts = dict(FMT=code, HAS_BIAS=True, SPLIT=split, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                      BLOCK_K=cfg.block_k, DOT=DOT_IEEE32 if name == "fp32" else DOT_NATIVE, EXACT_BF16=False)
        r = sm90_resources(compile_sm90(kq._qmm_kernel, ptrs, consts, cfg.num_warps, cfg.num_stages))
        print(name, "M bucket", bucket, "format", code, "split" if split else "", cfg, r)
        assert r["shared"] <= 227 * 1024, "too much shared memory"
        assert name == "fp32" or r["stack"] == 0, "fp16/bf16 tile spills registers"
    r = sm90_resources(compile_sm90(kq._split_sum_kernel, dict(P="*fp32", B="*bf16", Y="*bf16"),
                                    dict(HAS_BIAS=True, BLOCK=kq.SUM_BLOCK, EXACT_BF16=False), 4, 1))
    print("split sum", r)


if __name__ == "__main__" and sys.argv[1:] == ["compile-check"]:
    _compile_all()
