"""Load, check, merge and write: the steps behind `adalora merge`, usable from Python. `merge_files` writes the
result layer by layer as the method produces it (svd, linear: one merged layer in memory at a time).

Checks run before any tensor work: one weight per input, parameters valid for the method, the same base
identity, the same (in, out) for modules adapted by several inputs, finite factors, a common task type.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch

from adalora.adapter import Adapter, AdapterLayer, base_identity, base_mismatch
from adalora.adapter_file import (
    FILE_NAME, AdapterFormatError, read_manifest, save_adapter_streamed, tensors_sha256, to_tensors,
)
from adalora.atomic import atomic_dir, remove_stale
from adalora.engine.errors import AdapterMismatch
from adalora.engine.slots import check_adapter
from adalora.safetensors_stream import read_header
from adalora.peft_interop import base_skeleton, linear_shapes, load_any
from adalora.tools.merge.into_base import MERGE_RECORD
from adalora.tools.merge.lowrank import union_shapes
from adalora.tools.merge.strategies import DenseStrategy, MergeError, MergeParams, get_strategy


def load_inputs(paths: list[str | os.PathLike], base_model_dir: str | os.PathLike | None = None,
                task_type: str | None = None) -> list[Adapter]:
    """Native or PEFT inputs. A PEFT folder not written by us takes its base from base_model_dir, else from the
    local folder its base_model_name_or_path names; its task from task_type, its config, else that base."""
    adapters = []
    for path in paths:
        if not Path(path).exists():
            raise MergeError(f"input adapter {path}: no such file or folder")
        adapters.append(load_any(path, base_model_dir=base_model_dir, task_type=task_type))
    if base_model_dir is not None:
        check_against_base(adapters, [str(p) for p in paths], base_model_dir)
    return adapters


def check_inputs(adapters: list[Adapter], names: list[str]) -> None:
    """Same base, same shapes for shared modules, finite factors, one task type; errors name adapter and module."""
    if not adapters:
        raise MergeError("give at least one adapter to merge")
    ref, ref_name = adapters[0], names[0]
    for adapter, name in zip(adapters, names):
        problem = base_mismatch(adapter.base, ref.base)
        if problem:
            raise MergeError(f"{name}: {problem}, the base of {ref_name}: merge only adapters of the same base model")
        if adapter.task_type != ref.task_type:
            raise MergeError(f"{name} is a {adapter.task_type!r} adapter but {ref_name} is {ref.task_type!r}: "
                             "merge adapters of one task type")
    seen: dict[str, tuple[tuple[int, int], str]] = {}
    for adapter, name in zip(adapters, names):
        for path, shape in adapter.shapes.items():
            shape = tuple(shape)
            if path in seen and seen[path][0] != shape:
                raise MergeError(f"module {path}: {name} has (in, out)={shape}, {seen[path][1]} has {seen[path][0]}")
            seen.setdefault(path, (shape, name))
        for path, layer in adapter.layers.items():
            for factor in ("P", "lam", "Q"):
                if not torch.isfinite(getattr(layer, factor)).all():
                    raise MergeError(f"{name}: module {path} factor {factor} holds NaN or inf values")


def merge_stream(adapters: list[Adapter], method: str, params: MergeParams, names: list[str] | None = None,
                 head_from: int | None = None, base_model_dir: str | os.PathLike | None = None) -> tuple[Adapter, dict[str, int], Iterator[tuple[str, AdapterLayer]]]:
    """The merge as (the result without its layers, each module's rank, the layers one at a time): what
    save_adapter_streamed writes holding one layer. The result has scale 1 (init_r = lora_alpha = its largest
    rank) and its provenance in info["merge"].

    head_from: 1-based index of the input whose classification head and labels the result carries;
    None carries no head (each task keeps its own head).
    """
    names = names or [f"input {i + 1}" for i in range(len(adapters))]
    strategy = get_strategy(method)
    strategy.check(params, len(adapters))
    if head_from is not None and not 1 <= head_from <= len(adapters):
        raise MergeError(f"--head-from {head_from} must be between 1 and {len(adapters)} (the input's position)")
    check_inputs(adapters, names)
    if isinstance(strategy, DenseStrategy):
        check_dense_sizes(adapters, names)
    merged_inputs, learned = strategy.prepare(adapters, params, None if base_model_dir is None else str(base_model_dir))
    ranks, layers = strategy.stream(merged_inputs, params)
    r = max([*ranks.values(), 1])
    head_source = adapters[head_from - 1] if head_from is not None else None
    labels = (head_source or adapters[0]).labels
    info = {"merge": {
        "method": method, "params": params.to_dict(),
        "inputs": [{"name": n, "sha256": tensors_sha256(to_tensors(a)), "base": a.base, "task_type": a.task_type,
                    "num_params": a.num_params()} for a, n in zip(adapters, names)],
        "head_from": head_from,
        "head": (f"head of input {head_from}" if head_from else
                 "none: attach each task's own head (labels are input 1's)" if adapters[0].head else "none"),
        **learned,
    }}
    shell = Adapter(base=dict(adapters[0].base), shapes=union_shapes(adapters), layers={}, init_r=r,
                    lora_alpha=float(r), mode="adalora", task_type=adapters[0].task_type, labels=labels,
                    head=dict(head_source.head) if head_source is not None else {}, info=info)
    return shell, ranks, layers


def merge_adapters(adapters: list[Adapter], method: str, params: MergeParams, names: list[str] | None = None,
                   head_from: int | None = None, base_model_dir: str | os.PathLike | None = None) -> Adapter:
    """The merged adapter in memory (merge_stream with every layer collected)."""
    merged, _, layers = merge_stream(adapters, method, params, names, head_from, base_model_dir)
    merged.layers = dict(layers)
    return merged


MAX_DENSE_ELEMENTS = 1 << 30
"""Largest out x in of one module a dense method (ties, dare, magnitude_prune) builds: 4 GiB in float32, above
any layer of a 70B model; a larger declared module is a broken file, refused before anything is allocated."""


def is_merge_output(folder: Path) -> bool:
    """Whether `folder` holds what a previous merge wrote (an adapter with merge provenance, or an into-base
    model folder whose shards carry MERGE_RECORD), so that --out may replace it."""
    shards = sorted(folder.glob("*.safetensors"))
    if shards and all(_has_record(shard) for shard in shards):
        return True
    names = {p.name for p in folder.iterdir()}
    if names != {FILE_NAME}:
        return False
    try:
        return "merge" in (read_manifest(folder).get("info") or {})
    except AdapterFormatError:
        return False


def _has_record(shard: Path) -> bool:
    try:
        return MERGE_RECORD in (read_header(shard).get("__metadata__") or {})
    except (OSError, ValueError):
        return False


def check_output(out: str | os.PathLike, inputs: list[str | os.PathLike],
                 base_model_dir: str | os.PathLike | None = None) -> None:
    """OUT is never, contains, or lies inside an input or the base model folder; an existing OUT is replaced only
    when it holds nothing but a previous merge's output. Checked before anything is read or written."""
    out_path = Path(out).resolve()
    sources = [(f"input {path}", Path(path).resolve()) for path in inputs]
    if base_model_dir is not None:
        sources.append((f"the base model {base_model_dir}", Path(base_model_dir).resolve()))
    for what, p in sources:
        folder = p.parent if p.is_file() else p
        if out_path == p or out_path == folder or out_path in p.parents or folder in out_path.parents:
            raise MergeError(f"--out {out} is, contains or lies inside {what}: inputs are never modified or "
                             f"replaced; choose a new folder")
    if out_path.exists() and (not out_path.is_dir() or any(out_path.iterdir())) and not (
            out_path.is_dir() and is_merge_output(out_path)):
        raise MergeError(f"--out {out} exists and is not a previous merge's output: remove it or choose a new folder "
                         f"(a merge replaces only its own earlier output)")


def check_against_base(adapters: list[Adapter], names: list[str], base_model_dir: str | os.PathLike) -> None:
    """Every input belongs to this base and declares only modules it has, of its shapes (engine.slots.check_adapter,
    the server's check); before any tensor work."""
    model = base_skeleton(base_model_dir, adapters[0].task_type)
    identity, shapes = base_identity(model), linear_shapes(model)
    for adapter, name in zip(adapters, names):
        try:
            check_adapter(adapter, identity, shapes)
        except AdapterMismatch as e:
            raise MergeError(f"{name} does not fit --base-model {base_model_dir}: {e}") from e


def check_dense_sizes(adapters: list[Adapter], names: list[str]) -> None:
    """A dense method builds out x in per module: refuse a declared shape past MAX_DENSE_ELEMENTS first."""
    for adapter, name in zip(adapters, names):
        for path, (in_f, out_f) in adapter.shapes.items():
            if in_f * out_f > MAX_DENSE_ELEMENTS:
                raise MergeError(f"{name}: module {path} declares (in, out)=({in_f}, {out_f}), {in_f * out_f:,} "
                                 f"elements, over the {MAX_DENSE_ELEMENTS:,} a dense method builds per module: a "
                                 f"broken file; pass --base-model to check inputs against the real model")


def merge_files(paths: list[str | os.PathLike], out: str | os.PathLike, method: str, params: MergeParams,
                head_from: int | None = None, base_model_dir: str | os.PathLike | None = None,
                task_type: str | None = None) -> Path:
    """Load the inputs, merge, write OUT/adapter.safetensors; OUT appears whole (built in a temp folder beside it
    and renamed) or not at all, and a temp folder a killed run left is removed first."""
    check_output(out, paths, base_model_dir)
    remove_stale(out)
    adapters = load_inputs(paths, base_model_dir, task_type)
    params = get_strategy(method).file_params(params, adapters)
    merged, ranks, layers = merge_stream(adapters, method, params, names=[str(p) for p in paths], head_from=head_from,
                                         base_model_dir=base_model_dir)
    for entry, path in zip(merged.info["merge"]["inputs"], paths):
        entry["path"] = str(Path(path).resolve())
    with atomic_dir(out) as tmp:
        try:
            save_adapter_streamed(merged, ranks, layers, tmp)  # one merged layer in memory at a time
        except AdapterFormatError as e:  # the merged result itself is unwritable (it overflows float32, say)
            raise MergeError(f"--out {out}: the merged adapter cannot be written: "
                             f"{str(e).replace(str(tmp) + ': ', '')}") from e
    return Path(out) / FILE_NAME
