"""`adalora inspect`: what an adapter (native or PEFT) holds, as text or JSON."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from adalora import peft_interop
from adalora.adapter import Adapter
from adalora.adapter_file import tensors_sha256, to_tensors

NAME = "inspect"
HELP = "Show an adapter's base, task, mode, ranks per layer, sizes and tensor sha256 (native or PEFT)."
USER_ERRORS = (peft_interop.InteropError,)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="adapter directory (native or PEFT) or native .safetensors file")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--base-model", default=None, help="base model folder (PEFT: computes the base identity)")
    parser.add_argument("--task", default=None, choices=sorted(peft_interop.TASK_TO_PEFT),
                        help="task type of a PEFT adapter, overriding its task_type")


def split_path(path: str) -> tuple[str, str]:
    """(layer index, module path after it) from a module path; ('-', path) when it has no index."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if re.fullmatch(r"\d+", part):
            return part, ".".join(parts[i + 1:])
    return "-", path


def short_kinds(kinds: list[str]) -> dict[str, str]:
    """Each kind shortened to its shortest dotted suffix that is still unique among `kinds`."""
    out = {}
    for kind in kinds:
        parts = kind.split(".")
        for n in range(1, len(parts) + 1):
            short = ".".join(parts[-n:])
            if sum(1 for k in kinds if k == short or k.endswith("." + short)) == 1:
                break
        out[kind] = short
    return out


def rank_table(ranks: dict[str, float]) -> tuple[list[str], list[tuple[str, list[float | None]]]]:
    """(column kinds, rows of (layer index, value per kind or None)) in model order: per-module ranks or scales."""
    split = {path: split_path(path) for path in ranks}
    full_kinds = list(dict.fromkeys(kind for _, kind in split.values()))
    names = short_kinds(full_kinds)
    cells: dict[str, dict[str, float]] = {}
    for path, (index, kind) in split.items():
        cells.setdefault(index, {})[names[kind]] = ranks[path]
    columns = [names[k] for k in full_kinds]
    return columns, [(index, [row.get(c) for c in columns]) for index, row in cells.items()]


def describe(adapter: Adapter, fmt: str, path: Path) -> dict:
    files = [path] if path.is_file() else [f for f in path.iterdir() if f.is_file()]
    columns, rows = rank_table(adapter.ranks())
    scales = adapter.module_scales()
    return {
        "path": str(path),
        "format": fmt,
        "base": adapter.base,
        "task_type": adapter.task_type,
        "mode": adapter.mode,
        "init_r": adapter.init_r,
        "lora_alpha": adapter.lora_alpha,
        "scale": adapter.scale,
        "modules": len(adapter.shapes),
        "total_rank": sum(adapter.ranks().values()),
        "ranks": adapter.ranks(),
        "scales": scales,
        "task_source": adapter.info.get(peft_interop.TASK_SOURCE, "adapter file"),
        "rank_table": {"columns": columns, "rows": {index: cells for index, cells in rows}},
        "num_params": adapter.num_params(),
        "head_params": adapter.head_params(),
        "bytes_on_disk": sum(f.stat().st_size for f in files),
        "tensors_sha256": tensors_sha256(to_tensors(adapter)),
        "labels": adapter.labels,
    }


def table_lines(columns: list[str], rows, cell) -> list[str]:
    """A layer x module-kind table; `cell` formats one value (None: the layer has no such module)."""
    width = max([5, *(len(c) for c in columns), *(len(cell(v)) for _, values in rows for v in values)])
    lines = ["layer " + " ".join(c.rjust(width) for c in columns)]
    for index, values in rows:
        lines.append(index.rjust(5) + " " + " ".join(cell(v).rjust(width) for v in values))
    return lines


def format_text(d: dict) -> str:
    columns, rows = d["rank_table"]["columns"], list(d["rank_table"]["rows"].items())
    sha = d["base"].get("config_sha256")
    distinct = sorted(set(d["scales"].values()))
    scale = f"{d['scale']:.6g}" if distinct == [d["scale"]] else "per module, below"
    lines = [
        f"adapter      {d['path']} ({d['format']})",
        f"base         {d['base'].get('name')} ({d['base'].get('model_type')}, config sha256 "
        f"{sha[:16] if isinstance(sha, str) else 'unknown: pass --base-model'})",
        f"task / mode  {d['task_type']} / {d['mode']}   (task from {d['task_source']})",
        f"init_r       {d['init_r']}   lora_alpha {d['lora_alpha']:g}   scale {scale}",
        f"ranks        {d['total_rank']} over {d['modules']} modules",
        "",
        *table_lines(columns, rows, lambda v: "." if v is None else str(v)),
    ]
    if distinct != [d["scale"]]:
        scale_columns, scale_rows = rank_table(d["scales"])
        lines += ["", "scale per module (lora_alpha / r of each, as it runs)",
                  *table_lines(scale_columns, scale_rows, lambda v: "." if v is None else f"{v:.4g}")]
    lines += [
        "",
        f"params       {d['num_params']:,} adapter + {d['head_params']:,} head",
        f"on disk      {d['bytes_on_disk']:,} bytes",
        f"sha256       {d['tensors_sha256']}",
        f"labels       {', '.join(d['labels']) if d['labels'] else '-'}",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    path = Path(args.adapter)
    fmt = peft_interop.detect_format(path)
    adapter = peft_interop.load_any(path, base_model_dir=args.base_model, require_base=False, task_type=args.task)
    d = describe(adapter, fmt, path)
    print(json.dumps(d, indent=2, sort_keys=True) if args.json else format_text(d))
    return 0
