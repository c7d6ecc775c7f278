"""The native compact adapter file: one safetensors file whose header metadata holds the JSON manifest.

Tensors: `layers.<module path>.{P,lam,Q}` at each module's kept rank (modules at rank 0 have none),
`head.<name>` for a classification head. Metadata key "adalora": format version, base identity,
module shapes and ranks, init_r, lora_alpha, task type, labels, provenance, and the sha256 of the
tensor data (verified on load).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from adalora.config import is_int
from adalora.adapter import TASK_TYPES, Adapter, AdapterLayer
from adalora.atomic import atomic_file
from adalora.delta import fold
from adalora.safetensors_stream import StreamWriter, read_file, read_header

FORMAT = "adalora-native"
FORMAT_VERSION = 1
FILE_NAME = "adapter.safetensors"
METADATA_KEY = "adalora"


MODES = ("adalora", "lora")
"""How an adapter was trained: lambda learned (adalora) or fixed (lora, lambda holding a LoRA import's scales)."""
MAX_ALPHA = 1e6
"""Largest lora_alpha an adapter may declare."""
MAX_SCALE = 1e4
"""Largest scale lora_alpha / init_r."""
MAX_FOLDED = 1e6
"""Largest |entry| of lambda * scale * Q, the factor serving multiplies inputs by: far beyond any trained adapter,
far below where a float32 (or float16 after the other factor) forward overflows."""


class AdapterFormatError(ValueError):
    """An adapter file is malformed or inconsistent; the message names the file and the problem."""


class TensorDigest:
    """sha256 of names, dtypes, shapes and bytes of tensors added in sorted name order."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.contiguous().cpu()
        self._h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            self._h.update(t.reshape(-1).view(torch.uint8).numpy().data)  # 1-D: a size-1 last dim may have any stride

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Digest of names, dtypes, shapes and bytes, in sorted name order (independent of file layout)."""
    digest = TensorDigest()
    for name in sorted(tensors):
        digest.add(name, tensors[name])
    return digest.hexdigest()


def adapter_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / FILE_NAME if path.is_dir() else path


def to_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    tensors = {}
    for path, layer in adapter.layers.items():
        for name in ("P", "lam", "Q"):
            tensors[f"layers.{path}.{name}"] = getattr(layer, name).detach().cpu().contiguous()
    for name, t in adapter.head.items():
        tensors[f"head.{name}"] = t.detach().cpu().contiguous()
    return tensors


def manifest(adapter: Adapter, tensors: dict[str, torch.Tensor]) -> dict:
    return _manifest(adapter, adapter.ranks(), adapter.num_params(), tensors_sha256(tensors))


def _manifest(adapter: Adapter, ranks: dict[str, int], num_params: int, sha256: str) -> dict:
    """The manifest of `adapter` with these ranks, parameter count and tensor digest (its layers unread)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base": adapter.base,
        "mode": adapter.mode,
        "task_type": adapter.task_type,
        "init_r": adapter.init_r,
        "lora_alpha": adapter.lora_alpha,
        "modules": {p: {"in": s[0], "out": s[1], "rank": ranks[p]} for p, s in adapter.shapes.items()},
        "labels": adapter.labels,
        "info": adapter.info,
        "num_params": num_params,
        "tensors_sha256": sha256,
    }


def save_adapter(adapter: Adapter, out: str | os.PathLike) -> Path:
    """Write DIR/adapter.safetensors atomically (temp file, fsync, rename); returns the file path."""
    validate(adapter, source=str(out))
    target = Path(out) / FILE_NAME if not str(out).endswith(".safetensors") else Path(out)
    tensors = to_tensors(adapter)
    meta = {METADATA_KEY: json.dumps(manifest(adapter, tensors), sort_keys=True)}
    with atomic_file(target) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return target


PENDING_SHA256 = "sha256-pending".ljust(64, "-")
"""The manifest's tensors_sha256 while a streamed file's data is written (as long as a digest)."""


def save_adapter_streamed(adapter: Adapter, ranks: dict[str, int], layers: Iterable[tuple[str, AdapterLayer]],
                          out: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
    """save_adapter for an adapter whose layers arrive one at a time (a merge's): the same file and manifest,
    holding about one layer at a time. `adapter` gives everything but the layers (its own are ignored);
    `ranks` is each module's rank, known before the first layer (the header comes first); `layers` yields
    (module path, AdapterLayer in `dtype`) once per module of nonzero rank. Written atomically: an error
    (a layer that does not match `ranks`, non-finite values, a failing producer) leaves no file."""
    source = str(out)
    validate(Adapter(base=adapter.base, shapes=adapter.shapes, layers={}, init_r=adapter.init_r,
                     lora_alpha=adapter.lora_alpha, mode=adapter.mode, task_type=adapter.task_type,
                     labels=adapter.labels, head=adapter.head, info=adapter.info), source)
    unknown = sorted(set(ranks) - set(adapter.shapes))
    if unknown:
        raise AdapterFormatError(f"{source}: ranks given for modules {unknown[:3]} that the adapter does not adapt")
    ranks = {path: ranks.get(path, 0) for path in adapter.shapes}
    specs = {f"head.{name}": (t.dtype, tuple(t.shape)) for name, t in adapter.head.items()}
    for path, r in ranks.items():
        if r:
            in_f, out_f = adapter.shapes[path]
            specs.update({f"layers.{path}.P": (dtype, (out_f, r)), f"layers.{path}.lam": (dtype, (r,)),
                          f"layers.{path}.Q": (dtype, (r, in_f))})
    num_params = sum(r * (adapter.shapes[p][0] + adapter.shapes[p][1] + 1) for p, r in ranks.items())
    meta = {METADATA_KEY: json.dumps(_manifest(adapter, ranks, num_params, PENDING_SHA256), sort_keys=True)}
    target = Path(out) / FILE_NAME if not str(out).endswith(".safetensors") else Path(out)
    digest = TensorDigest()
    with atomic_file(target) as tmp, open(tmp, "wb") as f:
        writer = StreamWriter(f, specs, meta, on_write=digest.add)

        def put(name: str, tensor: torch.Tensor) -> None:
            try:
                writer.put(name, tensor)
            except ValueError as e:  # a tensor that does not match the header written from `ranks`
                raise AdapterFormatError(f"{source}: {e}") from e

        for name, t in adapter.head.items():
            put(f"head.{name}", t)
        for path, layer in layers:
            if path not in adapter.shapes:
                raise AdapterFormatError(f"{source}: layer {path} is not among the adapted modules")
            validate_layer(path, layer, adapter.shapes[path], source)
            for name in ("P", "lam", "Q"):
                put(f"layers.{path}.{name}", getattr(layer, name))
        try:
            writer.finish({PENDING_SHA256: digest.hexdigest()})
        except ValueError as e:
            raise AdapterFormatError(f"{source}: {e}") from e
    return target


def read_manifest(path: str | os.PathLike) -> dict:
    """The JSON manifest alone (only the file's header is read), checked field by field."""
    file = adapter_file(path)
    if not file.is_file():
        raise AdapterFormatError(f"{file}: no such adapter file")
    try:
        metadata = read_header(file).get("__metadata__") or {}
    except (OSError, ValueError) as e:
        raise AdapterFormatError(f"{file}: not a readable safetensors file ({e})") from e
    return manifest_of(metadata, file)


def manifest_of(metadata: dict, file: Path) -> dict:
    """The checked manifest in a safetensors file's metadata; AdapterFormatError names the file and the field."""
    raw = metadata.get(METADATA_KEY)
    if not isinstance(raw, str):
        raise AdapterFormatError(f"{file}: no '{METADATA_KEY}' manifest in the safetensors header (not a native adapter)")
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as e:
        raise AdapterFormatError(f"{file}: manifest is not valid JSON ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(meta, dict):
        raise AdapterFormatError(f"{file}: manifest is a JSON {type(meta).__name__}, expected an object")
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise AdapterFormatError(
            f"{file}: format {meta.get('format')!r} v{meta.get('format_version')} is not {FORMAT!r} v{FORMAT_VERSION}"
        )
    problem = manifest_problem(meta)
    if problem:
        raise AdapterFormatError(f"{file}: manifest {problem}")
    return meta


def manifest_problem(meta: dict) -> str | None:
    """What is wrong with a parsed manifest's fields ("lacks field 'x'" or "field 'x' must be ..."), or None."""
    for name in ("modules", "base", "task_type", "init_r", "lora_alpha", "tensors_sha256"):
        if name not in meta:
            return f"lacks field {name!r}"
    modules = meta["modules"]
    if not isinstance(modules, dict):
        return f"field 'modules' must be an object {{module path: {{in, out, rank}}}}, got {type(modules).__name__}"
    for path, m in modules.items():
        if not isinstance(m, dict) or not (is_int(m.get("in"), 1) and is_int(m.get("out"), 1) and is_int(m.get("rank"), 0)):
            return f"field 'modules.{path}' must be {{\"in\": int >= 1, \"out\": int >= 1, \"rank\": int >= 0}}, " \
                   f"got {m!r:.200}"
    base = meta["base"]
    checks = {
        "base": (isinstance(base, dict) and isinstance(base.get("name", ""), str)
                 and isinstance(base.get("config_sha256"), (str, type(None))),
                 'an object {"name": str, "config_sha256": str or null, ...}'),
        "task_type": (isinstance(meta.get("task_type"), str), "a string"),
        "init_r": (is_int(meta.get("init_r"), 1), "an integer >= 1"),
        "lora_alpha": (isinstance(meta.get("lora_alpha"), (int, float)) and not isinstance(meta.get("lora_alpha"), bool),
                       "a number"),
        "tensors_sha256": (isinstance(meta.get("tensors_sha256"), str), "a string"),
        "labels": (meta.get("labels") is None or (isinstance(meta["labels"], list)
                                                  and all(isinstance(x, str) for x in meta["labels"])),
                   "null or a list of strings"),
        "info": (isinstance(meta.get("info", {}), dict), "an object"),
        "mode": (meta.get("mode", "adalora") in MODES, f"one of {MODES}"),
    }
    for name, (ok, what) in checks.items():
        if not ok:
            return f"field {name!r} must be {what}, got {meta.get(name)!r:.200}"
    return None


def load_adapter(path: str | os.PathLike, verify: bool = True) -> Adapter:
    """Read and validate a native adapter (DIR or the .safetensors file itself). The file is read into memory
    once: the adapter owns its bytes (safetensors_stream.read_file)."""
    file = adapter_file(path)
    if not file.is_file():
        raise AdapterFormatError(f"{file}: no such adapter file")
    try:
        tensors, metadata = read_file(file)
    except (OSError, ValueError) as e:
        raise AdapterFormatError(f"{file}: not a readable safetensors file ({e})") from e
    meta = manifest_of(metadata, file)
    if verify and tensors_sha256(tensors) != meta["tensors_sha256"]:
        raise AdapterFormatError(f"{file}: tensor data does not match its sha256 (file corrupted or edited)")
    try:
        adapter = from_tensors(meta, tensors)
    except KeyError as e:
        raise AdapterFormatError(f"{file}: manifest lacks field {e}") from e
    validate(adapter, source=str(file))
    return adapter


def from_tensors(meta: dict, tensors: dict[str, torch.Tensor]) -> Adapter:
    modules = meta["modules"]
    layers, head, seen = {}, {}, set()
    for path, m in modules.items():
        if m["rank"] == 0:
            continue
        keys = [f"layers.{path}.{n}" for n in ("P", "lam", "Q")]
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise AdapterFormatError(f"module {path} has rank {m['rank']} but tensors {missing} are missing")
        layers[path] = AdapterLayer(*(tensors[k] for k in keys))
        seen.update(keys)
    for key, t in tensors.items():
        if key.startswith("head."):
            head[key[len("head."):]] = t
            seen.add(key)
    extra = sorted(set(tensors) - seen)
    if extra:
        raise AdapterFormatError(f"tensors {extra[:5]} belong to no module listed in the manifest")
    return Adapter(
        base=meta["base"], shapes={p: (m["in"], m["out"]) for p, m in modules.items()}, layers=layers,
        init_r=int(meta["init_r"]), lora_alpha=float(meta["lora_alpha"]), mode=meta.get("mode", "adalora"),
        task_type=meta["task_type"], labels=meta.get("labels"), head=head, info=meta.get("info", {}),
    )


def validate(adapter: Adapter, source: str) -> None:
    """Shapes consistent with the declared modules, ranks as declared, values finite."""
    if adapter.task_type not in TASK_TYPES:
        raise AdapterFormatError(f"{source}: task_type {adapter.task_type!r} is not one of {TASK_TYPES}")
    if adapter.mode not in MODES:
        raise AdapterFormatError(f"{source}: mode {adapter.mode!r} is not one of {MODES}")
    if adapter.init_r < 1 or not 0 < adapter.lora_alpha <= MAX_ALPHA or not 0 < adapter.scale <= MAX_SCALE:
        raise AdapterFormatError(f"{source}: need init_r >= 1, 0 < lora_alpha <= {MAX_ALPHA:g} and a scale "
                                 f"lora_alpha / init_r in (0, {MAX_SCALE:g}]; got init_r={adapter.init_r!r}, "
                                 f"lora_alpha={adapter.lora_alpha!r}")
    for path, layer in adapter.layers.items():
        if path not in adapter.shapes:
            raise AdapterFormatError(f"{source}: layer {path} is not among the adapted modules")
        validate_layer(path, layer, adapter.shapes[path], source)
        A, _ = fold(layer.P.float(), layer.lam.float(), layer.Q.float(), adapter.scale)  # what serving multiplies by
        if A.numel() and not float(A.abs().max()) <= MAX_FOLDED:  # NaN fails the comparison too
            raise AdapterFormatError(f"{source}: {path}: lambda * scale * Q reaches beyond {MAX_FOLDED:g} (or "
                                     f"overflows): the adapter would serve NaN; check lora_alpha and lambda")
    for name, t in adapter.head.items():
        if not torch.isfinite(t).all():
            raise AdapterFormatError(f"{source}: head tensor {name} holds NaN or inf values")
    if adapter.task_type == "seq-cls" and not adapter.labels:
        raise AdapterFormatError(f"{source}: a seq-cls adapter needs its label names")


def validate_layer(path: str, layer: AdapterLayer, shape: tuple[int, int], source: str) -> None:
    """One module's factors: shapes consistent with (in, out) and its rank, a float dtype, finite values."""
    in_f, out_f = shape
    r = layer.rank
    for name, expected in {"P": (out_f, r), "lam": (r,), "Q": (r, in_f)}.items():
        t = getattr(layer, name)
        if tuple(t.shape) != expected:
            raise AdapterFormatError(f"{source}: {path}.{name} has shape {tuple(t.shape)}, expected {expected}")
        if not t.is_floating_point():
            raise AdapterFormatError(f"{source}: {path}.{name} has dtype {t.dtype}, expected a float type")
        if not torch.isfinite(t).all():
            raise AdapterFormatError(f"{source}: {path}.{name} holds NaN or inf values")
