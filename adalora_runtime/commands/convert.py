"""`adalora convert`: native <-> PEFT adapter directories (source format auto-detected)."""

from __future__ import annotations

import argparse
from pathlib import Path

from adalora import peft_interop
from adalora.adapter_file import save_adapter

NAME = "convert"
HELP = ("Convert an adapter between the native format and a PEFT AdaLoRA directory (PEFT LoRA imports too), or "
        "export it as a plain PEFT LoRA for other LoRA servers (--to peft-lora).")
WRITERS = {"native": save_adapter, "peft": peft_interop.save_peft, "peft-lora": peft_interop.save_peft_lora}
USER_ERRORS = (peft_interop.InteropError,)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="adapter directory (native or PEFT; detected)")
    parser.add_argument("dst", help="output directory (written atomically; must not exist unless --force)")
    parser.add_argument("--to", required=True, choices=sorted(WRITERS),
                        help="output format: native, peft (AdaLoRA, exact round trip) or peft-lora (plain LoRA with "
                             "lambda and scales folded in, exact in PEFT and in servers that read one global scale)")
    parser.add_argument("--base-model", default=None,
                        help="base model folder (a PEFT source: base identity and module shapes; default: the local "
                             "folder its base_model_name_or_path names, when that fits)")
    parser.add_argument("--labels", default=None, help="comma-separated label names for a PEFT seq-cls import")
    parser.add_argument("--task", default=None, choices=sorted(peft_interop.TASK_TO_PEFT),
                        help="task type, overriding the adapter's (default: its task_type, else the base model's kind)")
    parser.add_argument("--force", action="store_true", help="replace an existing DST (never SRC)")


def check_destination(src: Path, dst: Path, force: bool) -> None:
    s, d = src.resolve(), dst.resolve()
    if d == s or d in s.parents or s in d.parents:
        raise peft_interop.InteropError(
            f"DST {dst} is, contains or lies inside the source adapter {src}: choose another output directory"
        )
    if dst.exists() and not force:
        raise peft_interop.InteropError(f"DST {dst} already exists: remove it or pass --force to replace it")


def run(args: argparse.Namespace) -> int:
    src, dst = Path(args.src), Path(args.dst)
    source_format = peft_interop.detect_format(src)
    if source_format == args.to:
        raise peft_interop.InteropError(f"{src} is already in {args.to} format: nothing to convert")
    check_destination(src, dst, args.force)
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    adapter = peft_interop.load_any(src, base_model_dir=args.base_model, labels=labels, task_type=args.task)
    WRITERS[args.to](adapter, dst)
    ranks = adapter.ranks()
    print(f"converted {src} ({source_format}) -> {dst} ({args.to}): {len(ranks)} modules, "
          f"{sum(ranks.values())} ranks, {adapter.num_params()} params")
    return 0
