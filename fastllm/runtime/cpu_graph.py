"""The decode step replayed from a CPU graph: the step's C++ kernel calls recorded once, replayed per token.

On the CPU a decode step of a small model is a few hundred short kernel calls (SmolLM2-135M: 30 layers of norms,
four quantised projections, kv_cache_append, decode_attention and silu_mul each), and the Python that issues them
(argument checks, dispatch, views, output allocation) costs as much as the kernels. fastllm._C.CpuGraph records
each call with its argument values, pointers included, and replays them in order from C++ with the GIL released:
the CPU counterpart of cuda_graph.py.

What is recorded: the blocks, model.decode_hidden(h, cache, after), on static inputs: h (B, 1, dim) the embedded
tokens and `after` (B,) the lengths after the step, which each replay refills; the embedding lookup, the lengths
and the output head (often a float nn.Linear, a torch op) stay in Python. Every fastllm._C call the CPU backend makes goes through record_cpu_<op> (fastllm/ops/_common.run_c). A
replay equals a fresh step because the kernels read every value (h, lengths, cache, weights) through the recorded
pointers when they run, and a Llama decode step's calls and shapes depend on no value, only on the batch, which a
graph fixes. What recording enforces (a TorchFunctionMode; a step that breaks a rule is not recorded and runs
eagerly):
  - no torch op computes, since a replay would not run it: every torch call must return views of its inputs or
    non-tensors; in-place ops, out= arguments and value reads (.item(), bool(t), ...) are refused, and so are
    fastllm's own ops when they go through the torch dispatcher (their insides are out of the mode's sight): eager
    calls skip it (fastllm/ops/_common.call_op), so their insides are in sight;
  - tensors created while recording (the kernels' outputs, by torch.empty and its kin) are kept by the graph, so the
    recorded pointers stay valid; all else they point to belongs to the model and the cache, which the graph holds.
A model whose blocks need torch ops (float nn.Linear weights, GPT-2's GELU) is refused at its first such op and
decodes eagerly; so is dynamic ("NTK") rotary scaling, which rebuilds its tables on the host every step.

Checked on use, as cuda_graph.py does: the first step runs eagerly (it also builds the fused q/k/v and gate/up
weights, which the graph then holds), the next one is recorded (its kernels run as they are recorded), and the
one after runs both eagerly and replayed; the graph is kept only if the two agree bit for bit, otherwise a
warning says so and decoding goes on eagerly. Once a model's graph has passed that check for a kind of cache
(static or paged, of a dtype), later steppers of the same model and cache kind (each generate() call, each batch size in
the server) record at their first step and replay from the second, unchecked: their calls are the same code
path at another batch size. A first-step recording that is refused (a weight cache still to be built) falls
back to the checked sequence. FASTLLM_CPU_GRAPHS=0 switches CPU graphs off.
"""
from __future__ import annotations

import contextlib
import os
import warnings
import weakref

import torch
from torch.overrides import TorchFunctionMode

from .. import _backend
from ..nn.quant_linear import fused_modules
from ..ops import _common

_ALLOCATORS = {"empty", "empty_like", "empty_strided", "new_empty"}
_VALUE_READS = {"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "__complex__",
                "__array__"}
_RETURN_SELF = {"to", "contiguous", "type_as", "float", "double", "half", "bfloat16", "cpu", "reshape", "view_as",
                "expand_as", "detach"}  # return their input itself when there is nothing to change
_IN_PLACE_DUNDERS = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__",
                     "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__"}


_T = torch.Tensor
_METADATA = frozenset([getattr(_T, n).__get__ for n in ("shape", "dtype", "device", "ndim", "is_cuda", "is_cpu",
                                                       "layout", "requires_grad", "is_leaf", "itemsize", "nbytes")]
                      + [getattr(_T, n) for n in ("dim", "data_ptr", "stride", "size", "numel", "element_size",
                                                  "is_floating_point", "is_complex", "is_contiguous",
                                                  "storage_offset", "get_device")])
"""Calls that only read metadata (most of a recorded step's torch calls): let through unexamined."""


class RecordingRefused(RuntimeError):
    """A torch op in the recorded step computes (or reads a value), so a replay would not reproduce it."""


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


class _NoCompute(TorchFunctionMode):
    """Lets through the torch calls a replay does not need to repeat (views, metadata, allocations, which are kept
    in `kept`) and raises RecordingRefused on any other."""

    def __init__(self):
        super().__init__()
        self.kept: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA:
            return func(*args, **kwargs)
        name = getattr(func, "__name__", None) or repr(func)
        if name in _ALLOCATORS:
            out = func(*args, **kwargs)
            self.kept.append(out)
            return out
        in_place = name in _IN_PLACE_DUNDERS or (name.endswith("_") and not name.startswith("__"))
        if in_place or name in _VALUE_READS or kwargs.get("out") is not None or kwargs.get("inplace"):
            raise RecordingRefused(f"torch.{name} writes or reads tensor values")
        out = func(*args, **kwargs)
        outs = list(_tensors(out))
        if not outs:  # metadata (sizes, strides, pointers): most calls, let through without looking at the inputs
            return out
        inputs = list(_tensors((args, kwargs)))
        storages = {t.untyped_storage().data_ptr() for t in inputs}
        for t in outs:
            if t.untyped_storage().data_ptr() not in storages:
                raise RecordingRefused(f"torch.{name} computes a new tensor")
            if name not in _RETURN_SELF and any(t is i for i in inputs):  # e.g. F.relu(x, True): computed in place
                raise RecordingRefused(f"torch.{name} returned its input, written in place")
        return out


@contextlib.contextmanager
def recording(graph):
    """Within this block, the fastllm._C CPU calls are recorded into graph (fastllm._C.CpuGraph) as they run, and
    any torch op that computes raises RecordingRefused. Yields the list of the tensors allocated meanwhile, which
    the recorded calls may point to: keep it as long as the graph."""
    if _common.recording_graph() is not None:
        raise RuntimeError("this thread is recording into a CPU graph already")
    mode = _NoCompute()
    _common.recording_into(graph)
    try:
        with mode:
            yield mode.kept
    finally:
        _common.recording_into(None)


def cpu_graphs_enabled(model) -> str | None:
    """None when model.decode may be recorded into a CPU graph, else the reason it is not."""
    if model.tok_embeddings.weight.device.type != "cpu":
        return "CPU graphs are for CPU models"
    if _backend.extension() is None:
        return "fastllm._C is not available"
    if os.environ.get("FASTLLM_CPU_GRAPHS", "1").strip() in ("0", "false", "off", "no"):
        return "switched off by FASTLLM_CPU_GRAPHS=0"
    if model.rotary is not None and model.cfg.rope_type == "dynamic":
        return "dynamic rotary scaling recomputes its tables on the host every step"
    if getattr(model, "tensor_parallel", None) is not None:
        return "tensor-parallel decode all-reduces through torch.distributed"
    return None


_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""model -> the kinds of cache (_kind) whose recorded decode step of it has passed the check (see the module
docstring)."""


def _kind(cache) -> tuple:
    """A cache's layout and dtype (an int8 cache's step records other calls than a float one's)."""
    return type(cache), cache.k.dtype


class CpuGraphStep:
    """step(tokens (B,)) -> logits (B, vocab), as model.decode(tokens, cache); the blocks replayed from a CPU graph
    from the fourth call on, when recording and the check succeed, or from the second when this model's graph
    passed the check before with this kind of cache (see the module docstring). `reason`: why the step runs
    eagerly (None while it may still be, or is, replayed)."""

    def __init__(self, model, cache):
        self.model, self.cache = model, cache
        self.calls, self.reason, self.checked = 0, None, False
        self.graph = self.kept = self.h = self.after = self.hidden = None
        self.trusted = _kind(cache) in _CHECKED.get(model, ())  # record at once, skip the check

    @torch.no_grad()  # (a replay rewrites its outputs in place: none may be saved for a backward)
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.reason is not None or (self.calls == 1 and not self.trusted):
            return self.model.decode(tokens, self.cache)
        if self.graph is None:
            logits = self._record(tokens)
            self.checked = self.graph is not None and self.trusted
            return logits
        if not self.checked:
            return self._checked(tokens)
        return self._replay(tokens)

    def _inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        cache.check_room(1)
        return self.model.embed(tokens[:, None], cache.lengths[:, None].long())     # (B, 1, dim)

    def _advance(self) -> None:
        self.cache.lengths.copy_(self.after)
        self.cache.longest += 1

    def _record(self, tokens: torch.Tensor) -> torch.Tensor:
        self.h = self._inputs(tokens)
        self.after = self.cache.lengths + 1                                           # (B,) int32
        graph = _backend.extension().CpuGraph()
        try:
            with recording(graph) as kept:
                hidden = self.model.decode_hidden(self.h, self.cache, self.after)   # (B, 1, dim)
        except RecordingRefused as e:  # a step torch ops take part in: it ran up to here, run it whole again
            if self.calls == 1:  # a first-step recording (trusted): maybe a lazily built weight, try as usual
                self.trusted = False
            else:
                self.reason = f"the decode step cannot be recorded: {e}"
            return self.model.decode(tokens, self.cache)
        self.graph, self.kept, self.hidden = graph, kept + fused_modules(self.model), hidden
        self._advance()
        return self.model.lm_head(hidden)[:, 0]

    def _replay(self, tokens: torch.Tensor) -> torch.Tensor:
        self.h.copy_(self._inputs(tokens))
        torch.add(self.cache.lengths, 1, out=self.after)
        self.graph.replay()
        self._advance()
        return self.model.lm_head(self.hidden)[:, 0]

    def _checked(self, tokens: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        lengths, longest = cache.lengths.clone(), cache.longest
        expected = self.model.decode(tokens, cache)
        cache.lengths.copy_(lengths)
        cache.longest = longest
        got = self._replay(tokens)  # rewrites the step's cache slots with the same values
        if torch.equal(got, expected):
            self.checked = True
            _CHECKED.setdefault(self.model, set()).add(_kind(cache))
            return got
        self.reason = "the replayed decode step differed from the eager one"
        warnings.warn(f"fastllm: {self.reason}; decoding eagerly")
        self.graph = self.kept = None
        cache.lengths.copy_(lengths)  # write the eager step's cache slots again
        cache.longest = longest
        return self.model.decode(tokens, cache)
