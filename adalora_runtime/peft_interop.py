"""PEFT interop: map native compact adapters to and from PEFT's AdaLoRA / LoRA directories.

PEFT AdaLoRA layout (peft 0.21.2, `AdaLoraModel._get_adapter_state_dict`): adapter_model.safetensors
holds `base_model.model.<path>.lora_A` (r, in) = our Q, `.lora_E` (r, 1) = our lam, `.lora_B`
(out, r) = our P, already cut to the kept ranks; adapter_config.json's `rank_pattern` maps
`<path>.lora_E` to a boolean list of length init_r whose True count is the kept rank (PEFT's
`resize_modules_by_rank_pattern` builds modules of that rank before loading). A layer at rank 0 has
tensors with 0 rows and an all-False pattern. PEFT scales by lora_alpha / (init_r + 1e-5), we by
lora_alpha / init_r (equal to ~1e-6 relative).

Plain PEFT LoRA (`lora_A.weight` (r, in), `lora_B.weight` (out, r), scale lora_alpha / r or
lora_alpha / sqrt(r) with rsLoRA, per-layer r / alpha from rank_pattern / alpha_pattern) imports as
mode "lora" with lam = 1; a per-layer scale that differs from the global one is folded into lam.

A directory written by `save_peft` also carries the native metadata (base identity, mode, labels,
provenance, tensor sha256) in the safetensors header under NATIVE_META_KEY, which PEFT ignores; it
makes native -> PEFT -> native exact.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from adalora.adapter import TASK_TYPES, Adapter, AdapterLayer, base_identity, base_mismatch, is_causal_lm
from adalora.adapter_file import (
    FILE_NAME, AdapterFormatError, adapter_file, load_adapter, manifest_problem, read_manifest, tensors_sha256,
    to_tensors, validate,
)
from adalora.atomic import atomic_dir
from adalora.delta import fold
from adalora.safetensors_stream import read_file, read_header
from adalora.layers import ADAPTABLE, linear_dims

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
NATIVE_META_KEY = "adalora_native"
TASK_TO_PEFT = {"seq-cls": "SEQ_CLS", "causal-lm": "CAUSAL_LM", "feature-extraction": "FEATURE_EXTRACTION"}
PEFT_TO_TASK = {v: k for k, v in TASK_TO_PEFT.items()}
ADALORA_PARTS = ("lora_A", "lora_E", "lora_B")
LORA_PARTS = ("lora_A.weight", "lora_B.weight")
# Keys of PEFT variants we cannot represent in the SVD form, and what they are.
UNSUPPORTED_KEYS = {
    "lora_magnitude_vector": "DoRA (use_dora=True)",
    "lora_embedding_A": "an embedding-layer adapter",
    "lora_embedding_B": "an embedding-layer adapter",
    "trainable_tokens": "trainable token embeddings",
}
# Config switches whose non-default value changes the math beyond P diag(lam) Q * scale.
# `bias` is judged by the saved keys instead (_check_keys): bias="all" on a model without biases saves none.
UNSUPPORTED_CONFIG = {"use_dora": False, "lora_bias": False, "use_qalora": False,
                      "trainable_token_indices": None, "target_parameters": None, "layer_replication": None}
MAX_CONFIG_NUMBER = 1e6
"""Bound on r, init_r, lora_alpha and pattern values: a larger one is a broken file, not a real adapter."""
TASK_SOURCE = "task_source"
"""info key of a PEFT import: where its task type came from (--task, the adapter's config, its base, a guess)."""


class InteropError(AdapterFormatError):
    """A PEFT adapter cannot be converted; the message names the directory, key or value at fault."""


class BaseMismatch(InteropError):
    """A well-formed PEFT adapter of another base model: its recorded identity or a module's shape differs."""


# ---------------------------------------------------------------- native -> PEFT (pure mapping)


def to_peft(adapter: Adapter) -> tuple[dict[str, torch.Tensor], dict]:
    """PEFT AdaLoRA (state_dict, adapter_config dict) computing the same delta as `adapter`.

    PEFT needs every rank_pattern list as long as init_r; if a layer holds more ranks than init_r
    (possible after a LoRA import with per-layer r), init_r and lora_alpha grow together so the
    scale stays the same.
    """
    ranks = adapter.ranks()
    peft_r = max([adapter.init_r, *ranks.values()])
    alpha = adapter.lora_alpha * peft_r / adapter.init_r if peft_r != adapter.init_r else adapter.lora_alpha
    state, rank_pattern = {}, {}
    for path, (in_f, out_f) in adapter.shapes.items():
        layer = adapter.layers.get(path)
        r = ranks[path]
        Q = layer.Q if layer is not None else torch.zeros(0, in_f)  # (r, in)
        lam = layer.lam if layer is not None else torch.zeros(0)  # (r,)
        P = layer.P if layer is not None else torch.zeros(out_f, 0)  # (out, r)
        state[f"{PREFIX}{path}.lora_A"] = Q.detach().cpu().contiguous()
        state[f"{PREFIX}{path}.lora_E"] = lam.detach().cpu().reshape(r, 1).contiguous()
        state[f"{PREFIX}{path}.lora_B"] = P.detach().cpu().contiguous()
        rank_pattern[f"{path}.lora_E"] = [True] * r + [False] * (peft_r - r)
    for name, t in adapter.head.items():
        state[f"{PREFIX}{name}"] = t.detach().cpu().contiguous()
    head_modules = sorted({name.rsplit(".", 1)[0] for name in adapter.head})
    config = {
        "peft_type": "ADALORA",
        "task_type": TASK_TO_PEFT[adapter.task_type],
        "base_model_name_or_path": adapter.base.get("name"),
        "init_r": peft_r,
        "target_r": sum(ranks.values()) / max(1, len(ranks)),
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(adapter.shapes),
        "rank_pattern": rank_pattern,
        "modules_to_save": head_modules or None,
        "inference_mode": True,
        "total_step": 2,
        "tinit": 0,
        "tfinal": 0,
        "deltaT": 1,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_dora": False,
        "peft_version": "0.21.2",
    }
    return state, config


def to_peft_lora(adapter: Adapter) -> tuple[dict[str, torch.Tensor], dict]:
    """A plain PEFT LoRA (state_dict, adapter_config dict) computing the same delta as `adapter`, for LoRA servers.

    Each module's lam and scale are folded into lora_A (delta.fold), rank-0 modules are left out, r is the
    largest rank and lora_alpha = r, and rank_pattern = alpha_pattern = each module's rank: every module's
    scale is 1 both as PEFT reads it (alpha_pattern / rank_pattern) and as a server that ignores the patterns
    and applies one global lora_alpha / r reads it (vLLM; SGLang and LoRAX pad ranks to r).
    """
    if not adapter.layers:
        raise InteropError("every module of this adapter is at rank 0: there is nothing to export as a LoRA")
    ranks = {path: layer.rank for path, layer in adapter.layers.items()}
    r = max(ranks.values())
    state = {}
    for path, layer in adapter.layers.items():
        A, B = fold(layer.P.float(), layer.lam.float(), layer.Q.float(), adapter.scale)  # (rank, in), (out, rank)
        state[f"{PREFIX}{path}.lora_A.weight"] = A.detach().float().cpu().contiguous()
        state[f"{PREFIX}{path}.lora_B.weight"] = B.detach().float().cpu().contiguous()
    for name, t in adapter.head.items():
        state[f"{PREFIX}{name}"] = t.detach().cpu().contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": TASK_TO_PEFT[adapter.task_type],
        "base_model_name_or_path": adapter.base.get("name"),
        "r": r,
        "lora_alpha": r,
        "rank_pattern": ranks,
        "alpha_pattern": dict(ranks),
        "use_rslora": False,
        "target_modules": sorted(ranks),
        "modules_to_save": sorted({name.rsplit(".", 1)[0] for name in adapter.head}) or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_dora": False,
        "peft_version": "0.21.2",
    }
    return state, config


def save_peft_lora(adapter: Adapter, out: str | os.PathLike) -> Path:
    """Write to_peft_lora's directory atomically, whole (no native metadata: its factors are folded)."""
    validate(adapter, source=str(out))
    state, config = to_peft_lora(adapter)
    with atomic_dir(out) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Path(out)


def native_metadata(adapter: Adapter) -> dict:
    """What PEFT has no field for, kept so that the round trip back to native is exact."""
    return {
        "base": adapter.base, "mode": adapter.mode, "task_type": adapter.task_type, "labels": adapter.labels,
        "init_r": adapter.init_r, "lora_alpha": adapter.lora_alpha, "info": adapter.info,
        "tensors_sha256": tensors_sha256(to_tensors(adapter)),
    }


def save_peft(adapter: Adapter, out: str | os.PathLike) -> Path:
    """Write a PEFT directory (adapter_config.json + adapter_model.safetensors) atomically, whole."""
    validate(adapter, source=str(out))
    state, config = to_peft(adapter)
    meta = {"format": "pt", NATIVE_META_KEY: json.dumps(native_metadata(adapter), sort_keys=True)}
    with atomic_dir(out) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata=meta)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Path(out)


# ---------------------------------------------------------------- PEFT -> native (pure mapping)


def pattern_key(patterns, path: str) -> str | None:
    """PEFT's `get_pattern_key`: the first pattern that matches a suffix of `path` (regex allowed)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", path):
            return key
    return None


def _check_config(config: object) -> str:
    if not isinstance(config, dict):
        raise InteropError(f"{CONFIG_NAME} holds a JSON {type(config).__name__}, expected an object of PEFT config fields")
    peft_type = config.get("peft_type")
    if peft_type not in ("ADALORA", "LORA"):
        raise InteropError(f"peft_type {peft_type!r} is not supported: only ADALORA and LORA adapters convert")
    for key, default in UNSUPPORTED_CONFIG.items():
        value = config.get(key, default)
        if value != default and not (default is None and value in ({}, [])):
            what = "DoRA" if key == "use_dora" else f"{key}={value!r}"
            raise InteropError(f"{what} cannot be represented in the SVD form (needs {key}={default!r})")
    modules_to_save = config.get("modules_to_save")
    if modules_to_save is not None and not (isinstance(modules_to_save, list)
                                            and all(isinstance(m, str) for m in modules_to_save)):
        raise InteropError(f"modules_to_save must be a list of module names, got {modules_to_save!r}")
    for field_name in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(field_name) or {}
        if not isinstance(patterns, dict):
            raise InteropError(f"{field_name} must be an object {{module pattern: value}}, got {patterns!r:.200}")
        for key in patterns:
            try:
                re.compile(key)
            except (re.error, RecursionError) as e:
                raise InteropError(f"{field_name} key {key!r:.100} is not a valid regular expression ({e})") from e
    return peft_type


def _head_names(config: dict) -> set[str]:
    return set(config.get("modules_to_save") or ())


def _is_head(key: str, head_names: set[str]) -> bool:
    return key.startswith(PREFIX) and key[len(PREFIX):].split(".")[0] in head_names


def _check_keys(keys: list[str], config: dict) -> None:
    """Refuse, from the key names alone (before any tensor is read), what the SVD form cannot carry exactly."""
    head_names = _head_names(config)
    for key in keys:
        for marker, what in UNSUPPORTED_KEYS.items():
            if f".{marker}" in f".{key}":
                raise InteropError(f"key {key!r} belongs to {what}, which cannot be represented in the SVD form")
        if key.endswith(".bias") and not _is_head(key, head_names):
            raise InteropError(
                f"key {key!r} is a trained bias of the base model (PEFT bias={config.get('bias')!r}): an SVD-form "
                f"adapter carries no bias change; retrain with bias='none', or merge this adapter into the base "
                f"with PEFT's merge_and_unload()")


def _split_keys(state: dict[str, torch.Tensor], parts: tuple[str, ...], head_names: set[str]):
    """{path: {part: tensor}} for adapter tensors and {name.param: tensor} for the head."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    head: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if not key.startswith(PREFIX):
            raise InteropError(f"key {key!r} does not start with {PREFIX!r}: not a PEFT adapter state dict")
        rest = key[len(PREFIX):]
        part = next((p for p in parts if rest.endswith("." + p)), None)
        if part is not None:
            modules.setdefault(rest[: -len(part) - 1], {})[part] = t
        elif rest.split(".")[0] in head_names:
            head[rest] = t
        else:
            raise InteropError(f"unexpected key {key!r}: neither a {'/'.join(parts)} tensor nor a modules_to_save head")
    return modules, head


def _module_tensors(path: str, parts: dict[str, torch.Tensor], names: tuple[str, ...]):
    missing = [n for n in names if n not in parts]
    if missing:
        raise InteropError(f"module {path}: tensors {missing} are missing")
    A, B = parts[names[0]], parts[names[-1]]
    if A.dim() != 2 or B.dim() != 2:
        raise InteropError(
            f"module {path}: lora_A has shape {tuple(A.shape)}; only nn.Linear / Conv1D modules "
            f"(2-D factors) can be converted"
        )
    if B.shape[1] != A.shape[0]:
        raise InteropError(f"module {path}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} disagree on the rank")
    return A, B


def config_number(config: dict, key: str, kind: type = float) -> float:
    """config[key] as a finite number of `kind` (0 when missing or null); InteropError names the field."""
    value = config.get(key)
    if value is None:
        return kind(0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (kind is int and math.isfinite(value) and value != int(value)):
        raise InteropError(f"{CONFIG_NAME} field {key!r} must be {'an integer' if kind is int else 'a number'}, "
                           f"got {value!r}")
    if not math.isfinite(value) or abs(value) > MAX_CONFIG_NUMBER:
        raise InteropError(f"{CONFIG_NAME} field {key!r} = {value!r} is not a finite number of at most "
                           f"{MAX_CONFIG_NUMBER:g}")
    return kind(value)


def check_module_shapes(dims: dict[str, tuple[int, int]], shapes: dict[str, tuple[int, int]]) -> None:
    """BaseMismatch naming the first adapted module the base lacks, or whose (in, out) differs, with both shapes."""
    for path, d in dims.items():
        if path not in shapes:
            raise BaseMismatch(f"module {path!r} is not a Linear / Conv1D module of the base model")
        if tuple(shapes[path]) != tuple(d):
            raise BaseMismatch(f"module {path}: adapter has (in, out)={tuple(d)}, base model has {tuple(shapes[path])}")


def _adalora_layers(modules: dict, config: dict) -> tuple[dict, dict, int, float]:
    init_r = config_number(config, "init_r", int)
    pattern = config.get("rank_pattern") or {}
    shapes, layers = {}, {}
    for path, parts in modules.items():
        A, B = _module_tensors(path, parts, ("lora_A", "lora_E", "lora_B"))
        r = A.shape[0]
        E = parts["lora_E"]
        if tuple(E.shape) != (r, 1):
            raise InteropError(f"module {path}: lora_E has shape {tuple(E.shape)}, expected ({r}, 1)")
        kept = pattern.get(f"{path}.lora_E")
        if kept is not None and not isinstance(kept, list):
            raise InteropError(f"rank_pattern[{path}.lora_E] must be a list of booleans, got {kept!r}")
        expected = init_r if kept is None else sum(bool(k) for k in kept)
        if kept is not None and len(kept) != init_r:
            raise InteropError(f"rank_pattern[{path}.lora_E] has {len(kept)} entries, expected init_r={init_r}")
        if r != expected:
            raise InteropError(f"module {path}: tensors have rank {r}, rank_pattern / init_r say {expected}")
        shapes[path] = (A.shape[1], B.shape[0])
        if r > 0:
            layers[path] = AdapterLayer(P=B.float().contiguous(), lam=E[:, 0].float().contiguous(), Q=A.float().contiguous())
    return shapes, layers, init_r, config_number(config, "lora_alpha")


def _lora_scale(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def _lora_layers(modules: dict, config: dict) -> tuple[dict, dict, int, float]:
    """One global scale s0 = lora_alpha / r (config defaults); layer scale / s0 goes into lam."""
    r0, alpha0 = config_number(config, "r", int), config_number(config, "lora_alpha")
    if r0 < 1 or alpha0 <= 0:
        raise InteropError(f"LoRA config needs r >= 1 and lora_alpha > 0 (got r={r0}, lora_alpha={alpha0})")
    rslora = bool(config.get("use_rslora"))
    alpha_pattern = config.get("alpha_pattern") or {}
    s0 = _lora_scale(alpha0, r0, rslora)
    shapes, layers = {}, {}
    for path, parts in modules.items():
        A, B = _module_tensors(path, parts, LORA_PARTS)
        r = A.shape[0]
        shapes[path] = (A.shape[1], B.shape[0])
        if r == 0:
            continue
        key = pattern_key(alpha_pattern, path)
        alpha = config_number(alpha_pattern, key) if key is not None else alpha0
        if alpha <= 0:
            raise InteropError(f"alpha_pattern[{key!r}] = {alpha_pattern[key]!r}: a LoRA alpha must be > 0")
        lam = torch.full((r,), _lora_scale(alpha, r, rslora) / s0)
        layers[path] = AdapterLayer(P=B.float().contiguous(), lam=lam, Q=A.float().contiguous())
    return shapes, layers, r0, s0 * r0


def _head_labels(head: dict[str, torch.Tensor], labels: list[str] | None) -> list[str]:
    weights = [t for name, t in head.items() if name.endswith(".weight") and t.dim() == 2]
    if not weights:
        raise InteropError("a SEQ_CLS adapter needs its classification head (modules_to_save) tensors")
    n = weights[0].shape[0]
    if labels is None:
        return [f"LABEL_{i}" for i in range(n)]
    if len(labels) != n:
        raise InteropError(f"{len(labels)} labels given but the head has {n} outputs: pass {n} label names")
    return list(labels)


def from_peft(
    state_dict: dict[str, torch.Tensor],
    config: dict,
    base: dict,
    shapes: dict[str, tuple[int, int]] | None,
    labels: list[str] | None = None,
    task_type: str | None = None,
) -> Adapter:
    """Native Adapter from a PEFT state dict and adapter_config dict.

    `base` is the base identity; `shapes` the base model's linear modules {path: (in, out)} to check
    against (None skips the check). `task_type` overrides PEFT's task_type.
    """
    peft_type = _check_config(config)
    _check_keys(list(state_dict), config)
    task = task_type or config_task(config, None)
    if task is None:
        raise InteropError(
            f"PEFT task_type is null and no base model tells the task: pass the task (one of {sorted(TASK_TO_PEFT)}) "
            f"or the base model folder")
    parts = ADALORA_PARTS if peft_type == "ADALORA" else LORA_PARTS
    modules, head = _split_keys(state_dict, parts, _head_names(config))
    if not modules:
        raise InteropError("no adapter tensors found (no lora_A / lora_B keys)")
    build = _adalora_layers if peft_type == "ADALORA" else _lora_layers
    mod_shapes, layers, init_r, alpha = build(modules, config)
    if shapes is not None:
        check_module_shapes(mod_shapes, shapes)
    if task == "seq-cls":
        labels = _head_labels(head, labels)
    elif head:
        raise InteropError(f"head tensors {sorted(head)[:3]} given for task {task!r}; only seq-cls adapters carry a head")
    adapter = Adapter(
        base=base, shapes=mod_shapes, layers=layers, init_r=init_r, lora_alpha=alpha,
        mode="adalora" if peft_type == "ADALORA" else "lora", task_type=task,
        labels=labels if task == "seq-cls" else None, head={k: v.float().contiguous() for k, v in head.items()},
        info={"imported_from": f"peft {peft_type}", "peft_base_model": config.get("base_model_name_or_path")},
    )
    try:
        validate(adapter, source="PEFT adapter")
    except AdapterFormatError as e:
        raise InteropError(str(e)) from e
    return adapter


# ---------------------------------------------------------------- directories


def detect_format(path: str | os.PathLike) -> str:
    """'native' (DIR/adapter.safetensors with the manifest, or that file) or 'peft' (adapter_config.json +
    adapter_model.safetensors); anything else is an InteropError saying what was expected."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such adapter file or directory")
    native = adapter_file(path)
    if native.is_file() and (path.is_file() or native.name == FILE_NAME):
        read_manifest(native)  # raises a precise error for a broken native file
        return "native"
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        if (path / WEIGHTS_NAME).is_file():
            return "peft"
        if (path / "adapter_model.bin").is_file():
            raise InteropError(f"{path}: PEFT .bin weights are not supported; re-save with save_pretrained(safe_serialization=True)")
        raise InteropError(f"{path}: has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    raise InteropError(
        f"{path}: unknown adapter format: expected {FILE_NAME} (native) or {CONFIG_NAME} + {WEIGHTS_NAME} (PEFT)"
    )


def read_peft(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict, dict | None]:
    """(state_dict, adapter_config, embedded native metadata or None) of a PEFT directory. The config and the
    key names are checked before any tensor is read, so an unsupported variant is refused without allocating."""
    path = Path(path)
    try:
        config = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, OSError) as e:
        raise InteropError(f"{path / CONFIG_NAME}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from e
    try:
        _check_config(config)
    except InteropError as e:
        raise InteropError(f"{path / CONFIG_NAME}: {e}") from e
    weights = path / WEIGHTS_NAME
    try:
        _check_keys([k for k in read_header(weights) if k != "__metadata__"], config)  # before any tensor is read
        state, metadata = read_file(weights)  # owns its bytes: no memory map of the store's file
    except (OSError, ValueError) as e:
        if isinstance(e, InteropError):
            raise
        raise InteropError(f"{weights}: not a readable safetensors file ({e})") from e
    raw = metadata.get(NATIVE_META_KEY)
    try:
        native = json.loads(raw) if raw else None
    except (json.JSONDecodeError, RecursionError) as e:
        raise InteropError(f"{path / WEIGHTS_NAME}: its {NATIVE_META_KEY!r} metadata is not valid JSON ({e})") from e
    problem = None if native is None else native_problem(native)
    if problem:
        raise InteropError(f"{path / WEIGHTS_NAME}: its {NATIVE_META_KEY!r} metadata {problem}")
    return state, config, native


def native_problem(native: object) -> str | None:
    """What is wrong with the native metadata save_peft embeds (its fields and their types), or None."""
    if not isinstance(native, dict):
        return "is not a JSON object"
    meta = {"modules": {}, **native}  # the embedded copy lists no modules: the PEFT tensors say them
    problem = manifest_problem(meta)
    if problem:
        return problem
    if native["task_type"] not in TASK_TYPES:
        return f"field 'task_type' must be one of {TASK_TYPES}, got {native['task_type']!r:.100}"
    return None


def config_task(config: dict, native: dict | None) -> str | None:
    """The task an adapter states itself (save_peft's metadata, else PEFT's task_type); None when task_type is null."""
    if native is not None and native.get("task_type") is not None:
        return native["task_type"]
    peft_task = config.get("task_type")
    if peft_task is None:
        return None
    if not isinstance(peft_task, str) or peft_task not in PEFT_TO_TASK:
        raise InteropError(f"PEFT task_type {peft_task!r} is not supported: adapters of task_type null or one of "
                           f"{sorted(PEFT_TO_TASK)} convert")
    return PEFT_TO_TASK[peft_task]


def base_task(base_model_dir: str | os.PathLike, has_head: bool) -> str:
    """The task of an adapter that states none, from what it is used with: seq-cls when it carries a classifier
    head, causal-lm on a causal LM base (is_causal_lm), feature-extraction on any other."""
    if has_head:
        return "seq-cls"
    return "causal-lm" if is_causal_lm(_base_config(base_model_dir)) else "feature-extraction"


def _base_config(base_model_dir: str | os.PathLike):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(base_model_dir))
    except (OSError, ValueError) as e:
        raise InteropError(f"base model {base_model_dir}: cannot read a transformers config there ({e})") from e


def base_skeleton(base_model_dir: str | os.PathLike, task_type: str) -> torch.nn.Module:
    """The base model built from its config on the meta device (no weights read): identity and shapes."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    classes = {"seq-cls": AutoModelForSequenceClassification, "causal-lm": AutoModelForCausalLM,
               "feature-extraction": AutoModel}
    config = _base_config(base_model_dir)
    with torch.device("meta"):
        return classes[task_type].from_config(config)


def local_base(config: dict) -> Path | None:
    """base_model_name_or_path when it names a model folder on this machine (a hub name is never fetched)."""
    name = config.get("base_model_name_or_path")
    if isinstance(name, str) and name and (Path(name) / "config.json").is_file():
        return Path(name)
    return None


def linear_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {name: linear_dims(m) for name, m in model.named_modules() if name and isinstance(m, ADAPTABLE)}


def _config_labels(*dirs: Path | None) -> list[str] | None:
    """id2label of the first config.json among `dirs` that names non-default labels."""
    for d in dirs:
        file = d / "config.json" if d is not None else None
        if file is None or not file.is_file():
            continue
        id2label = json.loads(file.read_text()).get("id2label") or {}
        names = [id2label[k] for k in sorted(id2label, key=int)]
        if names and names != [f"LABEL_{i}" for i in range(len(names))]:
            return names
    return None


def load_peft(
    path: str | os.PathLike,
    base_model_dir: str | os.PathLike | None = None,
    labels: list[str] | None = None,
    task_type: str | None = None,
    require_base: bool = True,
) -> Adapter:
    """Read a PEFT AdaLoRA / LoRA directory as a native Adapter.

    The base (identity, and module shapes to check) is `base_model_dir`; else, for a directory written by
    save_peft, the embedded native metadata; else the folder base_model_name_or_path names when it
    exists on this machine and fits the adapter's module shapes. require_base=False (inspect) accepts none of
    them and leaves config_sha256 None. The task type comes from, in order: `task_type`, the adapter's own
    config, the base (base_task). info[TASK_SOURCE] says which.
    """
    path = Path(path)
    state, config, native = read_peft(path)
    has_head = any(_is_head(key, _head_names(config)) for key in state)
    try:
        task = task_type or config_task(config, native)
    except InteropError as e:
        raise InteropError(f"{path}: {e}") from e
    source = "--task" if task_type else "adapter config" if task else None
    found = local_base(config) if base_model_dir is None and native is None else None
    base_dir = base_model_dir if base_model_dir is not None else found
    if base_dir is not None:
        if task is None:
            task, source = base_task(base_dir, has_head), f"base model {base_dir}"
        model = base_skeleton(base_dir, task)
        base, shapes = base_identity(model), linear_shapes(model)
        problem = None if native is None else base_mismatch(native["base"], base)
        if problem:
            raise BaseMismatch(f"{path}: {problem}, the base of {base_dir}")
    elif native is not None:
        base, shapes = native["base"], None
    elif require_base:
        raise InteropError(
            f"{path}: a PEFT adapter does not record its base model's identity and its base_model_name_or_path "
            f"{config.get('base_model_name_or_path')!r} is no model folder on this machine; pass --base-model DIR "
            f"(the base model folder)"
        )
    else:
        base = {"name": str(config.get("base_model_name_or_path")), "model_type": "unknown", "config_sha256": None}
        shapes = None
        if task is None:
            task = "seq-cls" if has_head else "causal-lm"
            source = "guessed: adapter_config.json has no task_type and no base model was given (pass --task)"
    if labels is None:
        labels = (native or {}).get("labels") or _config_labels(path, Path(base_dir) if base_dir else None)
    try:
        adapter = from_peft(state, config, base, shapes, labels=labels, task_type=task)
    except BaseMismatch as e:
        if found is not None:
            raise InteropError(f"{path}: its base_model_name_or_path {found} does not fit it ({e}); pass "
                               f"--base-model DIR (the base model folder)") from e
        raise BaseMismatch(f"{path}: {e}") from e
    except InteropError as e:
        raise InteropError(f"{path}: {e}") from e
    adapter.info[TASK_SOURCE] = source
    if native is not None:
        adapter = _restore_native(adapter, native, path)
    return adapter


def _restore_native(adapter: Adapter, native: dict, path: Path) -> Adapter:
    """Put back init_r / lora_alpha / mode / info written by save_peft; the tensors must be unchanged."""
    try:
        adapter.init_r, adapter.lora_alpha = int(native["init_r"]), float(native["lora_alpha"])
        adapter.mode, adapter.info = str(native["mode"]), dict(native.get("info") or {})
    except (KeyError, TypeError, ValueError) as e:
        raise InteropError(f"{path}: its {NATIVE_META_KEY!r} metadata lacks or garbles a field ({e!r})") from e
    if tensors_sha256(to_tensors(adapter)) != native["tensors_sha256"]:
        raise InteropError(f"{path}: tensor data does not match the sha256 recorded by save_peft (file edited?)")
    return adapter


def load_any(path: str | os.PathLike, base_model_dir: str | os.PathLike | None = None, **kwargs) -> Adapter:
    """A native or PEFT adapter as a native Adapter (format auto-detected); kwargs go to load_peft."""
    if detect_format(path) == "native":
        return load_adapter(path)
    return load_peft(path, base_model_dir=base_model_dir, **kwargs)
