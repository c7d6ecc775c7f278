"""Bearer-token check of the admin RPCs (LoadAdapter, UnloadAdapter): metadata `authorization: Bearer <token>`."""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from server.errors import PermissionDenied, Unauthenticated

SCHEME = "bearer "


def bearer_token(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The token of the first `authorization: Bearer ...` entry, None when there is none."""
    for key, value in metadata or ():
        if key.lower() == "authorization" and isinstance(value, str) and value[:len(SCHEME)].lower() == SCHEME:
            return value[len(SCHEME):].strip()
    return None


def check_admin(expected: str | None, metadata: Iterable[tuple[str, str | bytes]], rpc: str) -> None:
    """Raise unless `metadata` carries the admin token `expected` (None = admin RPCs are open)."""
    if expected is None:
        return
    token = bearer_token(metadata)
    if token is None:
        raise Unauthenticated(f"{rpc} needs the admin token: send metadata 'authorization: Bearer <token>' "
                              f"(AdaLoraClient(..., admin_token=...))")
    if not hmac.compare_digest(token.encode(), expected.encode()):
        raise PermissionDenied(f"{rpc}: the bearer token is not this server's admin token (--admin-token / "
                               f"ADALORA_ADMIN_TOKEN); check the token the client sends")
