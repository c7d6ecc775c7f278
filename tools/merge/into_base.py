"""Write a base model folder with a merged adapter added into its weights, one safetensors shard at a time.

Peak memory is about one shard plus one layer's dense update: each shard is read with safe_open,
its adapted weights get W + delta (Conv1D stores (in, out): delta transposed), it is written into a
temporary folder and released. Config, tokenizer and index files are copied. The folder appears
atomically (adalora_runtime.atomic.atomic_dir), after every check passed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.pytorch_utils import Conv1D

from adalora_runtime.adapter import Adapter, base_identity
from adalora_runtime.atomic import atomic_dir
from tools.merge.strategies import MergeError


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
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                index[key] = (shard, tuple(f.get_slice(key).get_shape()))
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
    if identity["config_sha256"] != adapter.base.get("config_sha256"):
        raise MergeError(f"the adapters belong to base {adapter.base.get('name')!r} "
                         f"(config {str(adapter.base.get('config_sha256'))[:12]}), --base-model {base_dir} is "
                         f"{identity['name']!r} (config {identity['config_sha256'][:12]})")
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
        for shard in shards:
            _merge_shard(adapter, shard, tmp / shard.name, weights, heads)
    return out


def _merge_shard(adapter: Adapter, shard: Path, target: Path, weights: dict, heads: dict) -> None:
    with safe_open(str(shard), framework="pt") as f:
        metadata = f.metadata()
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    for key, t in tensors.items():
        if key in weights:
            path, transposed = weights[key]
            delta = adapter.delta(path)  # (out, in), the one delta formula
            tensors[key] = (t.float() + (delta.T if transposed else delta)).to(t.dtype).contiguous()
        elif key in heads:
            tensors[key] = adapter.head[heads[key]].to(t.dtype).contiguous()
    save_file(tensors, str(target), metadata=metadata)
    del tensors
