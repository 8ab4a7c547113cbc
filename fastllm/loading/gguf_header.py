"""Bounds checks on a GGUF file before and after the `gguf` package reads it.

`check_header` walks the header with every length and count checked against the bytes left in the file:

    magic "GGUF" | version u32 (2 or 3) | tensor count u64 | kv count u64
    kv count x   (key: u64 length + bytes) | value type u32 | value
    tensor count x   (name: u64 length + bytes) | n_dims u32 | n_dims x u64 dims | type u32 | offset u64

a value is a scalar (VALUE_SIZES), a string (u64 length + bytes), or an array (item type u32, count u64,
items; arrays nest). GGUFReader itself trusts the counts: past the end of the file its memory map returns empty
arrays, so one flipped bit (a string's type 8 read as array 9, making a 64-bit count out of text) kept it
looping for hours while its memory grew. Byte order follows GGUFReader: a version whose low 16 bits are zero
is the other byte order.

`check_tensor_ranges` then checks each tensor's data as GGUFReader laid it out: aligned to general.alignment,
inside the data section, not overlapping another tensor (a tensor type flipped from Q4_1 to F32 claims
more bytes and would read its neighbours' data).
"""
from __future__ import annotations

import mmap
import struct

STRING, ARRAY = 8, 9
VALUE_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
"""GGUF value type -> bytes of one scalar (UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, UINT64,
INT64, FLOAT64); 8 is STRING, 9 ARRAY."""
MAX_DIMS = 4
"""ggml tensors have at most 4 dimensions (GGML_MAX_DIMS)."""
VERSIONS = (2, 3)


class _Walker:
    """Reads little- or big-endian integers from a buffer, refusing any read past its end."""

    def __init__(self, buf, path: str):
        self.buf, self.size, self.path, self.pos, self.order = buf, len(buf), path, 0, "<"

    def fail(self, what: str):
        raise ValueError(f"{self.path} is not a readable GGUF file (truncated or corrupt?): {what}")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            self.fail(f"{what} needs {n} bytes at offset {self.pos}, the file has {self.size - self.pos} left")

    def uint(self, fmt: str, what: str) -> int:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(self.order + fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str) -> bytes:
        n = self.uint("Q", f"the length of {what}")
        self.need(n, f"{what} ({n} bytes)")
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def value(self, vtype: int, what: str, depth: int = 0) -> None:
        if vtype in VALUE_SIZES:
            self.need(VALUE_SIZES[vtype], what)
            self.pos += VALUE_SIZES[vtype]
        elif vtype == STRING:
            self.string(what)
        elif vtype == ARRAY:
            item = self.uint("I", f"the item type of {what}")
            count = self.uint("Q", f"the item count of {what}")
            if item in VALUE_SIZES:
                self.need(count * VALUE_SIZES[item], f"{what} ({count} items of type {item})")
                self.pos += count * VALUE_SIZES[item]
            elif item in (STRING, ARRAY):
                # each item takes at least 8 bytes (a string's length; an array's type and count take 12)
                self.need(count * 8, f"{what} ({count} items of type {item})")
                if item == STRING:
                    self._strings(count, what)
                elif depth >= 1:  # GGUF writers never nest deeper; refuse rather than recurse on garbage
                    self.fail(f"{what} nests arrays deeper than two levels")
                else:
                    for i in range(count):
                        self.value(ARRAY, f"{what}[{i}]", depth + 1)
            else:
                self.fail(f"{what} has an unknown item type {item}")
        else:
            self.fail(f"{what} has an unknown value type {vtype}")

    def _strings(self, count: int, what: str) -> None:
        """Skips `count` strings: one struct call and one comparison per string (the ~50k tokenizer strings
        of a real vocabulary take a few milliseconds)."""
        unpack, buf, size, pos = struct.Struct(self.order + "Q").unpack_from, self.buf, self.size, self.pos
        for i in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.fail(f"{what}[{i}]: the length needs 8 bytes at offset {pos}, the file has {size - pos} left")
            pos += 8 + unpack(buf, pos)[0]
            if pos > size:
                self.pos = pos
                self.fail(f"{what}[{i}] runs past the end of the file")
        self.pos = pos


def _walk(w: _Walker) -> None:
    w.need(4, "the magic")
    if w.buf[:4] != b"GGUF":
        w.fail(f"the magic is {bytes(w.buf[:4])!r}, not b'GGUF'")
    w.pos = 4
    version = w.uint("I", "the version")
    if version & 0xFFFF == 0:  # written on a machine of the other byte order (as GGUFReader reads it)
        w.order, version = ">", int.from_bytes(version.to_bytes(4, "little"), "big")
    if version not in VERSIONS:
        w.fail(f"version {version} (supported: {', '.join(map(str, VERSIONS))})")
    n_tensors, n_kv = w.uint("Q", "the tensor count"), w.uint("Q", "the metadata count")
    # a key-value takes at least 8 + 4 + 1 bytes, a tensor description 8 + 4 + 4 + 8
    w.need(n_kv * 13 + n_tensors * 24, f"{n_kv} metadata entries and {n_tensors} tensor descriptions")
    for i in range(n_kv):
        key = w.string(f"metadata key {i}")
        try:
            key = bytes(key).decode("utf-8")
        except UnicodeDecodeError:
            w.fail(f"metadata key {i} {bytes(key)[:60]!r} is not UTF-8")
        w.value(w.uint("I", f"the value type of {key}"), f"metadata {key}")
    for i in range(n_tensors):
        name = w.string(f"the name of tensor {i}")
        n_dims = w.uint("I", f"the dimension count of tensor {bytes(name)[:60]!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            w.fail(f"tensor {bytes(name)[:60]!r} has {n_dims} dimensions (1 to {MAX_DIMS} expected)")
        w.need(n_dims * 8 + 12, f"the shape, type and offset of tensor {bytes(name)[:60]!r}")
        w.pos += n_dims * 8 + 12


def check_header(path: str) -> None:
    """ValueError naming what is wrong unless the header of GGUF file `path` lies within the file."""
    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            buf = b""
        try:
            _walk(_Walker(buf, path))
        finally:
            if isinstance(buf, mmap.mmap):
                buf.close()


def check_tensor_ranges(reader, path: str) -> None:
    """ValueError unless every tensor's bytes [offset, offset + n_bytes) start at a multiple of the alignment
    within the data section, end inside the file, and overlap no other tensor's."""
    start, size, align = reader.data_offset, len(reader.data), reader.alignment
    spans = sorted((t.data_offset, t.data_offset + t.n_bytes, t.name) for t in reader.tensors)
    for begin, _, name in spans:
        if (begin - start) % align:
            raise ValueError(f"{path}: tensor {name!r} starts at {begin - start} in the data section, not a multiple "
                             f"of general.alignment {align}")
    for i, (begin, end, name) in enumerate(spans):
        where = f"{path}: tensor {name!r} ({begin - start}..{end - start} in the data section)"
        if end > size:
            raise ValueError(f"{where} runs past the end of the file (truncated, or a corrupt tensor type?)")
        if i + 1 < len(spans) and spans[i + 1][0] < end:
            raise ValueError(f"{where} overlaps tensor {spans[i + 1][2]!r} (a corrupt tensor type or offset?)")
