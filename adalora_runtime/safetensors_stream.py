"""Write a safetensors file tensor by tensor, holding only the tensors that arrive before their turn; read one
whole into memory (read_file) or its header alone (read_header).

safetensors puts its header (every tensor's dtype, shape and byte offsets, and the string metadata) before the
data, so the names, dtypes and shapes must be known when writing starts; the data then follows in sorted name
order. A metadata value that depends on the data (a digest) is written as a placeholder of its final length
and patched in place at the end. Readers see an ordinary safetensors file (safe_open, save_file's layout
rules: 8-byte little-endian header size, a JSON header padded with spaces to 8 bytes, contiguous offsets).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import safetensors.torch
import torch

DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}

Spec = tuple[torch.dtype, tuple[int, ...]]
ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
"""Bytes per element of each safetensors dtype name."""
MAX_HEADER_BYTES = 100 * 1024 * 1024
"""safetensors' own cap on a header."""


class StreamWriter:
    """Header now, then each tensor's bytes as soon as every name sorting before it has been written.

    specs: name -> (dtype, shape) of every tensor the file will hold. on_write(name, tensor) is called once per
    tensor, in sorted name order (the order tensors_sha256 digests them)."""

    def __init__(self, file: BinaryIO, specs: dict[str, Spec], metadata: dict[str, str],
                 on_write: Callable[[str, torch.Tensor], None] = lambda name, tensor: None) -> None:
        unknown = sorted({str(d) for d, _ in specs.values()} - {str(d) for d in DTYPES})
        if unknown:
            raise ValueError(f"dtypes {unknown} have no safetensors name")
        self._file, self._specs, self._on_write = file, specs, on_write
        self._order = sorted(specs)
        self._position = {name: i for i, name in enumerate(self._order)}
        self._header = encode_header([(name, DTYPES[specs[name][0]], list(specs[name][1])) for name in self._order],
                                     metadata)
        file.write(struct.pack("<Q", len(self._header)))
        file.write(self._header)
        self._pending: dict[str, torch.Tensor] = {}
        self._next = 0

    def put(self, name: str, tensor: torch.Tensor) -> None:
        """Hand over one tensor (any order); written once its turn comes."""
        if name not in self._specs:
            raise ValueError(f"tensor {name!r} is not in the file's header")
        if name in self._pending or self._position[name] < self._next:
            raise ValueError(f"tensor {name!r} was given twice")
        dtype, shape = self._specs[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, the header says {dtype} {shape}")
        self._pending[name] = tensor.detach().cpu().contiguous()
        while self._next < len(self._order) and self._order[self._next] in self._pending:
            name = self._order[self._next]
            t = self._pending.pop(name)
            if t.numel():
                self._file.write(t.reshape(-1).view(torch.uint8).numpy().data)  # 1-D: stride 1 even for size-1 dims
            self._on_write(name, t)
            self._next += 1

    def finish(self, patches: dict[str, str] | None = None) -> None:
        """Check every tensor was written, then replace each placeholder in the header by its value (same
        length; each placeholder must occur exactly once)."""
        missing = self._order[self._next:]
        if missing:
            raise ValueError(f"{len(missing)} tensors never arrived, first {missing[0]!r}")
        for placeholder, value in (patches or {}).items():
            key = placeholder.encode()
            if len(value.encode()) != len(key) or self._header.count(key) != 1:
                raise ValueError(f"placeholder {placeholder!r} must occur once and be as long as its value")
            self._file.seek(8 + self._header.index(key))
            self._file.write(value.encode())
        self._file.seek(0, 2)


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of a safetensors file (tensor entries and "__metadata__"), reading only its first bytes.
    ValueError for a file that is no safetensors file."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError("too short for a safetensors file (it starts with an 8-byte header length)")
        (length,) = struct.unpack("<Q", prefix)
        return parse_header(f.read(min(length, MAX_HEADER_BYTES + 1)), length)


def parse_header(raw: bytes, length: int) -> dict:
    """The one header decoder: the header dict from its `length` raw bytes. ValueError names what is wrong (a
    length past the file or the cap, not UTF-8 JSON, a key named twice, not an object of tensors)."""
    if length > MAX_HEADER_BYTES or len(raw) != length:
        raise ValueError(f"header length {length} is over {MAX_HEADER_BYTES} bytes or runs past the end of the file")

    def no_duplicates(pairs: list[tuple[str, object]]) -> dict:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError("the safetensors header names a key twice")
        return dict(pairs)

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"the safetensors header is not JSON ({type(e).__name__}): not a safetensors file") from e
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
        raise ValueError("the safetensors header is not a JSON object of tensors: not a safetensors file")
    return header


def encode_header(entries: list[tuple[str, str, list[int]]], metadata: dict[str, str] | None) -> bytes:
    """The one header encoder: (name, safetensors dtype name, shape) laid out in the given order, contiguous
    offsets, padded with spaces to 8 bytes as the format asks."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape in entries:
        size = math.prod(shape) * ITEM_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def read_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file read into memory in one read: the tensors own their bytes (no
    memory map), so a file truncated or overwritten later can neither crash their reader (SIGBUS) nor change what
    was loaded. ValueError for a malformed file."""
    data = Path(path).read_bytes()
    if len(data) < 8:
        raise ValueError("too short for a safetensors file (it starts with an 8-byte header length)")
    (length,) = struct.unpack("<Q", data[:8])
    metadata = parse_header(data[8:8 + length], length).get("__metadata__") or {}
    try:
        tensors = safetensors.torch.load(data)
    except Exception as e:  # safetensors raises its own error type for a malformed data section
        raise ValueError(f"not a readable safetensors file ({e})") from e
    return {name: tensors[name] for name in sorted(tensors)}, metadata  # name order, as safe_open lists them
