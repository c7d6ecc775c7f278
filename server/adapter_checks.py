"""What an adapter folder may hold, checked from file names and safetensors headers before any tensor is read.

    check_folder(folder, limits)         no pickle-format file anywhere in it; adapter_config.json within its cap
    check_safetensors(path, limits)      header length, tensor count, dtypes, ranks and total bytes within
                                         AdapterLimits, every tensor's bytes consistent with the file's size

Only the first 8 bytes and the JSON header (at most max_header_bytes) of a file are read here. What the readers
check once the tensors are loaded is not repeated: adapter_file.validate (shapes against the declared modules,
float dtypes, finite values, the tensors' sha256), peft_interop.load_peft (keys, ranks against rank_pattern,
module shapes against the base model) and engine.slots.check_adapter (base identity, served modules and shapes).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

from adalora.adapter_file import FILE_NAME
from adalora.config import ConfigError, is_int
from adalora.peft_interop import CONFIG_NAME, WEIGHTS_NAME
from adalora.safetensors_stream import parse_header

ADAPTER_FILES = {FILE_NAME: "native", CONFIG_NAME: "peft", WEIGHTS_NAME: "peft"}
"""The files the store reads an adapter from, by format: an upload may carry these and nothing else."""
SAFETENSORS_FILES = (FILE_NAME, WEIGHTS_NAME)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
"""Files torch.load / pickle would read (and run code from): a folder holding one is refused, never opened."""
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2}
"""safetensors dtype names an adapter tensor may have (float32, float16, bfloat16) and their sizes."""
RANK_DIM = {".lam": 0, ".Q": 0, ".P": 1, ".lora_A": 0, ".lora_E": 0, ".lora_B": 1, ".lora_A.weight": 0,
            ".lora_B.weight": 1}
"""Which dimension of a factor is its rank, by name suffix: native layers.<path>.{P,lam,Q}, PEFT AdaLoRA
lora_{A,E,B} and PEFT LoRA lora_{A,B}.weight."""
FACTOR_PREFIXES = ("layers.", "base_model.model.")
"""Names of factor tensors start with one of these (native, PEFT); others (heads) have no rank."""


class AdapterRejected(ValueError):
    """A file of an adapter folder breaks a limit or is malformed; the message names the file, value and limit."""


@dataclass(frozen=True)
class AdapterLimits:
    """Caps on an adapter's files, checked from their headers before anything is allocated for the tensors.
    The defaults admit adapters of 70B-scale bases at any rank up to 1024 in float32."""

    max_header_bytes: int = 8 * 1024 * 1024
    """Largest safetensors JSON header (its length is the file's first 8 bytes); safetensors itself allows 100 MB.
    An 80-layer adapter of 7 modules per layer needs about 0.2 MB."""
    max_tensors: int = 16384
    """Most tensors in one safetensors file (an 80-layer PEFT adapter of 7 modules per layer has 1680)."""
    max_tensor_bytes: int = 4 * 1024**3
    """Most bytes of tensor data in one safetensors file."""
    max_rank: int = 1024
    """Highest kept rank of any adapted module."""
    max_config_bytes: int = 1024 * 1024
    """Largest adapter_config.json (PEFT)."""
    dtypes: tuple[str, ...] = tuple(DTYPE_BYTES)
    """safetensors dtypes a tensor may have; a subset of DTYPE_BYTES."""

    def __post_init__(self) -> None:
        for name in ("max_header_bytes", "max_tensors", "max_tensor_bytes", "max_rank", "max_config_bytes"):
            value = getattr(self, name)
            if not is_int(value, 1):
                raise ConfigError(f"AdapterLimits.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.dtypes, tuple) or not self.dtypes or not set(self.dtypes) <= set(DTYPE_BYTES):
            raise ConfigError(f"AdapterLimits.dtypes must be a non-empty tuple of {sorted(DTYPE_BYTES)}, "
                              f"got {self.dtypes!r}")


def check_folder(folder: Path, limits: AdapterLimits) -> None:
    """Refuse a folder holding any pickle-format file (never opened) or an oversized adapter_config.json."""
    pickles = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise AdapterRejected(f"{folder} holds {pickles[0]}: pickle-format files ({', '.join(PICKLE_SUFFIXES)}) are "
                              f"never loaded and an adapter folder must not hold any; keep only the safetensors "
                              f"adapter files (PEFT: save_pretrained(safe_serialization=True); move a training "
                              f"checkpoint.pt out of the store)")
    config = folder / CONFIG_NAME
    if config.is_file() and config.stat().st_size > limits.max_config_bytes:
        raise AdapterRejected(f"{config}: {config.stat().st_size} bytes, over the cap of {limits.max_config_bytes} "
                              f"(AdapterLimits.max_config_bytes)")


def check_safetensors(path: Path, limits: AdapterLimits) -> None:
    """Refuse `path` unless its header is within `limits` and describes exactly the bytes after it."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise AdapterRejected(f"{path}: {size} bytes, too short for a safetensors file (it starts with an 8-byte "
                                  f"header length)")
        (length,) = struct.unpack("<Q", prefix)
        if length > limits.max_header_bytes:
            raise AdapterRejected(f"{path}: safetensors header of {length} bytes, over the cap of "
                                  f"{limits.max_header_bytes} (AdapterLimits.max_header_bytes)")
        if length > size - 8:
            raise AdapterRejected(f"{path}: header length {length} runs past the end of the file ({size} bytes): "
                                  f"truncated, or not a safetensors file")
        header = _parse_header(path, f.read(length))
    tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
    if len(tensors) > limits.max_tensors:
        raise AdapterRejected(f"{path}: {len(tensors)} tensors, over the cap of {limits.max_tensors} "
                              f"(AdapterLimits.max_tensors)")
    spans = sorted(_span(path, name, entry, limits) for name, entry in tensors.items())
    total = sum(end - begin for begin, end, _ in spans)
    if total > limits.max_tensor_bytes:
        raise AdapterRejected(f"{path}: {total} bytes of tensor data, over the cap of {limits.max_tensor_bytes} "
                              f"(AdapterLimits.max_tensor_bytes, adalora serve --max-adapter-bytes)")
    _check_layout(path, spans, size - 8 - length)


def _parse_header(path: Path, raw: bytes) -> dict:
    try:
        return parse_header(raw, len(raw))
    except ValueError as e:
        raise AdapterRejected(f"{path}: {e}") from e


def _span(path: Path, name: str, entry: object, limits: AdapterLimits) -> tuple[int, int, str]:
    """(begin, end, name) of one tensor's bytes in the data section, after checking its dtype, shape and rank."""
    def count(x: object) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list) or \
            not all(count(d) for d in entry["shape"]) or not isinstance(entry.get("data_offsets"), list) or \
            len(entry["data_offsets"]) != 2 or not all(count(o) for o in entry["data_offsets"]):
        raise AdapterRejected(f"{path}: tensor {name!r} has a malformed header entry (dtype, shape, data_offsets)")
    dtype, shape, (begin, end) = entry.get("dtype"), entry["shape"], entry["data_offsets"]
    if dtype not in limits.dtypes:
        raise AdapterRejected(f"{path}: tensor {name!r} has dtype {dtype!r}; allowed: {', '.join(limits.dtypes)} "
                              f"(AdapterLimits.dtypes, adalora serve --adapter-dtypes); save the adapter in float32, "
                              f"float16 or bfloat16")
    if name.startswith(FACTOR_PREFIXES):
        dim = next((d for suffix, d in RANK_DIM.items() if name.endswith(suffix)), None)
        if dim is not None and len(shape) > dim and shape[dim] > limits.max_rank:
            raise AdapterRejected(f"{path}: tensor {name!r} has rank {shape[dim]}, over the cap of {limits.max_rank} "
                                  f"(AdapterLimits.max_rank, adalora serve --max-adapter-rank)")
    need = math.prod(shape) * DTYPE_BYTES[dtype]
    if end - begin != need:
        raise AdapterRejected(f"{path}: tensor {name!r} spans {end - begin} bytes, its dtype {dtype} and shape "
                              f"{shape} need {need}: not a well-formed safetensors file")
    return begin, end, name


def _check_layout(path: Path, spans: list[tuple[int, int, str]], data_bytes: int) -> None:
    """The tensors tile the data section: no gap, no overlap, nothing after the last one."""
    position = 0
    for begin, end, name in spans:
        if begin != position:
            raise AdapterRejected(f"{path}: tensor {name!r} starts at data byte {begin}, expected {position} "
                                  f"(tensors overlap or leave a gap): not a well-formed safetensors file")
        position = end
    if position != data_bytes:
        raise AdapterRejected(f"{path}: the tensors cover {position} bytes but {data_bytes} follow the header "
                              f"(truncated, or trailing bytes)")
