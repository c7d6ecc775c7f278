"""A failed RPC as a one-line user error of the client subcommands: 'STATUS: what the server said'."""

from __future__ import annotations

import grpc


class ServerReplyError(Exception):
    """The server refused the request or could not be reached; the message is its status and details."""


RPC_ERRORS = (ServerReplyError,)


def rpc_call(method, *args, **kwargs):
    try:
        return method(*args, **kwargs)
    except grpc.RpcError as e:
        raise ServerReplyError(f"{e.code().name}: {e.details()}") from e
