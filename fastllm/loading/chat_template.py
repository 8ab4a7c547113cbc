"""Chat templates (jinja2, from tokenizer_config.json or a GGUF file's tokenizer.chat_template) rendered in a
sandbox with size limits, so that a hostile template refuses with a ValueError instead of hanging or eating the
memory: `{{ 'x' * 10**10 }}`, `{{ 10 ** (10 ** 10) }}`, `{% for i in range(10**9) %}`, a string doubled in a loop.

The environment is transformers' (ImmutableSandboxedEnvironment: no attribute starting with `_`, no mutation of
lists and dicts; trim_blocks + lstrip_blocks, the loopcontrols extension, `raise_exception`, `strftime_now`,
`tojson(ensure_ascii, indent, separators, sort_keys)`) with these bounds, checked before the value is built
where its size is known in advance:
    - every string, list, tuple or dict the template builds has a size (characters as printed, roughly: a
      container counts its items, each item as often as it occurs) of at most MAX_CHARS: the results of `*`
      (repetition), `+`, `%`, `~`, list / tuple / dict literals, and of every filter and method call;
    - the amplifying calls are estimated before they run: `replace`, `join`, `indent`, `wordwrap`, `expandtabs`,
      `translate`; the widths and counts given to `center`, `ljust`, `rjust`, `zfill`, `batch` and `slice` are at
      most MAX_CHARS, and so is every width in a format string (`'%99999999999s'`, `'{:>{w}}'`: the numbers
      written in it, and its arguments when it takes widths from them);
    - integers stay within MAX_INT_BITS bits (`*`, `**` on ints);
    - range() gives at most MAX_RANGE numbers; `lipsum` is not offered;
    - the output (the rendered prompt, and each buffer that collects the output of a macro, a `{% set %}` block
      or a `{% filter %}` block) is at most MAX_CHARS characters; `tojson` stops at it as it writes (and
      takes an indent of at most MAX_INDENT).
    - the values checked add up to at most MAX_BUILT characters per render (what recursion or many variables
      keep alive at once); round's precision, striptags' tags x characters and int results are bounded;
    - the time: compiling (no constant folding: nothing of the template runs then) and rendering stop after
      MAX_SECONDS, checked at every line the template's code runs (its loops, macros, blocks) and at every
      Python call (the per-item loops of filters), so nested loops and recursive macros that output nothing are
      bounded too;
    - bytes are not offered (`encode`, `to_bytes`), nor `sum` of anything but numbers (quadratic for lists);
    - recursion past Python's limit, integer-to-float overflow and running out of memory refuse as the limits do.
A single C-level call (a filter, a method, an operator) is not interrupted by the time limit: those are the ones
with the size checks above; one without an estimate builds its result before it is measured, at most a small
multiple of its arguments' size (`upper`, `escape`, `string`, ...). The values the caller passes (the messages,
the special tokens) are taken as they are.
"""
from __future__ import annotations

import functools
import json
import math
import re
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime

from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.runtime import Namespace
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_CHARS = 1 << 24
"""The largest string, container (as printed) or rendered prompt a template may build: 16M characters, about
4M tokens, longer than any model's context."""
MAX_RANGE = 100_000
"""range() in a template gives at most this many numbers (as jinja2's sandbox)."""
MAX_SECONDS = 5.0
"""The longest a template may take to compile or render (an ordinary chat template takes well under 10 ms)."""
MAX_BUILT = 8 * MAX_CHARS
"""The characters a render may build in all (the sizes of every value checked, added up): bounds the memory that
values kept alive at once (a recursion, many variables) hold, and the time spent building them."""
MAX_ROUND_DIGITS = 1000
"""The largest precision round() takes (Python computes 10 ** precision)."""
MAX_STRIPTAGS_WORK = 10 ** 9
"""striptags' work bound, tags x characters (markupsafe's loop re-slices the string per tag)."""
MAX_INT_BITS = 4096
"""Integers a template computes stay within this many bits (about 1233 decimal digits)."""
MAX_INDENT = 1000
"""The widest indent tojson takes (templates use 2 or 4)."""


def _refuse(what: str) -> ValueError:
    return ValueError(f"the chat template exceeds its sandbox's limits: {what}")


def _size(value, limit: int = MAX_CHARS) -> int:
    """About the characters str(value) has: a str (or bytes) its length, a list / tuple / dict (a dict view, a
    namespace's attributes) 2 + its items' sizes + 2 per item (an item each time it occurs, as printing counts it:
    a shared sublist is measured once, counted at every occurrence); anything else 1. Stops counting once past
    `limit`."""
    memo: dict[int, int] = {}

    def size(v) -> int:
        if isinstance(v, (str, bytes, bytearray)):
            return len(v)
        if isinstance(v, Namespace):   # printed as <Namespace {...}>: its attributes
            v = dict(object.__getattribute__(v, "_Namespace__attrs"))
        elif isinstance(v, (type({}.keys()), type({}.values()), type({}.items()))):
            v = list(v)
        if not isinstance(v, (list, tuple, dict)):
            return 1
        if id(v) not in memo:
            memo[id(v)] = 0  # a container reached again while it is being measured (none in this sandbox)
            total = 2
            for item in (x for kv in v.items() for x in kv) if isinstance(v, dict) else v:
                total += 2 + size(item)
                if total > limit:
                    break
            memo[id(v)] = total
        return memo[id(v)]

    return size(value)


_render = threading.local()
"""The _Deadline of the render (or compile) running in this thread, as `active` (None outside one)."""


def _charge(size: int) -> None:
    """Adds `size` characters to what this thread's render has built (MAX_BUILT)."""
    deadline = getattr(_render, "active", None)
    if deadline is not None:
        deadline.charge(size)


def _checked(value, what: str):
    """value, if its size is within MAX_CHARS (an int within MAX_INT_BITS); an iterator (map, select, batch, ...) is
    measured item by item as it is consumed. Its size counts towards MAX_BUILT."""
    if isinstance(value, Iterator) and not isinstance(value, (str, list, tuple, dict)):
        return _measured(value, what)
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
        raise _refuse(f"{what} makes an integer of more than {MAX_INT_BITS} bits")
    size = _size(value)
    if size > MAX_CHARS:
        raise _refuse(f"{what} makes a value of more than {MAX_CHARS} characters")
    _charge(size)
    return value


def _measured(items: Iterator, what: str):
    total = 0
    for item in items:
        _check_time()
        size = 2 + _size(item)
        total += size
        if total > MAX_CHARS:
            raise _refuse(f"{what} makes items of more than {MAX_CHARS} characters")
        _charge(size)
        yield item


def _check_arguments(args, kwargs, what: str) -> None:
    """Number arguments (widths, counts) of a filter or a str method are at most MAX_CHARS."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, (int, float)) and not isinstance(a, bool) and abs(a) > MAX_CHARS:
            shown = str(a) if len(str(a)) <= 20 else f"a number of {len(str(a))} digits"
            raise _refuse(f"{what} is given {shown}, beyond {MAX_CHARS}")


_PERCENT_FIELD = re.compile(r"%(?:\([^)]{0,256}\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[a-zA-Z%]")
_BRACE_FIELD = re.compile(r"\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\}")


def _check_format(fmt: str, args, kwargs, what: str) -> None:
    """A format string's output ('%99999999s', '{:>99999999}', '{0}' * 1000 applied to a long string) is at most
    MAX_CHARS: its widths and precisions (written in it, or taken from number arguments: '%*s', '{:>{w}}') are at
    most MAX_CHARS, and so is the output's estimate: the format's length plus the arguments' sizes and the widths
    for positional '%' fields (each argument used once), or plus per field the widest width and the largest argument
    where fields can repeat an argument ('%(name)s', '{0}')."""
    widths = [int(n) for m in _PERCENT_FIELD.finditer(fmt) for n in m.groups() if n and n != "*"]
    braces = _BRACE_FIELD.findall(fmt)
    widths += [int(n) for field in braces if ":" in field for n in re.findall(r"\d+", field.split(":", 1)[1])]
    if any(w > MAX_CHARS for w in widths):
        raise _refuse(f"{what}'s format string has a width beyond {MAX_CHARS}")
    if "*" in fmt or any(field.count("{") > 1 for field in braces):
        _check_arguments(args, kwargs, what)
    fields = len(_PERCENT_FIELD.findall(fmt)) + len(braces)
    values = [*args, *(kwargs.values() if isinstance(kwargs, dict) else ())]
    if len(args) == 1 and isinstance(args[0], dict):   # '%(a)s' % {...}
        values += list(args[0].values())
    sizes = [_size(v) for v in values]
    if braces or "%(" in fmt:
        largest = max(sizes + [max(widths, default=0), 0])
        estimate = len(fmt) + fields * largest
    else:
        estimate = len(fmt) + sum(sizes) + sum(widths)
    if estimate > MAX_CHARS:
        raise _refuse(f"{what} would make more than {MAX_CHARS} characters (about {estimate})")


def _replace_size(s, old, new, count=None, *_, **__) -> int:
    s, old, new = str(s), str(old), str(new)
    n = s.count(old) if old else len(s) + 1
    if count is not None and count >= 0:
        n = min(n, count)
    return len(s) + n * len(new)


def _join_size(items, sep) -> int:
    return sum(_size(x) for x in items) + len(str(sep)) * len(items)


def _indent_size(s, width=4, *_, **__) -> int:
    s = str(s)
    return len(s) + (s.count("\n") + 1) * (width if isinstance(width, int) else len(str(width)))


def _wordwrap_size(s, width=79, break_long_words=True, wrapstring=None, *_, **__) -> int:
    s = str(s)
    return len(s) * (1 + len(wrapstring or "\n"))


def _expandtabs_size(s, tabsize=8, *_, **__) -> int:
    return len(s) + s.count("\t") * max(tabsize, 0)


def _translate_size(s, table, *_, **__) -> int:
    values = table.values() if isinstance(table, dict) else table if isinstance(table, (list, tuple)) else ()
    return len(s) * max([1, *(len(v) for v in values if isinstance(v, str))])


FILTER_SIZES = {"replace": _replace_size, "join": lambda value, d="", *_, **__: _join_size(value, d),
                "indent": _indent_size, "wordwrap": _wordwrap_size}
METHOD_SIZES = {"replace": _replace_size, "join": lambda sep, items, *_, **__: _join_size(items, sep),
                "expandtabs": _expandtabs_size, "translate": _translate_size}
"""Size estimates, from the call's arguments (a method's first is its str), of the calls whose result can be far
larger than their arguments."""


WIDTHS = {"center", "ljust", "rjust", "zfill", "batch", "slice"}
"""Filters and str methods whose first argument (width, linecount, slots) is a width or count of their result
(padding, fill items): it is at most MAX_CHARS. Other arguments (batch's fill_with) and other calls take numbers as
values, of any size."""
WIDTH_NAMES = ("width", "linecount", "slots")


def _bounded_filter(name: str, f):
    """The filter f with its arguments and result checked; `join` takes its items as a list (measured first)."""
    skip = 1 if getattr(f, "jinja_pass_arg", None) is not None else 0   # the context / environment f receives

    @functools.wraps(f)
    def run(*args, **kwargs):
        args = list(args)
        if name == "join" and len(args) > skip and not isinstance(args[skip], (list, tuple, str)):
            args[skip] = list(args[skip])
        what = f"the filter {name}"
        if name == "round" and any(isinstance(a, int) and abs(a) > MAX_ROUND_DIGITS
                                   for a in (*args[skip + 1:skip + 2], kwargs.get("precision", 0))):
            raise _refuse(f"the filter round is given a precision beyond {MAX_ROUND_DIGITS}")
        if name == "striptags" and str(args[skip]).count("<") * len(str(args[skip])) > MAX_STRIPTAGS_WORK:
            raise _refuse(f"the filter striptags is given more than {MAX_STRIPTAGS_WORK} tags x characters")
        if name == "sum" and not isinstance(kwargs.get("start", args[skip + 2] if len(args) > skip + 2 else 0),
                                            (int, float)):
            raise _refuse("the filter sum adds numbers only (a list or str start makes it quadratic)")
        if name == "format":
            _check_format(str(args[skip]), args[skip + 1:], kwargs, what)
        elif name in WIDTHS:   # the first argument after the value filtered
            _check_arguments(args[skip + 1:skip + 2], {k: v for k, v in kwargs.items() if k in WIDTH_NAMES}, what)
        if name in FILTER_SIZES and FILTER_SIZES[name](*args[skip:], **kwargs) > MAX_CHARS:
            raise _refuse(f"{what} would make more than {MAX_CHARS} characters")
        return _checked(f(*args, **kwargs), what)

    return run


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """json.dumps as transformers' tojson filter, written piece by piece and stopped at MAX_CHARS. An indent (a
    width or a string) is at most MAX_INDENT characters: json writes it once per level of nesting in one piece."""
    width = indent if isinstance(indent, int) else len(str(indent or ""))
    if width > MAX_INDENT:
        raise _refuse(f"the filter tojson is given an indent of {width} characters, more than {MAX_INDENT}")
    out, n = [], 0
    encoder = json.JSONEncoder(ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    for piece in encoder.iterencode(value):
        n += len(piece)
        if n > MAX_CHARS:
            raise _refuse(f"the filter tojson would write more than {MAX_CHARS} characters")
        out.append(piece)
    return "".join(out)


def _range(*args) -> range:
    r = range(*args)
    if len(r) > MAX_RANGE:
        raise _refuse(f"range{args} has {len(r)} numbers, more than {MAX_RANGE}")
    return r


def _joined(pieces, what: str = "joining the output") -> str:
    """"".join of the strings `pieces`, if their total length is within MAX_CHARS."""
    pieces = [p if isinstance(p, str) else str(p) for p in pieces]
    if sum(map(len, pieces)) > MAX_CHARS:
        raise _refuse(f"{what} makes more than {MAX_CHARS} characters")
    return "".join(pieces)


class _OutputBuffer(list):
    """The output a macro, a `{% set %}` block or a `{% filter %}` block collects, at most MAX_CHARS characters."""
    chars = 0

    def append(self, piece) -> None:
        self.chars += len(piece)
        if self.chars > MAX_CHARS:
            raise _refuse(f"the output of a macro or block reaches more than {MAX_CHARS} characters")
        super().append(piece)

    def extend(self, pieces) -> None:
        for piece in pieces:
            self.append(piece)


class _CodeGenerator(CodeGenerator):
    """jinja2's compiler, with the values the template builds without an operator or a call checked: list, tuple
    and dict literals, `~` concatenation and the buffers of macros and blocks."""

    def _wrapped(self, check: str, visit, node, frame) -> None:
        self.write(f"environment.{check}(")
        visit(node, frame)
        self.write(")")

    def visit_List(self, node, frame) -> None:
        self._wrapped("checked_literal", super().visit_List, node, frame)

    def visit_Dict(self, node, frame) -> None:
        self._wrapped("checked_literal", super().visit_Dict, node, frame)

    def visit_Tuple(self, node, frame) -> None:
        if node.ctx != "load":   # an assignment target: `{% for a, b in ... %}`
            return super().visit_Tuple(node, frame)
        self._wrapped("checked_literal", super().visit_Tuple, node, frame)

    def visit_Concat(self, node, frame) -> None:
        self.write("environment.checked_join((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def _output_child_to_const(self, node, frame, finalize):
        """Only literal text is made a constant while compiling: jinja2 would evaluate `{{ expression }}` there."""
        if not isinstance(node, nodes.TemplateData):
            raise nodes.Impossible()
        return super()._output_child_to_const(node, frame, finalize)

    def buffer(self, frame) -> None:
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.output_buffer()")


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """transformers' chat-template environment with the bounds of this module's docstring."""
    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})
    output_buffer = _OutputBuffer

    def __init__(self):
        # optimized=False: jinja2's optimizer would run constant expressions (filters included) while compiling
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"],
                         optimized=False)
        self.concat = _joined   # the join of a buffer (the generated code reads environment.concat)
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}
        self.filters["tojson"] = _tojson
        self.globals.pop("lipsum", None)
        self.globals.update(range=_range, raise_exception=_raise,
                            strftime_now=lambda fmt: datetime.now().strftime(fmt))

    def is_safe_attribute(self, obj, attr: str, value) -> bool:
        return attr not in _NO_ATTRIBUTES and super().is_safe_attribute(obj, attr, value)

    @staticmethod
    def checked_literal(value):
        return _checked(value, "a literal")

    @staticmethod
    def checked_join(pieces) -> str:
        return _joined(pieces, "the ~ operator")

    def call_binop(self, context, operator: str, left, right):
        what = f"the {operator} operator"
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and n * _size(seq) > MAX_CHARS:
                    raise _refuse(f"repeating a value of size {_size(seq)} {n} times makes more than {MAX_CHARS} "
                                  f"characters")
            if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > \
                    MAX_INT_BITS + 1:
                raise _refuse(f"{what} makes an integer of more than {MAX_INT_BITS} bits")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1 and \
                    right * math.log2(abs(left)) > MAX_INT_BITS:
                raise _refuse(f"{left} ** {right} makes an integer of more than {MAX_INT_BITS} bits")
        elif operator == "+":
            if isinstance(left, (str, list, tuple)) and _size(left) + _size(right) > MAX_CHARS:
                raise _refuse(f"{what} makes more than {MAX_CHARS} characters")
        elif operator == "%" and isinstance(left, str):
            _check_format(left, right if isinstance(right, tuple) else (right,), {}, what)
        return _checked(super().call_binop(context, operator, left, right), what)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's own signature, see its call)
        method = getattr(__obj, "__wrapped__", __obj)  # str.format comes wrapped by wrap_str_format
        name = getattr(method, "__name__", "a function")
        if isinstance(getattr(method, "__self__", None), str):
            what = f"str.{name}"
            if name in ("format", "format_map"):
                mapping = args[0] if name == "format_map" and args and isinstance(args[0], dict) else kwargs
                _check_format(method.__self__, args, mapping, what)
            elif name in WIDTHS:
                _check_arguments(args[:1], {k: v for k, v in kwargs.items() if k in WIDTH_NAMES}, what)
            if name in METHOD_SIZES and METHOD_SIZES[name](method.__self__, *args, **kwargs) > MAX_CHARS:
                raise _refuse(f"{what} would make more than {MAX_CHARS} characters")
        return _checked(super().call(__context, __obj, *args, **kwargs), f"calling {name}")


_NO_ATTRIBUTES = frozenset({"encode", "to_bytes", "from_bytes"})
"""Attributes a template may not read: the ways to bytes, whose methods the size checks do not follow."""


def _raise(message):
    raise ValueError(f"the chat template refused the messages: {message}")


class _Deadline:
    """Raises the refusal once MAX_SECONDS have passed, checked at every Python call and at every line of the
    template's own code (its loops, macros and blocks: frames of code compiled from "<template>") while it is set as
    the trace function; and once the values checked add up to more than MAX_BUILT characters."""

    def __init__(self, what: str):
        self.what, self.end, self.built = what, time.monotonic() + MAX_SECONDS, 0

    def __call__(self, frame, event, arg):
        self.check()
        if frame.f_code.co_filename != "<template>":
            return None   # no line events in jinja2's or Python's own code
        return self.line

    def line(self, frame, event, arg):
        self.check()
        return self.line

    def check(self) -> None:
        if time.monotonic() > self.end:
            raise _refuse(f"{self.what} takes more than {MAX_SECONDS:g} s")

    def charge(self, size: int) -> None:
        self.built += size
        if self.built > MAX_BUILT:
            raise _refuse(f"{self.what} builds more than {MAX_BUILT} characters in all")


def _check_time() -> None:
    deadline = getattr(_render, "active", None)
    if deadline is not None:
        deadline.check()


def _bounded(what: str, run):
    """run() under a _Deadline, with recursion past Python's limit, overflow, running out of memory and Python's own
    syntax errors (too deeply nested blocks) refused as the size limits are (the previous trace function is restored
    after)."""
    previous, outer = sys.gettrace(), getattr(_render, "active", None)
    _render.active = deadline = _Deadline(what)
    sys.settrace(deadline)
    try:
        return run()
    except (RecursionError, OverflowError, MemoryError, SyntaxError) as e:   # (SyntaxError: Python's, from nesting)
        raise _refuse(f"{what} fails: {type(e).__name__}: {str(e)[:200]}") from e
    finally:
        sys.settrace(previous)
        _render.active = outer


def compile_template(source: str):
    """The jinja2 Template of a chat template's source, in a BoundedEnvironment (jinja2 errors propagate)."""
    return _bounded("compiling the chat template", lambda: BoundedEnvironment().from_string(source))


def render(template, **variables) -> str:
    """The text of a compiled chat template for `variables`, written piece by piece and stopped at MAX_CHARS and
    after MAX_SECONDS."""
    def run() -> str:
        out, n = [], 0
        for piece in template.generate(**variables):
            n += len(piece)
            if n > MAX_CHARS:
                raise _refuse(f"the rendered prompt reaches more than {MAX_CHARS} characters")
            out.append(piece)
        return "".join(out)

    return _bounded("rendering the chat template", run)
