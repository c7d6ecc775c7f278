"""Whether the server takes requests: the one state both front-ends (adalora.v1 gRPC, the OpenAI HTTP API) ask
before they touch the Backend."""

from __future__ import annotations

from typing import TYPE_CHECKING

from adalora.server.errors import NotReady

if TYPE_CHECKING:
    from adalora.server.backend import Backend


class Gate:
    """Closed (NotReady) until a Backend is attached, and again once draining starts. `leaving` (the drain delay)
    reports not serving while requests are still taken."""

    def __init__(self) -> None:
        self.backend: Backend | None = None
        self.draining = False
        self.leaving = False

    def ready(self) -> Backend:
        if self.draining:
            raise NotReady("the server is shutting down; retry on another replica or after it restarts")
        if self.backend is None:
            raise NotReady("the base model is still loading; retry when health reports SERVING")
        return self.backend

    @property
    def serving(self) -> bool:
        return self.backend is not None and not self.draining and not self.leaving
