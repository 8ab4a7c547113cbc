"""fastllm.quant: quantisation error within each format's bound, the packed layout, GGUF Q8_0 /
Q4_0 / Q4_1 blocks against the `gguf` package's own quantise/dequantise, save/load, and the
validation of corrupt packed tensors."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GT
from gguf import quants as gq

import fastllm
from fastllm.quant import Format, QuantizedWeight, from_gguf, to_gguf
from fastllm.quant.formats import pack_int4, unpack_int4
from helpers import randn

FORMATS = [("int8", None), ("int8", 32), ("int8", 128), ("int4", 32), ("int4", 64), ("int4", 128),
           ("int4_asym", 32), ("int4_asym", 64), ("int4_asym", 128)]
GGUF = [("Q8_0", "int8"), ("Q4_0", "int4"), ("Q4_1", "int4_asym")]


def weight(n, k, seed):
    """Rows of very different magnitudes, one all-zero group, one constant group, a negative extreme."""
    w = randn((n, k), torch.float32, "cpu", seed=seed) * torch.logspace(-3, 1, n)[:, None]
    w[0, :128] = 0
    w[1, 32:64] = 0.25
    w[2, 5] = -50.0
    return w


def bound(w: torch.Tensor, q: QuantizedWeight) -> torch.Tensor:
    """Per-element error bound of the format (quantize.py's docstring), from float32 group statistics
    recomputed here, plus the effect of storing d (and m) in float16."""
    n, k = w.shape
    g = q.format.group(k)
    wg = w.view(n, k // g, g)
    ds = q.scales.float().view(n, k // g, 1)
    if q.scheme == "int8":
        d = wg.abs().amax(-1, keepdim=True) / 127
        b = d / 2 + 127 * (d - ds).abs()
    elif q.scheme == "int4":
        d = wg.abs().amax(-1, keepdim=True) / 8
        b = d + 8 * (d - ds.abs()).abs()
    else:
        lo = wg.amin(-1, keepdim=True)
        d = (wg.amax(-1, keepdim=True) - lo) / 15
        b = d / 2 + 15 * (d - ds).abs() + (lo - q.mins.float().view(n, k // g, 1)).abs()
    return (b * (1 + 1e-5) + 1e-30).expand_as(wg).reshape(n, k)


@pytest.mark.parametrize("scheme,group", FORMATS, ids=str)
def test_quantize_error_within_bound(scheme, group):
    w = weight(9, 256, seed=group or 1)
    q = fastllm.quantize(w, scheme, group)
    assert q.shape == w.shape and q.scheme == scheme and q.group_size == group
    err = (q.dequantize() - w).abs()
    assert (err <= bound(w, q)).all(), (err - bound(w, q)).max()
    assert torch.equal(q.dequantize()[0, :128], torch.zeros(128))  # a zero group stays exactly zero
    # the bound is tight: most of it is used somewhere, and the typical error is rounding-sized
    assert (err / bound(w, q)).max() > 0.4


def test_default_group_sizes_and_bf16_input():
    w = randn((4, 256), torch.bfloat16, "cpu", seed=3)
    assert fastllm.quantize(w, "int8").group_size is None
    assert fastllm.quantize(w, "int4").group_size == 128
    assert fastllm.quantize(w).scheme == "int4"


def test_int4_packing_layout():
    """Byte i of a 16-byte block: element i in the low nibble, element 16 + i in the high one."""
    u = torch.arange(64, dtype=torch.uint8).remainder(16).view(1, 64).flip(1).contiguous()
    p = pack_int4(u)
    assert p.shape == (1, 32) and p.dtype == torch.uint8
    for b in range(2):
        for i in range(16):
            assert p[0, 16 * b + i] == u[0, 32 * b + i] | (u[0, 32 * b + 16 + i] << 4)
    assert torch.equal(unpack_int4(p), u)


@pytest.mark.parametrize("name,scheme", GGUF, ids=str)
def test_gguf_blocks_against_the_gguf_package(name, scheme):
    """GGUF's quantiser -> our reader -> exact values and bytes back; our quantiser = GGUF's."""
    w = weight(7, 160, seed=5).numpy()
    blocks = gq.quantize(w, GT[name])
    q = from_gguf(blocks, name)
    assert q.scheme == scheme and q.group_size == 32 and tuple(q.shape) == (7, 160)
    np.testing.assert_array_equal(q.dequantize().numpy(), gq.dequantize(blocks, GT[name]))
    back, t = to_gguf(q)
    assert t == GT[name] and back.dtype == np.uint8
    np.testing.assert_array_equal(back, blocks)
    np.testing.assert_array_equal(to_gguf(fastllm.quantize(torch.from_numpy(w), scheme, 32))[0], blocks)


@pytest.mark.parametrize("name,scheme", GGUF, ids=str)
def test_gguf_arbitrary_blocks_read_exactly(name, scheme):
    """Any well-formed block (finite float16 scales, any quant bytes) reads as gguf dequantises it."""
    rng = np.random.default_rng(7)
    n, nb = 5, 4
    nbytes = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[name]
    blocks = rng.integers(0, 256, size=(n, nb, nbytes), dtype=np.uint8)
    nscale = 2 if name == "Q4_1" else 1
    blocks[..., : 2 * nscale] = (rng.standard_normal((n, nb, nscale)) * 0.01).astype(np.float16).view(np.uint8)
    blocks = blocks.reshape(n, -1)
    q = from_gguf(torch.from_numpy(blocks), GT[name])
    np.testing.assert_array_equal(q.dequantize().numpy(), gq.dequantize(blocks, GT[name]))
    np.testing.assert_array_equal(to_gguf(q)[0], blocks)
    x = randn((3, nb * 32), torch.float32, "cpu", seed=1)
    ref = x.double() @ torch.from_numpy(gq.dequantize(blocks, GT[name])).double().t()
    torch.testing.assert_close(fastllm.qmatmul(x, q).double(), ref, rtol=1e-5, atol=1e-5)


def test_gguf_bad_input():
    blocks = gq.quantize(np.ones((2, 64), np.float32), GT.Q4_0)
    with pytest.raises(ValueError, match="qtype"):
        from_gguf(blocks, "Q5_K")
    with pytest.raises(ValueError, match="blocks"):
        from_gguf(blocks[:, :-1], "Q4_0")
    with pytest.raises(ValueError, match="blocks"):
        from_gguf(blocks, "Q4_0", shape=(2, 96))
    with pytest.raises(TypeError, match="blocks"):
        from_gguf(blocks.astype(np.int16), "Q4_0")
    bad = blocks.copy()
    bad[0, :2] = np.array([np.nan], np.float16).view(np.uint8)
    with pytest.raises(ValueError, match="scales"):
        from_gguf(bad, "Q4_0")
    with pytest.raises(ValueError, match="group_size"):
        to_gguf(fastllm.quantize(torch.ones(2, 128), "int4", 128))


@pytest.mark.parametrize("scheme,group", [("int8", None), ("int4", 64), ("int4_asym", 32)], ids=str)
def test_save_and_load_with_safetensors(tmp_path, scheme, group):
    from safetensors.torch import load_file, save_file

    q = fastllm.quantize(weight(6, 128, seed=2), scheme, group)
    save_file(q.to_dict(), tmp_path / "w.safetensors")
    r = QuantizedWeight.from_dict(load_file(tmp_path / "w.safetensors"))
    assert (r.scheme, r.group_size, r.shape) == (q.scheme, q.group_size, q.shape)
    assert torch.equal(r.dequantize(), q.dequantize()) and r.nbytes == q.nbytes


def test_bad_quantize_arguments():
    w = torch.randn(4, 128)
    with pytest.raises(ValueError, match="scheme"):
        fastllm.quantize(w, "int3")
    with pytest.raises(ValueError, match="group_size"):
        fastllm.quantize(w, "int4", 48)
    with pytest.raises(ValueError, match="group_size"):
        Format("int4_asym", None)
    with pytest.raises(ValueError, match=r"weight.shape\[1\]"):
        fastllm.quantize(torch.randn(4, 96), "int4", 64)
    with pytest.raises(ValueError, match=r"weight.shape\[1\]"):
        fastllm.quantize(torch.randn(4, 40), "int8")
    with pytest.raises(TypeError, match="weight"):
        fastllm.quantize(torch.ones(4, 128, dtype=torch.int32))
    with pytest.raises(ValueError, match="weight"):
        fastllm.quantize(torch.randn(2, 4, 32))
    with pytest.raises(ValueError, match="weight"):
        fastllm.quantize(torch.full((2, 32), float("nan")))


def test_corrupt_packed_tensors_are_named():
    q = fastllm.quantize(torch.randn(4, 128), "int4_asym", 64)
    args = dict(data=q.data, scales=q.scales, mins=q.mins, scheme="int4_asym", group_size=64, shape=(4, 128))

    def make(**kw):
        a = {**args, **kw}
        return QuantizedWeight(a["data"], a["scales"], a["mins"], a["scheme"], a["group_size"], a["shape"])

    make()
    with pytest.raises(ValueError, match="data"):
        make(data=q.data[:, :-1].contiguous())
    with pytest.raises(TypeError, match="data"):
        make(data=q.data.view(torch.int8))
    with pytest.raises(TypeError, match="scales"):
        make(scales=q.scales.float())
    with pytest.raises(ValueError, match="scales"):
        make(scales=torch.full_like(q.scales, float("nan")))
    with pytest.raises(ValueError, match="mins"):
        make(mins=q.mins[:3].contiguous())
    with pytest.raises(TypeError, match="mins"):
        make(mins=None)
    with pytest.raises(ValueError, match="shape"):
        make(shape=(4, 0))
    with pytest.raises(ValueError, match="shape"):
        make(shape=(4, 256))
    with pytest.raises(ValueError, match="qformat"):
        QuantizedWeight.from_dict({**q.to_dict(), "qformat": torch.zeros(6, dtype=torch.int32)})
    with pytest.raises(ValueError, match="qdata"):
        QuantizedWeight.from_dict({"scales": q.scales})
