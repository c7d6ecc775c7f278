"""`adalora upload`: put an adapter folder into a running server's adapter store (UploadAdapter); not loaded."""

from __future__ import annotations

import argparse
import json

from google.protobuf.json_format import MessageToDict

from adalora.server.commands import connect
from adalora.server.commands.rpc_errors import RPC_ERRORS, rpc_call

NAME = "upload"
HELP = ("upload an adapter folder (native or PEFT) into a running `adalora serve`'s adapter store; load it with "
        "LoadAdapter afterwards")
USER_ERRORS = RPC_ERRORS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="adapter folder: adapter.safetensors (native) or adapter_config.json + "
                                  "adapter_model.safetensors (PEFT); its other files are not sent")
    p.add_argument("--id", required=True, dest="adapter_id", help="the id to store it under (its folder name)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an adapter stored under this id (a loaded version keeps serving until LoadAdapter "
                        "with reload)")
    p.add_argument("--json", action="store_true", help="print the whole response as JSON")
    connect.add_arguments(p, admin=True)


def run(args: argparse.Namespace) -> int:
    with connect.client_from(args) as client:
        reply = rpc_call(client.upload, args.adapter_id, args.folder, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(MessageToDict(reply), indent=2))
    else:
        info = reply.adapter
        replaced = ", replacing the one stored before" if reply.replaced else ""
        print(f"stored {info.id} ({info.format}, version {info.version[:12]}{replaced}); load it with LoadAdapter")
    return 0
