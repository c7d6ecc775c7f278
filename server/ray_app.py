"""The OpenAI HTTP API over N replicas on Ray Serve, requests for an adapter routed to a replica that holds it.

    Ingress (1 replica, no model)  --route_key(body) as the multiplexed model id-->  Replica x N (one base each)

Each Replica is `adalora serve`'s engine without its own ports: a Backend (residency tiers and all) behind the same
HttpApi (server.http), run in-process by forward.exchange, so every route, limit and error is the one a single
server answers. Adapters are multiplexed with `serve.multiplexed`, its per-replica cache bounded by --max-slots:
the replica reports the adapters it holds, and Serve's router sends a request for one of them there (else to the
replica holding the fewest, after its matching timeout to any). A replica that dies is restarted by Serve; the
requests it was running end with 503 (Retry-After), never a hang.

Run it with `adalora serve-ray` (server.commands.serve_ray) or `serve run deploy/ray/serve_config.yaml` (`build`).
"""

from __future__ import annotations

import collections
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from ray import serve
from ray.exceptions import RayActorError, RayError
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from adalora.engine.errors import InvalidRequest
from adalora.server.backend import Backend
from adalora.server.commands.serve_ray import RayOptions
from adalora.server.config import ServerConfig
from adalora.server.auth import bearer_token
from adalora.server.errors import NotReady, RequestTooLarge
from adalora.server.forward import Head, HttpCall, exchange, route_key
from adalora.server.gate import Gate
from adalora.server import openai_api as oa
from adalora.server.http import HttpApi, error_response, sse
from adalora.server.metrics import Metrics

log = logging.getLogger("adalora.server")
REPLICA_HEADER = b"x-adalora-replica"
"""Which replica answered (its Serve replica id)."""
LOADS_HEADER = b"x-adalora-adapter-loads"
"""How many times Serve's multiplexed cache on that replica has loaded the request's routing adapter since the
replica started (its own counter; a reload by the replica's own tiers after Serve still lists it is not counted)."""
NOT_ON_RAY = {"/v1/unload_lora_adapter", "/metrics"}
DIED = "the replica serving this request stopped (its process died); Ray Serve restarts it: retry"
"""The answer to a request whose replica died under it (503, or an error event mid-stream)."""
MODEL_ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/classify", "/v1/classify"}
"""Routes whose adapter a replica loads through Serve's cache before the route runs."""


class AdapterLease:
    """What Serve's multiplexed cache holds for one adapter on one replica: the adapter itself lives in the
    Backend's residency tiers, which evict by their own LRU; dropping a lease only tells Serve the replica no
    longer claims it."""

    def __init__(self, adapter_id: str) -> None:
        self.adapter_id = adapter_id


class Replica:
    """One base model and its adapter tiers, answering forwarded HTTP requests with server.http's routes."""

    def __init__(self, config: ServerConfig) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        self.config = config
        self.metrics = Metrics(config.max_slots, config.max_batch_size)
        self.gate = Gate()
        self.gate.backend = Backend.open(config, self.metrics)
        self.api = HttpApi(config, self.gate, self.metrics)
        self.loads: collections.Counter[str] = collections.Counter()
        self.replica_id = serve.get_replica_context().replica_id.unique_id

        async def load(adapter_id: str) -> AdapterLease:  # a plain function: Serve keeps its cache on it
            return await self._load(adapter_id)

        self.adapter = serve.multiplexed(max_num_models_per_replica=config.max_slots)(load)
        log.info("replica %s serving %s (pid %d)", self.replica_id, config.base_model, os.getpid())

    async def _load(self, adapter_id: str) -> AdapterLease:
        """Serve's loader: the adapter onto this replica's device (what a request for it would load anyway), within
        the request deadline (Serve loads one adapter at a time per replica)."""
        residency = self.gate.ready().residency
        deadline = time.monotonic() + self.config.http_timeout_s
        residency.release((await residency.acquire([adapter_id], deadline)).values())
        self.loads[adapter_id] += 1
        return AdapterLease(adapter_id)

    def _may_load(self, call: HttpCall) -> bool:
        """Whether a request may load its adapter through Serve's cache before its route runs: a model route (the
        admin routes load after their own credential check), with the API key when the server has one."""
        if call.path not in MODEL_ROUTES:
            return False
        if self.config.api_key is None:
            return True
        token = bearer_token([(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in call.headers])
        return token is not None and hmac.compare_digest(token.encode(), self.config.api_key.encode())

    async def handle(self, call: HttpCall) -> AsyncIterator[Head | bytes]:
        """The answer to `call`: a Head, then body bytes. Its routing adapter is loaded first through Serve's
        multiplexed cache (a load that fails is left for the route to answer with its own error)."""
        adapter_id = serve.get_multiplexed_model_id()
        if adapter_id and self._may_load(call):
            try:
                await self.adapter(adapter_id)
            except Exception as error:  # noqa: BLE001 - the route below meets it again and answers it
                log.info("adapter %r not loaded through Serve's cache: %s", adapter_id, error)
        extra = [(REPLICA_HEADER, self.replica_id.encode()), (LOADS_HEADER, str(self.loads[adapter_id]).encode())]
        async for part in exchange(self.api.app, call, extra):
            yield part

    def check_health(self) -> None:
        """Serve's health check: a replica whose generation thread died is replaced."""
        backend = self.gate.backend
        if backend is None or (backend.driver is not None and not backend.driver.alive):
            raise RuntimeError("this replica's generation thread is not running")

    def __del__(self) -> None:
        gate = getattr(self, "gate", None)
        if gate is not None and gate.backend is not None:
            gate.draining = True
            gate.backend.close()


class Ingress:
    """The one HTTP endpoint: reads a request's routing adapter from its body and forwards it to a Replica (Serve
    picks which); answers 503 for a request whose replica died under it."""

    def __init__(self, replicas: DeploymentHandle, config: ServerConfig) -> None:
        self.replicas, self.config = replicas, config
        self.store = Path(config.adapter_dir)

    async def _body(self, request: Request) -> bytes:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.config.max_message_bytes:
                raise RequestTooLarge(f"the request body is over this server's limit of "
                                      f"{self.config.max_message_bytes} bytes (--max-message-bytes); send less per "
                                      f"request")
        return bytes(body)

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        try:
            if path in NOT_ON_RAY:
                raise InvalidRequest(f"{path} is not served on Ray Serve: replicas evict adapters themselves (LRU "
                                     f"over --max-slots) and Ray exports the serving metrics (ray_serve_*); remove "
                                     f"an adapter from the store to stop serving it")
            body = await self._body(request)
        except (InvalidRequest, RequestTooLarge) as error:
            return error_response(error, str(error))
        call = HttpCall(request.method, path, request.url.query.encode(),
                        tuple((k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.items()), body)
        key = route_key(body, self.config.model_name)
        if key and not (self.store / key).is_dir():  # an id not in the store: any replica answers its 404
            key = ""
        stream = self.replicas.options(multiplexed_model_id=key, stream=True).handle.remote(call)
        try:
            head = await anext(stream)
        except RayActorError as error:
            return died(error)
        except (RayError, RayServeException) as error:
            return failed(error)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in head.headers if k.lower() != b"content-length"}
        return StreamingResponse(rest(head.body, stream), status_code=head.status, headers=headers)


def failed(error: BaseException) -> Response:
    """A replica's own failure (not its death): OpenAI's 500 shape, the details in the log."""
    log.error("a replica failed a request: %s", error)
    message = f"internal server error ({type(error).__name__}); the server log has the details"
    return JSONResponse(oa.error_body(message, 500), status_code=500)


def died(error: BaseException) -> Response:
    log.warning("a replica died under a request: %s", error)
    failure = NotReady(DIED)
    return error_response(failure, str(failure))


async def rest(first: bytes, stream: AsyncIterator[Head | bytes]) -> AsyncIterator[bytes]:
    """The body after its head; a replica dying mid-stream ends a server-sent-event stream with an error event."""
    if first:
        yield first
    try:
        async for chunk in stream:
            yield chunk
    except RayActorError as error:
        log.warning("a replica died mid-stream: %s", error)
        yield sse(oa.error_body(DIED, 503)).encode()
    except (RayError, RayServeException) as error:
        log.error("a replica failed mid-stream: %s", error)
        yield sse(oa.error_body(f"internal server error ({type(error).__name__})", 500)).encode()


def application(config: ServerConfig, options: RayOptions) -> serve.Application:
    """The bound Serve application: Ingress over options' Replicas."""
    replica = serve.deployment(Replica, name="Replica", **options.deployment_options(config))
    ingress = serve.deployment(Ingress, name="Ingress", num_replicas=1, max_ongoing_requests=4096,
                               ray_actor_options={"num_cpus": 0})
    return ingress.bind(replica.bind(config), config)


def build(args: Mapping[str, object]) -> serve.Application:
    """`serve run` application builder: args are serve-ray's flags without dashes (base_model, adapter_dir,
    replicas, ...), as in deploy/ray/serve_config.yaml."""
    from adalora.server.commands.serve_ray import settings_from_mapping
    return application(*settings_from_mapping(args))
