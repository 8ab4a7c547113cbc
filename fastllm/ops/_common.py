"""Shared by the public ops: argument checks that name the argument, 2-D row views for the
kernels, and the calls into fastllm._C (CPU directly; CUDA on the tensor's device and stream)."""
from __future__ import annotations

import functools
import math
import threading
from typing import Sequence

import torch
import torch.autograd.forward_ad as _forward_ad

from .. import _backend


# ---- argument checks ---------------------------------------------------------------------------
def check_tensor(name: str, t, *, floating: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def check_same_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; they must be on the same device")


def check_like(name: str, t, ref_name: str, ref: torch.Tensor) -> None:
    """t must be a floating tensor of ref's shape, dtype and device (the second input of an elementwise op)."""
    check_tensor(name, t)
    check_same_device(name, t, ref_name, ref)
    if t.shape != ref.shape:
        raise ValueError(f"{name} must have {ref_name}'s shape {tuple(ref.shape)}, got {tuple(t.shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have {ref_name}'s dtype {ref.dtype}, got {t.dtype}")


def check_normalized_shape(normalized_shape, x: torch.Tensor) -> list[int]:
    """normalized_shape as a list of ints; x's trailing dimensions must equal it."""
    if isinstance(normalized_shape, (int, torch.SymInt)):
        ns = [normalized_shape]
    elif isinstance(normalized_shape, (tuple, list)) or (
            isinstance(normalized_shape, Sequence) and not isinstance(normalized_shape, (str, bytes))):
        ns = list(normalized_shape)
    else:
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}")
    for d in ns:
        if not isinstance(d, int):
            raise TypeError(f"normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}")
    if not ns:
        raise ValueError("normalized_shape must name at least one dimension")
    if min(ns) < 0:
        raise ValueError(f"normalized_shape must not contain negative sizes, got {tuple(ns)}")
    if len(ns) > x.dim() or x.shape[x.dim() - len(ns):] != tuple(ns):
        raise ValueError(f"normalized_shape {tuple(ns)} does not match the trailing dimensions of input of shape "
                         f"{tuple(x.shape)}")
    return [int(d) for d in ns]


def check_param(name: str, t, x: torch.Tensor, shape: Sequence[int]) -> None:
    """An optional per-feature parameter (weight, bias): a float tensor on x's device with `shape`."""
    if t is None:
        return
    check_tensor(name, t)
    check_same_device(name, t, "input", x)
    if list(t.shape) != list(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (normalized_shape), got {tuple(t.shape)}")


# ---- layouts -----------------------------------------------------------------------------------
def dense(t: torch.Tensor | None) -> torch.Tensor | None:
    """t, or a contiguous copy of it when it is not (a sliced or expanded parameter): the kernels read parameters
    through their data pointer alone. A copy must be held in a variable until the kernel returns."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def as_rows(t: torch.Tensor, k: int = 1) -> torch.Tensor:
    """(rows, cols) view of t, cols = prod of the last k dims, with inner stride 1 and a row stride
    >= cols; copies only when the strides do not allow such a view (e.g. a transposed or broadcast
    input). Empty tensors keep their row and column counts. A contiguous 2-D t with k = 1 is returned
    as it is (the common case: no view to build)."""
    if k == 1 and t.dim() == 2 and t.is_contiguous():
        return t
    rows, cols = math.prod(t.shape[:t.dim() - k]), math.prod(t.shape[t.dim() - k:])
    try:
        v = t.view(rows, cols)
    except RuntimeError:
        return t.contiguous().view(rows, cols)
    if (cols > 1 and v.stride(1) != 1) or (rows > 1 and v.stride(0) < cols):
        return t.contiguous().view(rows, cols)
    return v


HUGE_PAGE_MIN_BYTES = 8 << 20
"""CPU outputs at least this large get transparent huge pages (see new_output)."""


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty for a kernel's output. On CPU, large outputs are advised onto transparent huge
    pages before the kernel writes them: a fresh 64 MiB tensor otherwise takes 16384 page faults,
    which cost more than the kernel itself."""
    return _advised(torch.empty(*shape, dtype=dtype, device=device))  # (unpacked: a tuple or Size parses slower)


def new_output_like(t: torch.Tensor) -> torch.Tensor:
    """A contiguous kernel output of t's shape, dtype and device (new_output's huge pages included): its rows
    view has row stride = the row length."""
    return _advised(torch.empty_like(t, memory_format=torch.contiguous_format))


def _advised(out: torch.Tensor) -> torch.Tensor:
    if out.is_cpu and out.nbytes >= HUGE_PAGE_MIN_BYTES:
        ext = _backend.extension()
        if ext is not None:
            ext.advise_huge_pages(out.data_ptr(), out.nbytes)
    return out


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the saved per-row statistics (mean, rstd)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def numel_of(shape: Sequence[int]) -> int:
    return math.prod(shape)


# ---- calls into fastllm._C ---------------------------------------------------------------------
def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def code(t: torch.Tensor) -> int:
    return _backend.DTYPE_CODES[t.dtype]


_recording = threading.local()  # .graph: the fastllm._C.CpuGraph this thread records into (recording_into)


def recording_graph():
    """The fastllm._C.CpuGraph this thread records into, or None."""
    return getattr(_recording, "graph", None)


def recording_into(graph) -> None:
    """From now on this thread's CPU kernel calls are also recorded into graph (a fastllm._C.CpuGraph), or no
    longer with None: see fastllm/runtime/cpu_graph.py."""
    _recording.graph = graph


@functools.lru_cache(maxsize=None)
def _c_function(name: str):
    return getattr(_backend.extension(), name)


def run_c(backend: str, name: str, device: torch.device, *args):
    """Call fastllm._C.<backend>_<name>(*args); CUDA calls get the current stream of `device`
    appended and run with that device current. A CPU call is also recorded while recording_into a graph."""
    if backend == "cpu":
        graph = getattr(_recording, "graph", None)
        if graph is not None:
            return _c_function("record_cpu_" + name)(graph, *args)
        return _c_function("cpu_" + name)(*args)
    with torch.cuda.device(device):
        return _c_function("cuda_" + name)(*args, torch.cuda.current_stream(device).cuda_stream)


def cuda_workspace(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """Scratch memory for the weight-gradient partial sums of the CUDA norm backward kernels."""
    n = _backend.extension().cuda_norm_bwd_workspace_floats(rows, cols)
    return torch.empty(max(n, 1), dtype=torch.float32, device=device)


MAX_GRID_YZ = 65535
"""Programs a CUDA launch grid holds in its second and third dimensions (the first: 2^31 - 1)."""


def grid_limit(**dims: int) -> str | None:
    """Why a kernel whose grid's second and third dimensions are `dims` (name=size) cannot be launched, or None."""
    for name, n in dims.items():
        if n > MAX_GRID_YZ:
            return f"{name} = {n} exceeds the {MAX_GRID_YZ} programs of a CUDA grid's second and third dimensions"
    return None


def kernels():
    """The fastllm.kernels package (Triton); only called once the dispatcher chose "triton"."""
    return _backend._triton_status()[0]


# ---- calling the custom ops --------------------------------------------------------------------
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _legacy_vmap_bits() -> int:
    """The dispatch-key bits that torch's legacy vmap (torch._vmap_internals, which autograd.grad(...,
    is_grads_batched=True) and jacobian(vectorize=True) run backwards under) adds to the thread's included keys;
    0 where this torch cannot say."""
    try:
        before = torch._C._dispatch_tls_local_include_set().raw_repr()
        torch._C._vmapmode_increment_nesting()
        try:
            return torch._C._dispatch_tls_local_include_set().raw_repr() & ~before
        finally:
            torch._C._vmapmode_decrement_nesting()
    except AttributeError:
        return 0


_LEGACY_VMAP = _legacy_vmap_bits()


def _eager_path(args) -> str | None:
    """How an eager call may skip the torch.library dispatcher, which changes nothing for it: "direct" (no tensor
    autograd must follow: enter the implementation), "autograd" (some do: a plain autograd.Function around the
    implementation and the op's registered backward, as the dispatcher's own autograd kernel does), or None
    (the op must run as ever: traced or compiled, a functorch transform or torch's legacy vmap, a dispatch mode,
    forward-mode AD, or a fake, meta or other subclass tensor, which only the registered fake implementations may
    see; nn.Parameter, a module's weight, is plain)."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return None
    if torch._C._len_torch_dispatch_stack() > 0:  # make_fx, FlopCounterMode, fake modes...: they must see the op
        return None
    if _forward_ad._current_level >= 0:  # inside forward_ad.dual_level(): tensors may carry tangents
        return None
    if _LEGACY_VMAP and torch._C._dispatch_tls_local_include_set().raw_repr() & _LEGACY_VMAP:
        return None  # batched tensors (of plain type) that only the dispatcher's batching rules can take
    grad = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()  # (inference mode skips autograd)
    path = "direct"
    for a in args:
        if isinstance(a, torch.Tensor):
            if type(a) not in _PLAIN or a.is_meta:
                return None
            if grad and a.requires_grad:
                path = "autograd"
    return path


def _plain_eager(args) -> bool:
    """Whether the implementation may be entered directly (_eager_path)."""
    return _eager_path(args) == "direct"


_functions: dict = {}


def _autograd_function(op):
    """A torch.autograd.Function whose forward is op's implementation (then its registered setup_context) and
    whose backward is op's registered backward: what the dispatcher's autograd kernel for op runs, minus the
    dispatch (about 15 us a call)."""
    fn = _functions.get(op)
    if fn is None:
        impl, setup, backward = op._init_fn, op._setup_context_fn, op._backward_fn

        def forward(ctx, *args):
            out = impl(*args)
            setup(ctx, args, out)
            return out

        fn = _functions[op] = type(f"Eager_{op._namespace}_{op._name}", (torch.autograd.Function,),
                                   {"forward": staticmethod(forward), "backward": staticmethod(backward)})
    return fn


def call_op(op, *args, mutated: tuple[int, ...] = (), direct=None):
    """op(*args) for a fastllm custom op, without the torch.library dispatcher where it would change nothing
    (_eager_path): that saves some 15 us a call, which a decode step of a small model pays hundreds of times.
    Without autograd the implementation is entered directly; with tensors autograd follows, through
    _autograd_function (ops that write nothing in place and have a registered backward). Under torch.compile,
    dispatch modes, fake tensors or functorch, the custom op runs as ever. For ops with one implementation for
    every device (no register_kernel). mutated: the positions of the arguments the op writes in place (its
    mutates_args): on the direct path their version counters are bumped here, as the dispatcher would (autograd
    then sees the writes). direct: what runs in place of the implementation on the direct path, where nothing
    will differentiate the result: the same arguments and results, except that outputs kept only for the
    backward (a norm's statistics) may be None."""
    impl = getattr(op, "_init_fn", None)
    path = _eager_path(args) if impl is not None else None
    if path == "direct":
        out = (direct or impl)(*args)
        written = [args[i] for i in mutated if args[i] is not None]
        if written:
            torch.autograd.graph.increment_version(written)
        return out
    if path == "autograd" and not mutated and getattr(op, "_backward_fn", None) is not None:
        return _autograd_function(op).apply(*args)
    return op(*args)
