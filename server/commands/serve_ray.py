"""`adalora serve-ray`: the OpenAI HTTP API over N replicas on Ray Serve (server.ray_app), on a new local Ray or the
cluster at --ray-address / RAY_ADDRESS. SIGTERM deletes the application (each replica drains for --grace seconds),
and stops the local Ray this command started; on a cluster, Serve and its other applications go on."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from adalora.atomic import write_text_atomic
from adalora.config import ConfigError, is_int, is_number
from adalora.server.commands import serve as single
from adalora.server.config import ServerConfig

NAME = "serve-ray"
HELP = ("serve a base model and its adapters on N Ray Serve replicas behind one OpenAI HTTP endpoint, requests for an "
        "adapter routed to a replica that holds it")
USER_ERRORS = single.USER_ERRORS
APP_NAME = "adalora"
KEPT = ("base_model", "adapter_dir", "preload", "served_model_name", "api_key", "http_timeout", "device",
        "dtype", "decoder", "weights", "cuda_graphs", "gather_ms", "max_batch_size", "max_queue", "admin_token",
        "max_slots", "max_device_bytes", "max_host_bytes", "max_prompt_tokens", "max_new_tokens", "grace",
        "max_message_bytes", "max_adapter_rank",
        "max_adapter_bytes", "adapter_dtypes")
"""`adalora serve`'s flags that mean the same per replica here (gRPC, TLS and the metrics port do not exist on Ray:
the one endpoint is Serve's HTTP proxy, and Ray exports the metrics)."""


@dataclass(frozen=True)
class RayOptions:
    """How the replicas are laid out on Ray (serve_ray's flags), validated once."""

    replicas: int = 2
    """Fixed replica count (without autoscaling)."""
    min_replicas: int | None = None
    """With max_replicas: autoscale between the two on ongoing requests per replica (target: max_batch_size)."""
    max_replicas: int | None = None
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    max_ongoing_requests: int | None = None
    """Requests Serve sends one replica at once (None: 2 x max_batch_size); more wait in Serve's router, where they
    can still go to the replica that frees up first."""

    def __post_init__(self) -> None:
        if not is_int(self.replicas, 1):
            raise ConfigError(f"--replicas must be a positive integer, got {self.replicas!r}")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ConfigError("--min-replicas and --max-replicas go together (autoscaling); give both or neither")
        if self.min_replicas is not None and not (is_int(self.min_replicas, 0) and is_int(self.max_replicas, 1)
                                                  and self.min_replicas <= self.max_replicas):
            raise ConfigError(f"autoscaling needs 0 <= --min-replicas <= --max-replicas and --max-replicas >= 1; got "
                              f"{self.min_replicas} and {self.max_replicas}")
        for name in ("cpus_per_replica", "gpus_per_replica"):
            if not is_number(getattr(self, name)) or getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be a number >= 0, got {getattr(self, name)!r}")
        if self.max_ongoing_requests is not None and not is_int(self.max_ongoing_requests, 1):
            raise ConfigError(f"--max-ongoing-requests must be a positive integer, got {self.max_ongoing_requests!r}")

    def deployment_options(self, config: ServerConfig) -> dict:
        ongoing = self.max_ongoing_requests or 2 * config.max_batch_size
        options: dict = {"ray_actor_options": {"num_cpus": self.cpus_per_replica, "num_gpus": self.gpus_per_replica},
                         "max_ongoing_requests": ongoing, "graceful_shutdown_timeout_s": config.grace_s}
        if self.min_replicas is None:
            options["num_replicas"] = self.replicas
        else:
            options["autoscaling_config"] = {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                                             "target_ongoing_requests": config.max_batch_size}
        return options


class _Parser(argparse.ArgumentParser):
    """Raises ConfigError instead of exiting: `serve run`'s builder reports a bad argument as an error."""

    def error(self, message: str):
        raise ConfigError(f"serve-ray: {message}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    every = argparse.ArgumentParser(add_help=False)
    single.add_arguments(every)
    for action in every._actions:
        if action.dest in KEPT:
            p._add_action(action)
    p.add_argument("--host", default=single.DEFAULTS.host,
                   help=f"address of Serve's HTTP proxy (default {single.DEFAULTS.host}); the admin route "
                        f"/v1/load_lora_adapter needs --admin-token on Ray whatever the host")
    p.add_argument("--ready-file", metavar="PATH", default=None,
                   help='once the application is up, write {"host", "http_port", "pid"} as JSON to PATH '
                        '(atomically; removed on shutdown)')
    p.add_argument("--http-port", type=int, default=single.DEFAULT_HTTP_PORT,
                   help=f"port of Serve's HTTP proxy, the one OpenAI endpoint (default {single.DEFAULT_HTTP_PORT})")
    g = p.add_argument_group("Ray")
    g.add_argument("--replicas", type=int, default=2, help="replicas, each one base model (default 2)")
    g.add_argument("--min-replicas", type=int, default=None,
                   help="with --max-replicas: autoscale on ongoing requests per replica (target --max-batch-size)")
    g.add_argument("--max-replicas", type=int, default=None, help="upper bound of autoscaling")
    g.add_argument("--cpus-per-replica", type=float, default=1.0, help="Ray CPUs each replica reserves (default 1)")
    g.add_argument("--gpus-per-replica", type=float, default=None,
                   help="Ray GPUs each replica reserves (default: 1 with a cuda --device, else 0)")
    g.add_argument("--max-ongoing-requests", type=int, default=None,
                   help="requests Serve sends one replica at once (default 2 x --max-batch-size); more wait in "
                        "Serve's router")
    g.add_argument("--ray-address", default=None,
                   help="Ray cluster to join (default: $RAY_ADDRESS, else a new local Ray started here)")


ANY_HOST = "0.0.0.0"
"""The replicas' ServerConfig.host. They bind nothing; the host only sets the admin policy, and Serve's proxy may
listen on any address (a Serve already running keeps its own), so admin calls always need --admin-token here."""


def settings_from(args: argparse.Namespace) -> tuple[ServerConfig, RayOptions]:
    """(ServerConfig of each replica, RayOptions) from the parsed flags."""
    base, store = single.default_paths(args)
    config = single.config_from(argparse.Namespace(
        **{**vars(args), "base_model": base, "adapter_dir": store, "http_port": None, "port": 0, "host": ANY_HOST,
           "reflection": False, "tls_cert": None, "tls_key": None, "tls_client_ca": None, "admin_client_name": [],
           "insecure_open_admin": False, "metrics_port": None, "ready_file": None, "drain_delay": 0.0,
           "max_store_bytes": single.DEFAULTS.max_store_bytes,
           "max_concurrent_uploads": single.DEFAULTS.max_concurrent_uploads,
           "max_upload_bytes": single.DEFAULTS.max_upload_bytes}))
    gpus = args.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if config.device.startswith("cuda") else 0.0
    options = RayOptions(replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                         cpus_per_replica=args.cpus_per_replica, gpus_per_replica=gpus,
                         max_ongoing_requests=args.max_ongoing_requests)
    return config, options


def settings_from_mapping(values: Mapping[str, object]) -> tuple[ServerConfig, RayOptions]:
    """settings_from over `serve run` args: {"base_model": "/models/base", "replicas": 2, "preload": ["a"], ...}."""
    argv: list[str] = []
    for key, value in values.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        elif value is not None and value is not False:
            argv += [flag, str(value)]
    parser = _Parser(prog="adalora serve-ray")
    add_arguments(parser)
    return settings_from(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config, options = settings_from(args)
    try:
        import ray
        from ray import serve
        from adalora.server.ray_app import application
    except ImportError as e:
        raise ConfigError(f"serve-ray needs Ray Serve ({e}); install it with: pip install -e '.[ray]'") from None
    log = logging.getLogger("adalora.server")
    address = args.ray_address or os.environ.get("RAY_ADDRESS") or None
    ray.init(address=address or "local", include_dashboard=False, logging_level=logging.WARNING)  # "local": a new one
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.http_port})
        serve.run(application(config, options), name=APP_NAME, route_prefix="/")
        log.info("OpenAI API at http://%s:%d/v1 (model %r) over %s", args.host, args.http_port, config.model_name,
                 f"{options.replicas} replicas" if options.min_replicas is None
                 else f"{options.min_replicas}-{options.max_replicas} replicas (autoscaling)")
        if args.ready_file:
            write_text_atomic(args.ready_file, json.dumps({"host": args.host, "http_port": args.http_port,
                                                           "pid": os.getpid()}) + "\n")
        stopping.wait()
        log.info("shutting down (replicas drain for up to %gs)", config.grace_s)
    finally:
        if args.ready_file:
            Path(args.ready_file).unlink(missing_ok=True)
        if address is None:  # Ray and Serve started here end here
            serve.shutdown()
        else:  # a shared cluster: only this application goes
            serve.delete(APP_NAME)
        ray.shutdown()
    return 0
