"""grpc.health.v1 for the server: the library's servicer, with List (every service and its status), and a Watch
stream that ends (status OK) once it has told its client NOT_SERVING at the start of a drain. The library's Watch never ends by itself, so one open Watch
(a load balancer's, a sidecar's) held the drain for the whole grace period and was then cancelled."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from grpc_health.v1 import health, health_pb2

Status = health_pb2.HealthCheckResponse
SERVING, NOT_SERVING, SERVICE_UNKNOWN = Status.SERVING, Status.NOT_SERVING, Status.SERVICE_UNKNOWN


class DrainingHealth(health.aio.HealthServicer):
    """Check as the library answers it; Watch from this class's own copy of the statuses, so it can stop."""

    def __init__(self) -> None:
        super().__init__()
        self._status: dict[str, int] = {"": SERVING}
        self._draining = False
        self._changed = asyncio.Condition()

    def serving(self, service: str = "") -> bool:
        """Whether `service` ("" = the whole server) is SERVING now; safe to call from any thread."""
        return self._status.get(service) == SERVING

    async def set(self, service: str, status: int) -> None:
        await super().set(service, status)
        if not self._draining:  # as the library: a drain's NOT_SERVING is final
            await self._update(lambda: self._status.__setitem__(service, status))

    async def enter_graceful_shutdown(self) -> None:
        await super().enter_graceful_shutdown()

        def drain() -> None:
            self._draining = True
            for service in self._status:
                self._status[service] = NOT_SERVING

        await self._update(drain)

    async def _update(self, change: Callable[[], None]) -> None:
        async with self._changed:
            change()
            self._changed.notify_all()

    async def List(self, request: health_pb2.HealthListRequest, context) -> health_pb2.HealthListResponse:
        """Every service with a status, and that status (the library's aio servicer has no List)."""
        return health_pb2.HealthListResponse(statuses={service: Status(status=status)
                                                       for service, status in self._status.items()})

    async def Watch(self, request: health_pb2.HealthCheckRequest, context) -> None:
        """Each status change of `request.service` (SERVICE_UNKNOWN while it has none); returns after the
        NOT_SERVING of a drain."""
        last = None
        async with self._changed:
            while True:
                status = self._status.get(request.service, SERVICE_UNKNOWN)
                if status != last:
                    await context.write(Status(status=status))
                    last = status
                if self._draining:
                    return
                await self._changed.wait()
