"""Write a base model folder with a merged adapter added into its weights, one safetensors shard at a time.

Peak memory is about one tensor plus its dense update, whatever the shard size: each shard is read
tensor by tensor (plain reads, no memory map), an adapted weight gets W + delta (Conv1D stores (in, out): delta
transposed), and its bytes are streamed into the output shard behind a header computed up front (the
same names, dtypes, shapes and metadata as the input shard), then released. Config, tokenizer and index files are copied. The folder appears
atomically (adalora.atomic.atomic_dir), after every check passed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from transformers.pytorch_utils import Conv1D

from adalora.adapter import Adapter, base_identity, base_mismatch
from adalora.atomic import atomic_dir
from adalora.safetensors_stream import MAX_HEADER_BYTES, encode_header, parse_header
from adalora.tools.merge.strategies import MergeError

MERGE_RECORD = "adalora_merge"
"""Metadata key of every shard a merge writes: the merge's provenance, and the mark that lets a later merge
replace this folder (tools.merge.pipeline.check_output)."""


def _meta_model(base_dir: Path) -> torch.nn.Module:
    """The base architecture on the meta device (no weights): module types and the base identity."""
    config = transformers.AutoConfig.from_pretrained(base_dir)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise MergeError(f"{base_dir}/config.json names no known architecture ({arch!r})")
    with torch.device("meta"):
        return cls(config)


def _shard_index(shards: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """tensor name -> (shard, shape), read from the headers only."""
    index = {}
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as f:
                for key in f.keys():
                    index[key] = (shard, tuple(f.get_slice(key).get_shape()))
        except Exception as e:  # safetensors raises its own SafetensorError for damaged files
            raise MergeError(f"{shard}: not a readable safetensors file (truncated or damaged): {e}") from e
    return index


def plan(adapter: Adapter, base_dir: Path) -> tuple[dict[str, tuple[str, bool]], dict[str, str], list[Path]]:
    """Checks everything before writing: ({weight key: (module path, transposed)}, {key: head name}, shards)."""
    if not (base_dir / "config.json").is_file():
        raise MergeError(f"--base-model {base_dir}: no config.json (expected a model folder)")
    shards = sorted(base_dir.glob("*.safetensors"))
    if not shards:
        raise MergeError(f"--base-model {base_dir}: no .safetensors weights (save the model with safe_serialization)")
    model = _meta_model(base_dir)
    identity = base_identity(model)
    problem = base_mismatch(adapter.base, identity)
    if problem:
        raise MergeError(f"the merged {problem}, the base of --base-model {base_dir}")
    index = _shard_index(shards)
    weights = {}
    for path in adapter.layers:
        in_f, out_f = adapter.shapes[path]
        key = f"{path}.weight"
        try:
            transposed = isinstance(model.get_submodule(path), Conv1D)
        except AttributeError as e:
            raise MergeError(f"adapted module {path} does not exist in --base-model {base_dir}") from e
        expected = (in_f, out_f) if transposed else (out_f, in_f)
        if key not in index:
            raise MergeError(f"--base-model {base_dir}: no tensor {key} in its safetensors files")
        if index[key][1] != expected:
            raise MergeError(f"{key}: base has shape {index[key][1]}, the adapter needs {expected}")
        weights[key] = (path, transposed)
    heads = {}
    for name, t in adapter.head.items():
        if name not in index:
            raise MergeError(f"the merged adapter carries a classification head ({name}) but --base-model {base_dir} "
                             "has none: merge into a base with the same head, or merge without --head-from")
        if index[name][1] != tuple(t.shape):
            raise MergeError(f"head tensor {name}: adapter {tuple(t.shape)} vs base {index[name][1]}: the base's head "
                             "must have the same shape (same number of labels)")
        heads[name] = name
    return weights, heads, shards


def merge_into_base(adapter: Adapter, base_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write OUT: the base model folder with `adapter`'s deltas (and head, if it carries one) merged in."""
    base_dir, out = Path(base_dir), Path(out)
    if out.resolve() == base_dir.resolve():
        raise MergeError(f"--out {out} is the base model folder: inputs are never modified, choose a new folder")
    weights, heads, shards = plan(adapter, base_dir)
    with atomic_dir(out) as tmp:
        for f in base_dir.iterdir():
            if f.is_file() and f.suffix != ".safetensors":
                shutil.copy2(f, tmp / f.name)
        record = json.dumps({"base_model": str(base_dir.resolve()), "merge": adapter.info.get("merge")}, default=str)
        for shard in shards:
            _merge_shard(adapter, shard, tmp / shard.name, weights, heads, record)
    return out


def _merge_shard(adapter: Adapter, shard: Path, target: Path, weights: dict, heads: dict, record: str) -> None:
    """Stream one shard: read a tensor, add its delta (or swap in the head), write its bytes, release it.

    Plain reads instead of a memory map, so that the pages of tensors already written are not kept
    resident for the rest of the shard."""
    with open(shard, "rb") as src, open(target, "wb") as out:
        entries, data_start = _read_header(src, shard)
        keys = sorted((k for k in entries if k != "__metadata__"), key=lambda k: entries[k]["data_offsets"][0])
        header = encode_header([(key, entries[key]["dtype"], entries[key]["shape"]) for key in keys],
                               {**(entries.get("__metadata__") or {}), MERGE_RECORD: record})
        out.write(len(header).to_bytes(8, "little"))
        out.write(header)
        for key in keys:
            t = _read_tensor(src, entries[key], data_start, key)
            if key in weights:
                path, transposed = weights[key]
                delta = adapter.delta(path)  # (out, in), the one delta formula
                t = (t.float() + (delta.T if transposed else delta)).to(t.dtype)
            elif key in heads:
                t = adapter.head[heads[key]].to(t.dtype)
            out.write(_raw_bytes(t))
            del t
        out.flush()
        os.fsync(out.fileno())


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _read_header(src, shard: Path) -> tuple[dict, int]:
    """(header entries, byte offset where tensor data starts) of an open safetensors file."""
    size = int.from_bytes(src.read(8), "little")
    try:
        entries = parse_header(src.read(min(size, MAX_HEADER_BYTES + 1)), size)
    except ValueError as e:
        raise MergeError(f"{shard}: not a safetensors file (unreadable header: {e})") from e
    return entries, 8 + size


def _read_tensor(src, entry: dict, data_start: int, key: str) -> torch.Tensor:
    if entry["dtype"] not in _DTYPES:
        raise MergeError(f"tensor {key}: dtype {entry['dtype']} is not supported by --into-base")
    start, end = entry["data_offsets"]
    src.seek(data_start + start)
    buffer = bytearray(end - start)
    if src.readinto(buffer) != len(buffer):
        raise MergeError(f"tensor {key}: the shard is truncated")
    flat = torch.frombuffer(buffer, dtype=_DTYPES[entry["dtype"]]) if buffer else torch.empty(0, dtype=_DTYPES[entry["dtype"]])
    return flat.reshape(entry["shape"])


def _raw_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes, row-major and little-endian (safetensors' layout), without a Python bytes copy."""
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())
