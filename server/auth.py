"""Who may call the admin RPCs (LoadAdapter, UnloadAdapter, ...): the holder of the admin token, sent as metadata
`authorization: Bearer <token>`, or a client whose verified mTLS certificate carries one of the admin client
names. With neither configured the admin RPCs are open on a loopback host only (or with --insecure-open-admin),
and closed to everyone on any other address."""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from adalora.server.errors import PermissionDenied, Unauthenticated

if TYPE_CHECKING:
    from adalora.server.config import ServerConfig

SCHEME = "bearer "
CLOSED = ("the admin RPCs are closed: this server listens beyond loopback and has no admin credentials; its operator "
          "sets ADALORA_ADMIN_TOKEN (then send 'authorization: Bearer <token>'), or mTLS --admin-client-name, or, on "
          "a network where every client is trusted, --insecure-open-admin")
"""Why an admin RPC is refused on a non-loopback server without credentials (also logged at start)."""
NAME_KEYS = ("x509_common_name", "peer_dns")
"""auth_context() keys of a verified client certificate's subject CN and its SAN DNS names (grpc core's peer
properties; 'x509_subject_alternative_name' would mix in IP, URI and email SANs). The context has neither key on a
plaintext port or without a client certificate."""

AuthContext = Mapping[str, Sequence[bytes]]


class CallContext(Protocol):
    """The part of grpc.aio.ServicerContext the check reads."""

    def invocation_metadata(self) -> Iterable[tuple[str, str | bytes]] | None: ...

    def auth_context(self) -> AuthContext: ...


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the first `authorization: Bearer ...` entry, None when there is none."""
    for key, value in metadata or ():
        if key.lower() == "authorization" and isinstance(value, str) and value[:len(SCHEME)].lower() == SCHEME:
            return value[len(SCHEME):].strip()
    return None


def certificate_names(auth_context: AuthContext | None) -> set[str]:
    """Common name and SAN DNS names of the peer's verified client certificate (empty without one)."""
    return {value.decode(errors="replace") for key in NAME_KEYS for value in (auth_context or {}).get(key, ())}


def _token_matches(token: str | None, expected: str | None) -> bool:
    return token is not None and expected is not None and hmac.compare_digest(token.encode(), expected.encode())


def _how_to(config: ServerConfig) -> str:
    ways = []
    if config.admin_token is not None:
        ways.append("send metadata 'authorization: Bearer <token>' (AdaLoraClient(..., admin_token=...))")
    if config.admin_client_names:
        ways.append(f"connect with a client certificate named {' or '.join(sorted(config.admin_client_names))} "
                    f"(--admin-client-name)")
    return " or ".join(ways)


def check_admin(config: ServerConfig, context: CallContext, rpc: str) -> None:
    """Raise unless the caller may run the admin RPC `rpc`. Without admin credentials configured: open when
    config.admin_open (loopback host, or --insecure-open-admin), else PermissionDenied for everyone. With them:
    the bearer token or an admin client certificate name lets it in; none sent: Unauthenticated; credentials that
    do not match: PermissionDenied."""
    if not config.admin_credentials:
        if config.admin_open:
            return
        raise PermissionDenied(f"{rpc}: {CLOSED}")
    token = bearer_token(context.invocation_metadata())
    names = certificate_names(context.auth_context()) if config.admin_client_names else set()
    if _token_matches(token, config.admin_token) or names & set(config.admin_client_names):
        return
    if token is None and not names:
        raise Unauthenticated(f"{rpc} needs admin credentials: {_how_to(config)}")
    sent = []
    if token is not None:
        sent.append("the bearer token is not this server's admin token (--admin-token / ADALORA_ADMIN_TOKEN)"
                    if config.admin_token is not None else "this server takes no admin token")
    if names:
        sent.append(f"the client certificate names {', '.join(sorted(names))}, not an --admin-client-name")
    raise PermissionDenied(f"{rpc}: {'; '.join(sent)}; {_how_to(config)}")
