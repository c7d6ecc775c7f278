"""`adalora` console command: train, inspect, convert and merge adapters, serve them and call the server.

Each subcommand is a module in adalora.commands, adalora.server.commands or adalora.tools. The CLI sits on top:
it is the one module of the library folder that may import the server and the tools (tests/test_layout.py
checks that no other does).

A subcommand module defines NAME, HELP, add_arguments(parser) and run(args) -> int.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from adalora.adapter_file import AdapterFormatError
from adalora.config import ConfigError

COMMANDS = (
    "adalora.commands.prepare",
    "adalora.commands.train",
    "adalora.commands.inspect",
    "adalora.commands.convert",
    "adalora.server.commands.demo",
    "adalora.tools.merge_cli",
    "adalora.server.commands.serve",
    "adalora.server.commands.serve_ray",
    "adalora.server.commands.generate",
    "adalora.server.commands.classify",
    "adalora.server.commands.upload",
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
