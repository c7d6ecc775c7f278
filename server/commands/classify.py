"""`adalora classify`: classify texts with a running server's adapter; prints one label per text (--json: all)."""

from __future__ import annotations

import argparse
import json

from google.protobuf.json_format import MessageToDict

from adalora.server.commands import connect
from adalora.server.commands.rpc_errors import RPC_ERRORS, rpc_call

NAME = "classify"
HELP = "classify texts with a running `adalora serve` (encoder base); prints one label per text (--json for scores)"
USER_ERRORS = RPC_ERRORS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("texts", nargs="+", help="texts to classify")
    p.add_argument("--adapter", required=True, help="id of a loaded seq-cls adapter (its head gives the labels)")
    p.add_argument("--json", action="store_true", help="print the whole response as JSON")
    connect.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    with connect.client_from(args) as client:
        reply = rpc_call(client.classify, args.texts, args.adapter)
    if args.json:
        print(json.dumps(MessageToDict(reply), indent=2))
    else:
        for result in reply.results:
            print(result.label)
    return 0
