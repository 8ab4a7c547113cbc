"""The decode step replayed from a CPU graph (fastllm/runtime/cpu_graph.py): replayed logits equal eager ones bit
for bit, steps that need torch ops are refused and decode eagerly, and the recording rules hold."""

import pytest
import torch
import torch.nn.functional as F

import fastllm
from fastllm import _backend
from fastllm.loading.safetensors import load_hf_dir
from fastllm.nn.quant_linear import fused_modules
from fastllm.runtime import cpu_graph
from fastllm.runtime.graphs import decode_stepper
from tiny_models import tiny_gpt2, tiny_llama

PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]


def _model(path, quantize="int4", act="float", **cfg):
    tiny_llama(path, **cfg)
    model, _ = load_hf_dir(str(path), "cpu", torch.float32)
    if quantize is not None:
        fastllm.quantize_model(model, scheme=quantize, group_size=32, act=act)
    return model


def _prefilled(model):
    """A one-row cache holding the first prompt."""
    cache = model.new_cache(1, 16)
    model.prefill(PROMPTS[:1], cache)
    return cache


def _decode_both(model, steps=8, batch=3):
    """Logits of `steps` decode steps: eager, and through decode_stepper (CPU graph), from the same prompts."""
    toks = torch.randint(3, model.cfg.vocab_size, (steps, batch), generator=torch.Generator().manual_seed(0))
    out = []
    with torch.inference_mode():
        for graphed in (False, True):
            cache = model.new_cache(batch, 32)
            model.prefill(PROMPTS[:batch], cache)
            step = decode_stepper(model, cache) if graphed else (lambda t, c=cache: model.decode(t, c))
            out.append(([step(t).clone() for t in toks], cache))
    return out, step


@pytest.mark.parametrize("quantize,act", [("int4", "float"), ("int4_asym", "int8"), ("int8", "float")])
@pytest.mark.parametrize("batch", [1, 3])
def test_replay_equals_eager(tmp_path, quantize, act, batch):
    model = _model(tmp_path, quantize, act)
    ((eager, ec), (graphed, gc)), step = _decode_both(model, batch=batch)
    assert step.reason is None and step.graph is not None and len(step.graph) > 0
    fused = fused_modules(model)  # the fused q/k/v and gate/up weights the recorded calls read
    assert len(fused) == 2 * model.cfg.n_layers and all(any(f is k for k in step.kept) for f in fused)
    for i, (e, g) in enumerate(zip(eager, graphed)):
        assert torch.equal(e, g), f"step {i}"
    assert torch.equal(ec.lengths, gc.lengths) and ec.longest == gc.longest
    assert torch.equal(ec.k, gc.k) and torch.equal(ec.v, gc.v)


def test_a_checked_model_records_at_the_first_step(tmp_path):
    """Once a model's graph passed the check, a new stepper of it (another generate() call, another batch size)
    records at its first step and replays from the second, with the same logits as eager decoding; a cache of
    another kind, or another model, starts with the checked sequence again."""
    model = _model(tmp_path)
    _, first = _decode_both(model, steps=4, batch=1)
    assert first.checked and not first.trusted
    ((eager, _), (graphed, _)), step = _decode_both(model, steps=5, batch=3)
    assert step.trusted and step.checked and step.reason is None
    for i, (e, g) in enumerate(zip(eager, graphed)):
        assert torch.equal(e, g), f"step {i}"
    with torch.inference_mode():
        class Other(type(_prefilled(model))):  # another kind of cache
            pass
        cache = _prefilled(model)
        cache.__class__ = Other
        assert not cpu_graph.CpuGraphStep(model, cache).trusted
        assert not cpu_graph.CpuGraphStep(model, model.new_cache(1, 16, dtype=torch.int8)).trusted
        assert not cpu_graph.CpuGraphStep(_model(tmp_path / "other"), _prefilled(model)).trusted


def test_replay_equals_eager_with_an_int8_cache(tmp_path):
    """An int8 KV cache (LLM.load(kv_cache="int8")): the recorded step passes the scales to kv_cache_append and
    decode_attention, and replays bit for bit."""
    model = _model(tmp_path)
    model.kv_cache_dtype = torch.int8
    ((eager, ec), (graphed, gc)), step = _decode_both(model, batch=3)
    assert step.reason is None and step.checked and ec.k.dtype == torch.int8
    for i, (e, g) in enumerate(zip(eager, graphed)):
        assert torch.equal(e, g), f"step {i}"
    assert torch.equal(ec.k, gc.k) and torch.equal(ec.k_scale, gc.k_scale) and torch.equal(ec.v_scale, gc.v_scale)


def test_a_refused_first_step_recording_falls_back_to_the_checked_sequence(tmp_path, monkeypatch):
    """A trusted stepper whose first-step recording is refused (a torch op computing, as a lazily built weight
    cache would) decodes that step eagerly, then records and checks as an untrusted one does."""
    model = _model(tmp_path)
    _decode_both(model, steps=4, batch=1)  # the model's graph passes the check
    real, calls = model.decode_hidden, []

    def lazy(*args):  # the first call computes a torch op
        calls.append(1)
        if len(calls) == 1:
            torch.ones(2) + 1
        return real(*args)

    monkeypatch.setattr(model, "decode_hidden", lazy)
    toks = torch.tensor([[20], [21], [22], [23]])
    with torch.inference_mode():
        cache, eager_cache = _prefilled(model), _prefilled(model)
        step = cpu_graph.CpuGraphStep(model, cache)
        assert step.trusted
        got = [step(t).clone() for t in toks]  # refused and eager, recorded, checked, replayed
        expected = [model.decode(t, eager_cache) for t in toks]
    assert step.reason is None and not step.trusted and step.checked and step.graph is not None
    for e, g in zip(expected, got):
        assert torch.equal(e, g)


@pytest.mark.parametrize("kind", ["float-llama", "gpt2"])
def test_steps_with_torch_ops_decode_eagerly(tmp_path, kind):
    """Float nn.Linear weights and GPT-2's GELU are torch ops: recording is refused, the step runs eagerly."""
    if kind == "gpt2":
        tiny_gpt2(tmp_path)
        model, _ = load_hf_dir(str(tmp_path), "cpu", torch.float32)
    else:
        model = _model(tmp_path, quantize=None)
    ((eager, _), (graphed, _)), step = _decode_both(model, steps=4)
    assert step.graph is None and "cannot be recorded: torch." in step.reason
    for e, g in zip(eager, graphed):
        assert torch.equal(e, g)


def test_generation_is_the_same_with_and_without_graphs(tmp_path, monkeypatch):
    model = _model(tmp_path)
    llm = fastllm.LLM(model, None, model.cfg)
    with_graphs = llm.generate_ids(PROMPTS, max_new_tokens=12)
    monkeypatch.setenv("FASTLLM_CPU_GRAPHS", "0")
    assert cpu_graph.cpu_graphs_enabled(model) == "switched off by FASTLLM_CPU_GRAPHS=0"
    assert llm.generate_ids(PROMPTS, max_new_tokens=12) == with_graphs


def test_a_replay_that_disagrees_falls_back_to_eager(tmp_path):
    model = _model(tmp_path)

    class Stale:  # a graph whose replay does nothing: the logits stay those of the recorded step
        def replay(self):
            pass

    toks = torch.tensor([[20], [21], [22], [23]])
    with torch.inference_mode():
        eager_cache, cache = _prefilled(model), _prefilled(model)
        step = cpu_graph.CpuGraphStep(model, cache)
        step(toks[0])
        step(toks[1])
        step.graph = Stale()
        with pytest.warns(UserWarning, match="differed from the eager one"):
            got = step(toks[2])
        got_next = step(toks[3]).clone()
        expected = [model.decode(t, eager_cache) for t in toks]
    assert step.reason and step.graph is None
    assert torch.equal(got, expected[2]) and torch.equal(got_next, expected[3])
    assert torch.equal(cache.lengths, eager_cache.lengths) and torch.equal(cache.k, eager_cache.k)


def test_recording_reads_values_at_replay():
    """A recorded call reads its inputs when replayed, writes the same outputs, and the graph keeps them alive."""
    ext = _backend.extension()
    g, u = torch.randn(3, 40), torch.randn(3, 40)
    graph = ext.CpuGraph()
    with torch.inference_mode(), cpu_graph.recording(graph) as kept:
        y = fastllm.silu_mul(g, u)
    assert len(graph) == 1 and any(t.data_ptr() == y.data_ptr() for t in kept)
    torch.testing.assert_close(y, F.silu(g) * u)
    g.mul_(-2.0)
    graph.replay()
    torch.testing.assert_close(y, F.silu(g) * u)
    fastllm.silu_mul(g, u)  # outside the block nothing is recorded
    assert len(graph) == 1 and graph.names == ["silu_mul"]
    g.neg_()
    times = graph.replay_timed()  # where a step's time goes: one wall time per call
    assert len(times) == 1 and times[0] >= 0
    torch.testing.assert_close(y, F.silu(g) * u)


def test_recording_refuses_ops_through_the_dispatcher():
    """A fastllm op called through the torch dispatcher runs insides the recording cannot see: refused. The public
    functions skip the dispatcher in eager calls, with autograd too (call_op): their kernel calls are recorded."""
    g = torch.randn(3, 40)
    with pytest.raises(cpu_graph.RecordingRefused, match="silu_mul"):
        with cpu_graph.recording(_backend.extension().CpuGraph()):
            torch.ops.fastllm.silu_mul(g, g)
    graph = _backend.extension().CpuGraph()
    g.requires_grad_()
    with cpu_graph.recording(graph):
        y = fastllm.silu_mul(g, g)
    assert graph.names == ["silu_mul"] and y.requires_grad


@pytest.mark.parametrize("op", ["compute", "in_place", "out", "item", "bool", "inplace_kwarg", "inplace_arg"])
def test_recording_refuses_torch_compute_and_value_reads(op):
    x = torch.randn(4, 8)
    bad = {"compute": lambda: x + 1, "in_place": lambda: x.add_(1), "out": lambda: torch.add(x, 1, out=x),
           "item": lambda: x[0, 0].item(), "bool": lambda: bool(x[0, 0] > 0),
           "inplace_kwarg": lambda: F.relu(x, inplace=True), "inplace_arg": lambda: F.relu(x, True)}[op]
    before = x.clone()
    with pytest.raises(cpu_graph.RecordingRefused):
        with cpu_graph.recording(_backend.extension().CpuGraph()):
            bad()
    if op != "inplace_arg":  # (found out only from what relu returned: x itself, written)
        assert torch.equal(x, before)


def test_recordings_do_not_nest():
    ext = _backend.extension()
    with cpu_graph.recording(ext.CpuGraph()):
        with pytest.raises(RuntimeError, match="recording into a CPU graph already"):
            with cpu_graph.recording(ext.CpuGraph()):
                pass


def test_a_late_recording_is_still_checked(tmp_path, monkeypatch):
    """A step that failed while recording (an error, not a refusal) is recorded on a later call, and that
    graph is checked against an eager step before it is trusted, whatever the call count."""
    model = _model(tmp_path)
    real, calls = model.decode_hidden, []

    def flaky(*args):  # the second call (the first recording) fails once
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("one-off")
        return real(*args)

    monkeypatch.setattr(model, "decode_hidden", flaky)
    toks = torch.tensor([[20], [21], [22], [23], [24]])
    with torch.inference_mode():
        cache, eager_cache = _prefilled(model), _prefilled(model)
        step = cpu_graph.CpuGraphStep(model, cache)
        step(toks[0])
        with pytest.raises(RuntimeError, match="one-off"):
            step(toks[1])
        expected = [model.decode(t, eager_cache) for t in toks[[0, 2, 3, 4]]]
        got = [step(t) for t in toks[2:]]  # recorded, then checked, then replayed
    assert step.graph is not None and step.checked
    for e, g in zip(expected[1:], got):
        assert torch.equal(e, g)


def test_recording_allows_views_and_allocations():
    x = torch.randn(4, 8)
    with cpu_graph.recording(_backend.extension().CpuGraph()) as kept:
        a, b = x.split([3, 5], -1)
        v = x.view(2, 16)[:, 1:].unflatten(-1, (3, 5))
        e = torch.empty(5)
        n = x.shape[0] + x.stride(0) + x.numel() + x.dim()
    assert a.data_ptr() == x.data_ptr() and v.shape == (2, 3, 5) and n == 4 + 8 + 32 + 2
    assert len(kept) == 1 and kept[0] is e


def test_a_call_that_fails_is_not_recorded():
    """A recorded call ran its argument checks when it was recorded; one that fails raises and is left out."""
    ext = _backend.extension()
    graph = ext.CpuGraph()
    x, y = torch.randn(2, 8), torch.empty(2, 8)
    ext.record_cpu_softmax_fwd(graph, x.data_ptr(), 8, y.data_ptr(), 8, 2, 8, 0)
    ext.record_cpu_softmax_fwd(graph, x.data_ptr(), 8, y.data_ptr(), 8, 2, 8, 0)
    assert len(graph) == 2
    bad = ext.CpuGraph()
    with pytest.raises(ValueError, match="dtype code"):
        ext.record_cpu_softmax_fwd(bad, x.data_ptr(), 8, y.data_ptr(), 8, 2, 8, 7)
    assert len(bad) == 0  # a call that failed is not recorded
    graph.replay()
    torch.testing.assert_close(y, torch.softmax(x, -1))
