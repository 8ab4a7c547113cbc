"""Backend reporting, dispatch decisions, forcing, and the fallback when fastllm._C is missing."""
import os
import subprocess
import sys

import pytest
import torch

import fastllm
from fastllm import _backend
from helpers import _BACKENDS, running_on


def test_backends_report_every_backend_with_reasons():
    info = fastllm.backends()
    assert set(info) == {"cuda", "triton", "cpu", "torch"}
    for name, entry in info.items():
        assert isinstance(entry["available"], bool)
        assert entry["available"] or entry["reason"], f"{name} is unavailable without a reason"
    assert info["torch"]["available"]
    if os.environ.get("FASTLLM_STRICT") == "1":
        assert info["cpu"]["available"], info["cpu"]["reason"]
        assert info["cpu"]["simd"] in ("avx512+vnni+bf16", "avx512+vnni", "avx2+fma", "scalar")


def test_dispatch_log_records_choice_and_reasons():
    fastllm.softmax(torch.randn(2, 3))
    entry = fastllm.dispatch_log()["softmax"]
    expected = "cpu" if _backend.extension() is not None else "torch"
    assert entry["backend"] == expected
    fastllm.rms_norm(torch.randn(2, 3, dtype=torch.float64), (3,))
    entry = fastllm.dispatch_log()["rms_norm"]
    assert entry["backend"] == "torch" and "float64" in entry["skipped"]["cpu"]


def test_use_backend_forcing():
    with fastllm.use_backend("torch"):
        fastllm.layer_norm(torch.randn(2, 3), (3,))
    assert fastllm.dispatch_log()["layer_norm"]["backend"] == "torch"
    with pytest.raises(ValueError, match="cuda"):
        with fastllm.use_backend("cuda"):
            fastllm.layer_norm(torch.randn(2, 3), (3,))
    with pytest.raises(ValueError, match="triton"):
        with fastllm.use_backend("triton"):
            fastllm.layer_norm(torch.randn(2, 3), (3,))  # no Triton layer norm
    with pytest.raises(ValueError, match="name"):
        with fastllm.use_backend("tpu"):
            pass


_BLOCK_EXTENSION = "import sys; sys.modules['fastllm._C'] = None\n"


def _python(code, **env):
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)


def test_missing_extension_warns_once_and_falls_back():
    code = _BLOCK_EXTENSION + (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import fastllm, fastllm.ops\n"
        "    y = fastllm.rms_norm(torch.ones(2, 4), (4,))\n"
        "print(len([x for x in w if 'fastllm._C' in str(x.message)]))\n"
        "print(fastllm.dispatch_log()['rms_norm']['backend'])\n"
        "print(fastllm.backends()['cpu']['available'])\n")
    res = _python(code, FASTLLM_STRICT="0")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["1", "torch", "False"]


def test_strict_mode_refuses_fallback():
    res = _python(_BLOCK_EXTENSION + "import fastllm\n", FASTLLM_STRICT="1")
    assert res.returncode != 0 and "FASTLLM_STRICT" in res.stderr


def test_c_extension_checks_its_arguments():
    ext = _backend.extension()
    if ext is None:
        pytest.skip("fastllm._C is not built here")
    x = torch.randn(4, 8)
    y = torch.empty_like(x)
    with pytest.raises(ValueError, match="dtype"):
        ext.cpu_softmax_fwd(x.data_ptr(), 8, y.data_ptr(), 8, 4, 8, 7)
    with pytest.raises(ValueError, match="x"):
        ext.cpu_softmax_fwd(0, 8, y.data_ptr(), 8, 4, 8, 0)
    with pytest.raises(ValueError, match="stride"):
        ext.cpu_rms_norm_fwd(x.data_ptr(), 4, 0, y.data_ptr(), 8, 0, 4, 8, 1e-6, 0)
    with pytest.raises(ValueError, match="cols"):
        ext.cpu_layer_norm_fwd(x.data_ptr(), 8, 0, 0, y.data_ptr(), 8, 0, 0, 4, 0, 1e-5, 0)


def test_huge_page_advice_for_large_cpu_outputs():
    ext = _backend.extension()
    if ext is None:
        pytest.skip("fastllm._C is not built here")
    small = torch.empty(1024)
    assert not ext.advise_huge_pages(small.data_ptr(), small.numel() * 4)
    assert not ext.advise_huge_pages(0, 1 << 30)
    big = torch.empty(8 << 20)  # 32 MiB: at least one aligned 2 MiB page inside whatever the alignment
    thp = os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled")
    assert ext.advise_huge_pages(big.data_ptr(), big.numel() * 4) == thp


def test_call_op_enters_the_implementation_only_when_nothing_changes():
    """ops._common.call_op skips the torch.library dispatcher only in plain eager calls: never for tensors
    autograd follows, meta/fake tensors (the fake implementation must run) or under torch.compile."""
    from fastllm.ops._common import _plain_eager

    x = torch.randn(3, 4)
    assert _plain_eager((x, 1.0, None))
    assert not _plain_eager((x.requires_grad_(),))
    with torch.no_grad():
        assert _plain_eager((x,))
        assert _plain_eager((torch.nn.Parameter(torch.randn(2)),))  # a module's weight, autograd off
    assert not _plain_eager((torch.nn.Parameter(torch.randn(2)),))  # autograd on: it must see the weight
    assert not _plain_eager((torch.empty(3, device="meta"),))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        assert not _plain_eager((mode.from_tensor(torch.randn(2)),))
    y = fastllm.rms_norm(torch.randn(2, 8, device="meta"), (8,))  # the fake implementation answers
    assert y.shape == (2, 8) and y.is_meta
    from torch.fx.experimental.proxy_tensor import make_fx

    graph = make_fx(lambda a: fastllm.rms_norm(a, (8,)))(torch.randn(4, 8))  # a dispatch mode: the op is traced
    assert any("fastllm" in str(n.target) for n in graph.graph.nodes), graph.graph


def test_call_op_bumps_the_versions_of_what_a_mutating_op_writes():
    """kv_cache_append (which writes the cache in place) may skip the dispatcher too: the cache's version counter
    still moves, so autograd would notice a tensor it saved being overwritten."""
    k, v = torch.zeros(1, 4, 1, 8), torch.zeros(1, 4, 1, 8)
    before = k._version, v._version
    fastllm.kv_cache_append(k, v, torch.ones(1, 1, 1, 8), torch.ones(1, 1, 1, 8), torch.zeros(1, dtype=torch.int32))
    assert k._version > before[0] and v._version > before[1]
    assert k[0, 0].eq(1).all() and k[0, 1:].eq(0).all()


def _op_calls():
    """Each public op on small CPU inputs: name -> (inputs, function of them); every float tensor the op reads is
    an input (the lengths and block tables are int32 constants)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    lens = torch.tensor([5, 16], dtype=torch.int32)
    table = torch.tensor([[3, 0], [1, 2]], dtype=torch.int32)  # 2 sequences over 4 blocks of 8
    qw = fastllm.quantize(r(12, 64), scheme="int4", group_size=32)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)  # packed sequences of 4 and 5
    targets = torch.tensor([3, 0, 39, -100, 7, 7])
    return {
        "softmax": ((r(3, 5, 7),), lambda x: fastllm.softmax(x, dim=1)),
        "softmax last dim": ((r(4, 9),), fastllm.softmax),
        "layer_norm": ((r(3, 4, 6), r(4, 6), r(4, 6)), lambda x, w, b: fastllm.layer_norm(x, (4, 6), w, b)),
        "rms_norm": ((r(5, 6), r(6)), lambda x, w: fastllm.rms_norm(x, (6,), w)),
        "add_rms_norm": ((r(5, 6), r(5, 6), r(6)), lambda x, res, w: torch.cat(fastllm.add_rms_norm(x, res, w))),
        "silu_mul": ((r(4, 9), r(4, 9)), fastllm.silu_mul),
        "attention": ((r(2, 4, 5, 8), r(2, 2, 7, 8), r(2, 2, 7, 8)),
                      lambda q, k, v: fastllm.attention(q, k, v, is_causal=True, enable_gqa=True)),
        "attention return_lse": ((r(2, 4, 5, 8), r(2, 2, 7, 8), r(2, 2, 7, 8)),
                                 lambda q, k, v: torch.cat([t.flatten() for t in fastllm.attention(
                                     q, k, v, enable_gqa=True, return_lse=True)])),
        "attention_varlen": ((r(9, 4, 8), r(9, 2, 8), r(9, 2, 8)),
                             lambda q, k, v: fastllm.attention_varlen(q, k, v, cu, cu, 5, 5, is_causal=True)),
        "linear_cross_entropy": ((r(6, 16), r(40, 16)), lambda h, w: fastllm.linear_cross_entropy(h, w, targets)),
        "qmatmul": ((r(3, 64), r(12)), lambda x, b: fastllm.qmatmul(x, qw, b)),
        "decode_attention": ((r(2, 1, 4, 8), r(2, 16, 2, 8), r(2, 16, 2, 8)),
                             lambda q, kc, vc: fastllm.decode_attention(q, kc, vc, lens)),
        "decode_attention paged": ((r(2, 1, 4, 8), r(4, 8, 2, 8), r(4, 8, 2, 8)),
                                   lambda q, kc, vc: fastllm.decode_attention(q, kc, vc, lens, block_table=table)),
    }


@pytest.mark.parametrize("op", list(_op_calls()))
def test_the_direct_path_gives_the_dispatchers_results(op):
    """Without autograd the ops skip the dispatcher (call_op) and the norms their statistics: the results are
    bitwise those of the custom op under autograd, and a `with torch.device(...)` block around the call (a torch
    function mode that changes where factory functions allocate) does not move CPU results elsewhere."""
    inputs, fn = _op_calls()[op]
    with torch.no_grad():
        direct = fn(*inputs)
    through_dispatcher = fn(*(t.clone().requires_grad_() for t in inputs))
    torch.testing.assert_close(direct, through_dispatcher.detach(), rtol=0, atol=0)
    with torch.no_grad(), torch.device("meta"):
        elsewhere = fn(*inputs)
    assert elsewhere.device.type == "cpu"
    torch.testing.assert_close(direct, elsewhere, rtol=0, atol=0)


def _layouts(t: torch.Tensor):
    """Views holding t's values (or, for the broadcasts, values made from them) in other memory layouts, with NaN
    in the memory between their elements: rows padded, the last dim strided, transposed memory (of the first and
    last dims, or the first and second-to-last), stride-0 dims."""
    def padded(step: int) -> torch.Tensor:
        big = torch.full((*t.shape[:-1], t.shape[-1] * step + 3), float("nan"))
        big[..., :t.shape[-1] * step:step] = t
        return big[..., :t.shape[-1] * step:step]

    yield "rows padded", padded(1)
    yield "last dim strided", padded(2)
    if t.dim() >= 2:
        yield "transposed memory", t.transpose(0, -1).contiguous().transpose(0, -1)
        yield "first dim broadcast", t[:1].expand(t.shape)
    if t.dim() >= 3:
        yield "leading dims transposed", t.transpose(0, -2).contiguous().transpose(0, -2)
    yield "last dim broadcast", t[..., :1].expand(t.shape)


def _op_backends():
    """(op of _op_calls, backend) for every CPU backend of the op (helpers._BACKENDS)."""
    return [pytest.param(op, backend, id=f"{op}-{backend}") for op in _op_calls()
            for backend in _BACKENDS[op.split(" ")[0].replace("add_", "")]["cpu"]]


@pytest.mark.parametrize("op,backend", _op_backends())
def test_every_layout_of_every_input_gives_the_dense_result(op, backend):
    """Each float input in turn in each of _layouts: the result equals the op's on dense copies of the same values
    (a kernel that read a view as dense, or a copy freed before the kernel read it, would differ or read NaN).
    A layout the backend does not take runs another one when not forced (equal to float32 rounding), and is
    refused when forced (that layout is then not compared)."""
    inputs, fn = _op_calls()[op]
    with torch.no_grad(), running_on(backend):
        for i, t in enumerate(inputs):
            for name, view in _layouts(t):
                args = list(inputs)
                args[i] = view
                try:
                    got = fn(*args)
                except ValueError as e:  # (only for a last dim that is not dense)
                    assert "was forced" in str(e) and view.stride(-1) != 1, (i, name, e)
                    continue
                args[i] = view.contiguous()
                torch.testing.assert_close(got, fn(*args), msg=lambda m: f"input {i}, {name}: {m}")


def _graph_nodes(t: torch.Tensor):
    """The names of the autograd nodes t's gradient passes through."""
    seen, names, todo = set(), [], [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            names.append(node.name())
            todo.extend(n for n, _ in node.next_functions)
    return names


@pytest.mark.parametrize("op", [op for op in _op_calls() if not op.startswith("decode")])  # (no backward)
def test_the_eager_autograd_path_gives_the_dispatchers_gradients(op, monkeypatch):
    """With inputs that require grad, eager calls run an autograd.Function around the implementation and the op's
    registered backward (call_op's "autograd" path): the outputs and every input's gradient are bitwise those of
    the custom op through the torch.library dispatcher."""
    from fastllm.ops import _common

    inputs, fn = _op_calls()[op]

    def run():
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = fn(*leaves)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
        return out, [leaf.grad for leaf in leaves]

    out, grads = run()
    assert any(name.startswith("Eager_") for name in _graph_nodes(out)), _graph_nodes(out)
    monkeypatch.setattr(_common, "_eager_path", lambda args: None)  # every call through the dispatcher
    out_d, grads_d = run()
    assert not any(name.startswith("Eager_") for name in _graph_nodes(out_d))
    torch.testing.assert_close(out, out_d, rtol=0, atol=0)
    for i, (g, g_d) in enumerate(zip(grads, grads_d)):
        torch.testing.assert_close(g, g_d, rtol=0, atol=0, msg=lambda m: f"grad of input {i}: {m}")


@pytest.mark.parametrize("op", [op for op in _op_calls() if not op.startswith("decode")])
def test_batched_gradients_and_inference_mode_with_grad_enabled(op):
    """autograd.grad(..., is_grads_batched=True) runs the backward under torch's legacy vmap, whose batched tensors
    (of plain type) only the dispatcher's batching rules can take: each row of the batched gradient equals the
    gradient of that row alone. Inside inference_mode, enable_grad records nothing (the dispatcher skips
    autograd there): the output is an inference tensor that does not require grad."""
    inputs, fn = _op_calls()[op]
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    cotangents = torch.randn((2, *out.shape), generator=torch.Generator().manual_seed(2))
    batched = torch.autograd.grad(out, leaves, cotangents, is_grads_batched=True, retain_graph=True)
    for row in range(2):
        single = torch.autograd.grad(out, leaves, cotangents[row], retain_graph=True)
        for i, (b, s) in enumerate(zip(batched, single)):
            torch.testing.assert_close(b[row], s, msg=lambda m: f"input {i}, row {row}: {m}")
    with torch.inference_mode(), torch.enable_grad():
        out = fn(*leaves)
    assert out.is_inference() and not out.requires_grad


def test_no_direct_path_under_forward_ad_or_for_empty_limits():
    """Inside forward_ad.dual_level() tensors may carry tangents: the dispatcher must see the op. And an empty
    limits dict refuses nothing."""
    import torch.autograd.forward_ad as fwAD
    from fastllm._dispatch import select
    from fastllm.ops._common import _plain_eager

    x = torch.randn(3, 4)
    with torch.no_grad():
        assert _plain_eager((x,))
        with fwAD.dual_level():
            assert not _plain_eager((x,))
    expected = "cpu" if _backend.extension() is not None else "torch"
    assert select("rms_norm", x, limits={}) == select("rms_norm", x) == expected
    assert select("rms_norm", x, limits={"cpu": "a reason"}) == "torch"


@pytest.mark.skipif(_backend.extension() is None, reason="fastllm._C is not built")
def test_simd_caps_from_the_environment():
    """FASTLLM_DISABLE_AVX2 / _AVX512 / _AVX512_BF16 cap the CPU kernels' SIMD level at load time (0 scalar,
    1 avx2, 2 avx512, 3 avx512 with bfloat16 dot products), never above what the CPU has."""
    ext = _backend.extension()
    has = 3 if ext.cpu_has_avx512_bf16() else 2 if ext.cpu_has_avx512_vnni() else 1 if ext.cpu_has_avx2_fma() else 0
    for var, cap in (("FASTLLM_DISABLE_AVX2", 0), ("FASTLLM_DISABLE_AVX512", 1), ("FASTLLM_DISABLE_AVX512_BF16", 2),
                     (None, 3)):
        env = {k: v for k, v in os.environ.items() if not k.startswith("FASTLLM_DISABLE_")}
        if var:
            env[var] = "1"
        out = subprocess.run([sys.executable, "-c", "from fastllm import _backend; "
                              "print(_backend.extension().cpu_simd_level())"], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert int(out.stdout.split()[-1]) == min(cap, has), (var, out.stdout)


@pytest.mark.skipif(_backend.extension() is None, reason="fastllm._C is not built")
def test_zmm_float_gemm_switch():
    """qmatmul's float GEMM runs on 16-lane FMAs by default where they give at least 1.5x the 8-lane ones' lanes
    a second (measured once: about 2 on Intel Xeons, about 1 on Zen 4; 0 without AVX-512);
    set_cpu_zmm_float_gemm forces it on (1) or off (0) and returns the mode it replaced, -1 restores the default;
    FASTLLM_ZMM_FLOAT_GEMM=0 / 1 fixes it at load time."""
    ext = _backend.extension()
    if os.environ.get("FASTLLM_ZMM_FLOAT_GEMM"):
        pytest.skip("FASTLLM_ZMM_FLOAT_GEMM fixes the choice in this process")
    gain = ext.cpu_zmm_fma_gain()
    if ext.cpu_has_avx512_vnni():
        assert 0.5 < gain < 3.0, gain
    else:
        assert gain == 0.0
    assert ext.cpu_zmm_fma_gain() == gain  # (measured once)
    assert ext.cpu_zmm_float_gemm() == (gain >= 1.5)
    try:
        assert ext.set_cpu_zmm_float_gemm(1) == -1
        assert ext.cpu_zmm_float_gemm()
        assert ext.set_cpu_zmm_float_gemm(0) == 1
        assert not ext.cpu_zmm_float_gemm()
    finally:
        last = ext.set_cpu_zmm_float_gemm(-1)
    assert last == 0
    assert ext.cpu_zmm_float_gemm() == (gain >= 1.5)
    for value, forced in (("0", False), ("1", True)):  # FASTLLM_ZMM_FLOAT_GEMM fixes the choice at load time
        env = {**os.environ, "FASTLLM_ZMM_FLOAT_GEMM": value}
        code = "from fastllm import _backend; print(_backend.extension().cpu_zmm_float_gemm())"
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[-1] == str(forced), (value, out.stdout)
