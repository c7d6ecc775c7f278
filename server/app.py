"""The gRPC server: create_server() builds and binds it (tests bind port 0), serve() runs it until SIGTERM.

    server, port = await create_server(config)              # also /metrics (config.metrics_port), HTTP (http_port)
    await server.start()                                    # health: NOT_SERVING; HTTP answers 503
    await server.attach(await asyncio.to_thread(Backend.open, config, server.metrics))   # health: SERVING
    ...
    await server.stop(grace=10)                             # health: NOT_SERVING, then in-flight RPCs finish
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from adalora.atomic import write_text_atomic
from adalora.server import tls
from adalora.server.auth import CLOSED
from adalora.server.backend import Backend
from adalora.server.config import ServerConfig
from adalora.server.gen.adalora.v1 import adalora_pb2 as pb
from adalora.server.gen.adalora.v1 import adalora_pb2_grpc as pb_grpc
from adalora.server import reflection
from adalora.server.gate import Gate
from adalora.server.gen.inference import grpc_service_pb2_grpc as kserve_grpc
from adalora.server.kserve import SERVICE as KSERVE_SERVICE
from adalora.server.kserve import InferenceServicer
from adalora.server.health import DrainingHealth
from adalora.server.http import HttpApi, HttpFrontend
from adalora.server.metrics import Metrics, MetricsEndpoint
from adalora.server.servicer import AdaLoraServicer

log = logging.getLogger("adalora.server")
T = TypeVar("T")

SERVICE = pb.DESCRIPTOR.services_by_name["AdaLora"].full_name
"""'adalora.v1.AdaLora': the health service reports it and '' (the whole server) alike."""


@dataclass
class Server:
    """A bound adalora.v1 server with its health service and metrics (and their /metrics endpoint, if any), and the
    OpenAI HTTP API (if any): both front-ends ask one Gate whether requests are taken."""

    grpc: grpc.aio.Server
    servicer: AdaLoraServicer
    health: DrainingHealth
    metrics: Metrics
    gate: Gate
    endpoint: MetricsEndpoint | None = None
    http: HttpFrontend | None = None

    @property
    def http_port(self) -> int | None:
        """The bound port of the HTTP API, None without one."""
        return None if self.http is None else self.http.port

    @property
    def metrics_port(self) -> int | None:
        """The bound port of /metrics, None without an endpoint."""
        return None if self.endpoint is None else self.endpoint.port

    async def _set_health(self, status: int) -> None:
        for service in ("", SERVICE, KSERVE_SERVICE):
            await self.health.set(service, status)

    async def start(self) -> None:
        await self.grpc.start()
        if self.http is not None:
            await self.http.start()

    async def attach(self, backend: Backend) -> None:
        """Serve with `backend` (its model and preloaded adapters ready): health turns SERVING."""
        if backend.metrics is not self.metrics:
            raise ValueError("the backend records into other metrics than this server serves; open it with "
                             "Backend.open(config, server.metrics)")
        self.gate.backend = backend
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def announce_drain(self) -> None:
        """The drain delay: health NOT_SERVING (grpc.health.v1, /healthz, /health) while requests are still taken."""
        self.gate.leaving = True
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self, grace: float | None) -> None:
        """Drain: health NOT_SERVING and new requests refused (UNAVAILABLE) at once; requests in flight get
        `grace` seconds to finish, then are cancelled; the generation thread ends last."""
        self.gate.draining = True
        await self.health.enter_graceful_shutdown()
        http = None if self.http is None else asyncio.ensure_future(self.http.stop(grace))  # both drain at once
        # awaited here: run as a task of asyncio.gather, a call arriving during the drain got CANCELLED at the end of
        # the grace instead of UNAVAILABLE at once (tests/test_server_e2e.py's SIGTERM test)
        await self.grpc.stop(grace)
        if http is not None:
            await http
        if self.gate.backend is not None:
            self.gate.backend.close()
        if self.endpoint is not None:
            await asyncio.to_thread(self.endpoint.close)


async def create_server(config: ServerConfig) -> tuple[Server, int]:
    """Build the server and bind config.host:config.port (0 = any free port), a TLS port when config.tls_cert is
    set (server.tls), else plaintext; returns it (not started, health NOT_SERVING) and the bound port. With
    config.metrics_port set, /metrics and /healthz are served at once over plain HTTP (its bound port:
    Server.metrics_port).
    Call from a running event loop."""
    options = [("grpc.max_receive_message_length", config.max_message_bytes),
               ("grpc.max_send_message_length", config.max_message_bytes)]
    server = grpc.aio.server(options=options)
    metrics = Metrics(config.max_slots, config.max_batch_size)
    gate = Gate()
    servicer = AdaLoraServicer(config, metrics, gate)
    pb_grpc.add_AdaLoraServicer_to_server(servicer, server)
    health_servicer = DrainingHealth()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    kserve = InferenceServicer(config, metrics, gate)
    kserve_grpc.add_GRPCInferenceServiceServicer_to_server(kserve, server)
    if config.reflection:
        reflection.enable((SERVICE, KSERVE_SERVICE, health.SERVICE_NAME), server)
    address = f"{config.host}:{config.port}"
    credentials = tls.server_credentials(config)
    try:
        port = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address,
                                                                                                      credentials)
    except RuntimeError as e:
        raise OSError(f"cannot listen on {address} ({e}); pick another --port or --host") from e
    endpoint = None if config.metrics_port is None else MetricsEndpoint(metrics.registry, config.host,
                                                                         config.metrics_port, health_servicer.serving)
    http = None if config.http_port is None else HttpFrontend(HttpApi(config, gate, metrics), config)
    wrapped = Server(server, servicer, health_servicer, metrics, gate, endpoint, http)
    await wrapped._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
    return wrapped, port


def in_daemon_thread(fn: Callable[..., T], *args) -> asyncio.Future[T]:
    """fn(*args) on a daemon thread, as a future of the running loop. Unlike asyncio.to_thread, whose executor
    asyncio.run waits for at exit, a process told to stop while fn still runs (SIGTERM while the base model
    loads) exits at once; the thread dies with it."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():  # the waiter gave up
            return
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)

    def run() -> None:
        try:
            outcome = (fn(*args), None)
        except BaseException as error:  # noqa: BLE001 - handed to the awaiting side
            outcome = (None, error)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    threading.Thread(target=run, name=f"adalora-{getattr(fn, '__name__', 'call')}", daemon=True).start()
    return future


def write_ready_file(path: str, host: str, port: int, metrics_port: int | None, http_port: int | None) -> None:
    """Tell the process that started the server where it listens (it may have asked for port 0): JSON
    {"host", "port", "metrics_port", "http_port", "pid"}, written atomically, so a reader never sees half of it."""
    write_text_atomic(path, json.dumps({"host": host, "port": port, "metrics_port": metrics_port,
                                        "http_port": http_port, "pid": os.getpid()}) + "\n")


def log_admin_policy(config: ServerConfig) -> None:
    """Say at start who may call the admin RPCs, loudly when they are open beyond loopback or closed to all."""
    if config.admin_credentials:
        log.info("admin RPCs need credentials (%s)", "token" if config.admin_token else "client certificate names")
    elif config.insecure_open_admin:
        log.warning("admin RPCs (Load/Unload/UploadAdapter) are OPEN to every caller that reaches %s "
                    "(--insecure-open-admin): anyone can unload, reload and upload adapters", config.host)
    elif config.loopback_only:
        log.info("admin RPCs are open to callers on this machine (loopback host %s, no admin credentials)",
                 config.host)
    else:
        log.warning("admin RPCs are closed to every caller: %s", CLOSED)


async def serve(config: ServerConfig) -> None:
    """Listen at once (health NOT_SERVING), load the base model and preloaded adapters, turn SERVING (and write
    config.ready_file), and run until SIGTERM or SIGINT, then drain for config.grace_s seconds."""
    if config.ready_file is not None:
        Path(config.ready_file).unlink(missing_ok=True)  # one left by an earlier run must not read as ready
    server, port = await create_server(config)
    await server.start()
    log.info("listening on %s:%d (%s); loading %s", config.host, port, tls.describe(config), config.base_model)
    log_admin_policy(config)
    if server.metrics_port is not None:
        log.info("metrics at http://%s:%d/metrics", config.host, server.metrics_port)
    if server.http_port is not None:
        log.info("OpenAI API at http%s://%s:%d/v1 (model %r)", "s" if config.tls_cert else "", config.host,
                 server.http_port, config.model_name)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        loading = in_daemon_thread(Backend.open, config, server.metrics)  # SIGTERM need not wait for it
        await asyncio.wait([loading, asyncio.ensure_future(stopping.wait())], return_when=asyncio.FIRST_COMPLETED)
        if loading.done():
            await server.attach(loading.result())
            log.info("serving %s on port %d (adapters: %s)", config.base_model, port, ", ".join(config.preload) or "-")
            if config.ready_file is not None:
                write_ready_file(config.ready_file, config.host, port, server.metrics_port, server.http_port)
            await stopping.wait()
            if config.drain_delay_s > 0:
                log.info("health NOT_SERVING; taking requests for %gs more (--drain-delay)", config.drain_delay_s)
                stopping.clear()  # before the await: a second signal during it counts
                await server.announce_drain()
                with contextlib.suppress(TimeoutError):  # a second signal ends the delay
                    await asyncio.wait_for(stopping.wait(), config.drain_delay_s)
        log.info("draining for up to %gs", config.grace_s)
    finally:
        if config.ready_file is not None:
            Path(config.ready_file).unlink(missing_ok=True)  # no longer serving
        await server.stop(config.grace_s)
