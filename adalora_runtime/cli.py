"""`adalora` console command: each subcommand is a module in adalora_runtime.commands (or server/, tools/).

A subcommand module defines NAME, HELP, add_arguments(parser) and run(args) -> int.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from adalora_runtime.adapter_file import AdapterFormatError
from adalora_runtime.config import ConfigError

COMMANDS = (
    "adalora_runtime.commands.prepare",
    "adalora_runtime.commands.train",
    "adalora_runtime.commands.inspect",
    "adalora_runtime.commands.convert",
    "adalora_runtime.commands.demo",
    "tools.merge_cli",
    "server.commands.serve",
    "server.commands.generate",
    "server.commands.classify",
    "server.commands.upload",
)
# Errors whose message is the whole story for the user: printed without a traceback, exit 2.
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, AdapterFormatError, FileNotFoundError)


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="adalora", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name in COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # a subcommand not written yet
                continue
            raise
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        modules[module.NAME] = module
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    module = modules[args.command]
    extra = tuple(getattr(module, "USER_ERRORS", ()))
    try:
        return int(module.run(args) or 0)
    except USER_ERRORS + extra as e:
        print(f"adalora {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
