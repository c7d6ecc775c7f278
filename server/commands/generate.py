"""`adalora generate`: one completion from a running server; prints only the generated text (--json: all)."""

from __future__ import annotations

import argparse
import json

from google.protobuf.json_format import MessageToDict

from adalora.server.commands import connect
from adalora.server.commands.rpc_errors import RPC_ERRORS, rpc_call

NAME = "generate"
HELP = "generate with a running `adalora serve`; prints only the generated text (--json for everything)"
USER_ERRORS = RPC_ERRORS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="prompt text")
    p.add_argument("--adapter", default=None, help="adapter id (default: the base model alone)")
    p.add_argument("--max-new-tokens", type=int, default=0, help="most tokens to generate (0 = the server's default)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling (temperature > 0)")
    p.add_argument("--json", action="store_true", help="print the whole response as JSON")
    connect.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    with connect.client_from(args) as client:
        reply = rpc_call(client.generate, args.prompt, args.adapter, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, seed=args.seed)
    print(json.dumps(MessageToDict(reply), indent=2) if args.json else reply.text)
    return 0

