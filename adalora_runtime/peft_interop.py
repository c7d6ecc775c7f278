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
from safetensors import safe_open
from safetensors.torch import save_file

from adalora_runtime.adapter import Adapter, AdapterLayer, base_identity
from adalora_runtime.adapter_file import (
    FILE_NAME, AdapterFormatError, adapter_file, load_adapter, read_manifest, tensors_sha256, to_tensors, validate,
)
from adalora_runtime.atomic import atomic_dir
from adalora_runtime.layers import ADAPTABLE, linear_dims

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
UNSUPPORTED_CONFIG = {"use_dora": False, "lora_bias": False, "bias": "none", "use_qalora": False,
                      "trainable_token_indices": None, "target_parameters": None, "layer_replication": None}


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


def _check_config(config: dict) -> str:
    peft_type = config.get("peft_type")
    if peft_type not in ("ADALORA", "LORA"):
        raise InteropError(f"peft_type {peft_type!r} is not supported: only ADALORA and LORA adapters convert")
    for key, default in UNSUPPORTED_CONFIG.items():
        value = config.get(key, default)
        if value != default and not (default is None and value in ({}, [])):
            what = "DoRA" if key == "use_dora" else f"{key}={value!r}"
            raise InteropError(f"{what} cannot be represented in the SVD form (needs {key}={default!r})")
    return peft_type


def _split_keys(state: dict[str, torch.Tensor], parts: tuple[str, ...], head_names: set[str]):
    """{path: {part: tensor}} for adapter tensors and {name.param: tensor} for the head."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    head: dict[str, torch.Tensor] = {}
    for key in state:  # name an unsupported variant before any other complaint about its keys
        for marker, what in UNSUPPORTED_KEYS.items():
            if f".{marker}" in f".{key}":
                raise InteropError(f"key {key!r} belongs to {what}, which cannot be represented in the SVD form")
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


def _adalora_layers(modules: dict, config: dict) -> tuple[dict, dict, int, float]:
    init_r = int(config.get("init_r") or 0)
    pattern = config.get("rank_pattern") or {}
    shapes, layers = {}, {}
    for path, parts in modules.items():
        A, B = _module_tensors(path, parts, ("lora_A", "lora_E", "lora_B"))
        r = A.shape[0]
        E = parts["lora_E"]
        if tuple(E.shape) != (r, 1):
            raise InteropError(f"module {path}: lora_E has shape {tuple(E.shape)}, expected ({r}, 1)")
        kept = pattern.get(f"{path}.lora_E")
        expected = init_r if kept is None else sum(bool(k) for k in kept)
        if kept is not None and len(kept) != init_r:
            raise InteropError(f"rank_pattern[{path}.lora_E] has {len(kept)} entries, expected init_r={init_r}")
        if r != expected:
            raise InteropError(f"module {path}: tensors have rank {r}, rank_pattern / init_r say {expected}")
        shapes[path] = (A.shape[1], B.shape[0])
        if r > 0:
            layers[path] = AdapterLayer(P=B.float().contiguous(), lam=E[:, 0].float().contiguous(), Q=A.float().contiguous())
    return shapes, layers, init_r, float(config.get("lora_alpha") or 0)


def _lora_scale(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def _lora_layers(modules: dict, config: dict) -> tuple[dict, dict, int, float]:
    """One global scale s0 = lora_alpha / r (config defaults); layer scale / s0 goes into lam."""
    r0, alpha0 = int(config.get("r") or 0), float(config.get("lora_alpha") or 0)
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
        alpha = float(alpha_pattern[key]) if key is not None else alpha0
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
    task = task_type or PEFT_TO_TASK.get(config.get("task_type"))
    if task is None:
        raise InteropError(
            f"PEFT task_type {config.get('task_type')!r} has no native equivalent; pass the task "
            f"(one of {sorted(TASK_TO_PEFT)})"
        )
    head_names = set(config.get("modules_to_save") or ())
    parts = ADALORA_PARTS if peft_type == "ADALORA" else LORA_PARTS
    modules, head = _split_keys(state_dict, parts, head_names)
    if not modules:
        raise InteropError("no adapter tensors found (no lora_A / lora_B keys)")
    build = _adalora_layers if peft_type == "ADALORA" else _lora_layers
    mod_shapes, layers, init_r, alpha = build(modules, config)
    if shapes is not None:
        for path, dims in mod_shapes.items():
            if path not in shapes:
                raise BaseMismatch(f"module {path!r} is not a Linear / Conv1D module of the base model")
            if tuple(shapes[path]) != tuple(dims):
                raise BaseMismatch(f"module {path}: adapter has (in, out)={dims}, base model has {tuple(shapes[path])}")
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
    validate(adapter, source="PEFT adapter")
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
    """(state_dict, adapter_config, embedded native metadata or None) of a PEFT directory."""
    path = Path(path)
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except json.JSONDecodeError as e:
        raise InteropError(f"{path / CONFIG_NAME}: not valid JSON ({e})") from e
    try:
        with safe_open(str(path / WEIGHTS_NAME), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
            raw = (f.metadata() or {}).get(NATIVE_META_KEY)
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise InteropError(f"{path / WEIGHTS_NAME}: not a readable safetensors file ({e})") from e
    return state, config, (json.loads(raw) if raw else None)


def base_skeleton(base_model_dir: str | os.PathLike, task_type: str) -> torch.nn.Module:
    """The base model built from its config on the meta device (no weights read): identity and shapes."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    classes = {"seq-cls": AutoModelForSequenceClassification, "causal-lm": AutoModelForCausalLM,
               "feature-extraction": AutoModel}
    try:
        config = AutoConfig.from_pretrained(str(base_model_dir))
    except (OSError, ValueError) as e:
        raise InteropError(f"--base-model {base_model_dir}: cannot read a transformers config there ({e})") from e
    with torch.device("meta"):
        return classes[task_type].from_config(config)


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

    The base identity comes from `base_model_dir` (its module shapes are checked too) or, for a
    directory written by save_peft, from the embedded native metadata; require_base=False (inspect)
    accepts neither and leaves config_sha256 None.
    """
    path = Path(path)
    state, config, native = read_peft(path)
    task = task_type or (native or {}).get("task_type")
    if task is None:
        task = PEFT_TO_TASK.get(config.get("task_type"))
    if base_model_dir is not None:
        if task is None:
            raise InteropError(f"{path}: PEFT task_type {config.get('task_type')!r} is unknown: pass the task type")
        model = base_skeleton(base_model_dir, task)
        base, shapes = base_identity(model), linear_shapes(model)
        if native is not None and native["base"].get("config_sha256") != base["config_sha256"]:
            raise BaseMismatch(f"{path}: adapter was made for base {native['base'].get('name')!r}, not {base_model_dir}")
    elif native is not None:
        base, shapes = native["base"], None
    elif require_base:
        raise InteropError(
            f"{path}: a PEFT adapter does not record its base model's identity (base_model_name_or_path="
            f"{config.get('base_model_name_or_path')!r}); pass --base-model DIR (the base model folder)"
        )
    else:
        base = {"name": str(config.get("base_model_name_or_path")), "model_type": "unknown", "config_sha256": None}
        shapes = None
    if labels is None:
        labels = (native or {}).get("labels") or _config_labels(path, Path(base_model_dir) if base_model_dir else None)
    try:
        adapter = from_peft(state, config, base, shapes, labels=labels, task_type=task)
    except InteropError as e:
        raise type(e)(f"{path}: {e}") from e  # keeps BaseMismatch apart from a malformed file
    if native is not None:
        adapter = _restore_native(adapter, native, path)
    return adapter


def _restore_native(adapter: Adapter, native: dict, path: Path) -> Adapter:
    """Put back init_r / lora_alpha / mode / info written by save_peft; the tensors must be unchanged."""
    adapter.init_r, adapter.lora_alpha = int(native["init_r"]), float(native["lora_alpha"])
    adapter.mode, adapter.info = native["mode"], native.get("info", {})
    if tensors_sha256(to_tensors(adapter)) != native["tensors_sha256"]:
        raise InteropError(f"{path}: tensor data does not match the sha256 recorded by save_peft (file edited?)")
    return adapter


def load_any(path: str | os.PathLike, base_model_dir: str | os.PathLike | None = None, **kwargs) -> Adapter:
    """A native or PEFT adapter as a native Adapter (format auto-detected); kwargs go to load_peft."""
    if detect_format(path) == "native":
        return load_adapter(path)
    return load_peft(path, base_model_dir=base_model_dir, **kwargs)
