"""The flags every client subcommand shares (--server, --timeout, TLS; --admin-token for the admin ones) and the
AdaLoraClient they describe.

    def add_arguments(p):
        connect.add_arguments(p)                    # admin=True also adds --admin-token
    def run(args):
        with connect.client_from(args) as client:
            ...
"""

from __future__ import annotations

import argparse
import os

from adalora.server.client import AdaLoraClient
from adalora.server.tls import ClientTLS


def add_arguments(p: argparse.ArgumentParser, admin: bool = False) -> None:
    p.add_argument("--server", default="localhost:50051", help="HOST:PORT of the server (default localhost:50051)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the answer")
    if admin:
        p.add_argument("--admin-token", default=None,
                       help="the server's admin token, sent as 'authorization: Bearer' (default: "
                            "$ADALORA_ADMIN_TOKEN); prefer the environment variable, a flag shows in the process list")
    g = p.add_argument_group("TLS", "for a server started with --tls-cert; any of these turns TLS on")
    g.add_argument("--tls", action="store_true", help="use TLS, trusting the system's root certificates")
    g.add_argument("--tls-ca", metavar="PEM", default=None, help="CA certificate(s) to trust for the server's "
                                                                   "certificate instead of the system's roots")
    g.add_argument("--tls-cert", metavar="PEM", default=None,
                   help="this client's certificate, for a server that requires one (--tls-client-ca)")
    g.add_argument("--tls-key", metavar="PEM", default=None, help="private key of --tls-cert")


def tls_from(args: argparse.Namespace) -> ClientTLS | None:
    """None (plaintext) unless a TLS flag is given."""
    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_key):
        return None
    return ClientTLS(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)


def admin_token(args: argparse.Namespace) -> str | None:
    """--admin-token, else $ADALORA_ADMIN_TOKEN; None for a command added without admin=True."""
    if not hasattr(args, "admin_token"):
        return None
    return args.admin_token or os.environ.get("ADALORA_ADMIN_TOKEN") or None


def client_from(args: argparse.Namespace) -> AdaLoraClient:
    return AdaLoraClient(args.server, timeout=args.timeout, admin_token=admin_token(args), tls=tls_from(args))
