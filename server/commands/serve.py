"""`adalora serve`: one base model, the adapters of --adapter-dir, served over gRPC (adalora.v1) and the OpenAI HTTP API."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

from adalora.dtypes import DTYPE_NAMES
from adalora.engine.lean import WEIGHTS
from adalora.engine.scheduler import DECODERS
from adalora.engine.errors import EngineError
from adalora.peft_interop import InteropError
from adalora.server.adapter_checks import AdapterLimits
from adalora.server.app import serve
from adalora.server.config import ServerConfig
from adalora.server.errors import StoreError

NAME = "serve"
HELP = "serve a base model and its adapters over gRPC (adalora.v1, grpc.health.v1) and HTTP (OpenAI API); SIGTERM drains"
USER_ERRORS = (StoreError, InteropError, OSError, EngineError)
"""Printed without a traceback, exit 2; EngineError: a --preload id that is malformed, not in the store or for
another base."""
DEFAULTS = ServerConfig(base_model="", adapter_dir="")
DEFAULT_BASE = "smollm2-135m"
"""--base-model default: this prepared model (`adalora prepare`, which `make demo` runs)."""
DEFAULT_HTTP_PORT = 8000
"""--http-port default (vLLM's)."""
DEFAULT_ADAPTER_DIR = "adapters"
"""--adapter-dir default, relative to the working directory; created empty when missing (only this default)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-model", default=None,
                   help=f"base model folder (config.json, safetensors, tokenizer); default: the prepared "
                        f"{DEFAULT_BASE} (`adalora prepare`)")
    p.add_argument("--adapter-dir", default=None,
                   help=f"adapter store: one folder per adapter id (native or PEFT); default: ./{DEFAULT_ADAPTER_DIR} "
                        f"(created when missing)")
    p.add_argument("--reflection", action="store_true",
                   help="also serve gRPC server reflection (grpc.reflection.v1alpha), for grpcurl and the like")
    p.add_argument("--preload", nargs="*", default=[], metavar="ID",
                   help="adapter ids loaded (and pinned: never evicted) before SERVING")
    p.add_argument("--host", default=DEFAULTS.host,
                   help=f"address to listen on (default {DEFAULTS.host}); gRPC is plaintext unless --tls-cert is "
                        f"given, /metrics is always plain HTTP")
    p.add_argument("--port", type=int, default=DEFAULTS.port, help=f"port (default {DEFAULTS.port}; 0 = any free)")
    p.add_argument("--http-port", type=http_port, default=DEFAULT_HTTP_PORT, metavar="PORT|off",
                   help=f"port of the OpenAI-compatible HTTP API (default {DEFAULT_HTTP_PORT}; 0 = any free; off = "
                        f"none)")
    p.add_argument("--served-model-name", default=None,
                   help='the base model\'s name in the HTTP API\'s "model" field (default: its folder\'s name)')
    p.add_argument("--api-key", default=None,
                   help="bearer key every /v1 HTTP route requires (default: $ADALORA_API_KEY; none when unset)")
    p.add_argument("--http-timeout", type=float, default=DEFAULTS.http_timeout_s,
                   help=f"seconds an HTTP request may take, queue included (default {DEFAULTS.http_timeout_s:g})")
    p.add_argument("--device", default=DEFAULTS.device, help="torch device, e.g. cpu, cuda, cuda:1")
    p.add_argument("--dtype", default=DEFAULTS.dtype, choices=DTYPE_NAMES,
                   help=f"model and adapter-slot dtype (default {DEFAULTS.dtype}); auto: bfloat16 on CUDA and on a CPU "
                        f"with native bfloat16 (avx512_bf16, AMX, Arm BF16), else float32")
    p.add_argument("--decoder", default=DEFAULTS.decoder, choices=DECODERS,
                   help="generation forward: lean (Llama-family: fused projections, preallocated KV cache), hf (the "
                        "transformers forward), auto (default: lean where it runs the model)")
    p.add_argument("--weights", default=DEFAULTS.weights, choices=WEIGHTS,
                   help="the lean decoder's dense weights: float (default, the model's) or bf16 (a bfloat16 copy "
                        "made at start); adapters and activations stay float32; CPU float32 only")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="on CUDA, run every decode step eagerly instead of replaying CUDA graphs of it")
    p.add_argument("--max-batch-size", type=int, default=DEFAULTS.max_batch_size, help="generation rows per step")
    p.add_argument("--gather-ms", type=float, default=DEFAULTS.gather_ms,
                   help=f"an idle server waits for more generation requests while each comes within this many ms of "
                        f"the last (25 at most in all), so a burst prefills together (default {DEFAULTS.gather_ms:g}; "
                        f"0: start at once)")
    p.add_argument("--max-queue", type=int, default=DEFAULTS.max_queue,
                   help=f"generation requests waiting for a batch row; more are RESOURCE_EXHAUSTED "
                        f"(default {DEFAULTS.max_queue})")
    p.add_argument("--admin-token", default=None,
                   help="bearer token the admin RPCs (Load/Unload/UploadAdapter) require (default: "
                        "$ADALORA_ADMIN_TOKEN); prefer the environment variable, a flag shows in the process list. "
                        "Without any admin credentials the admin RPCs are open on a loopback --host only")
    p.add_argument("--insecure-open-admin", action="store_true",
                   help="open the admin RPCs to every caller on a non-loopback --host without credentials (logged "
                        "as a warning); only where every client on the network is trusted")
    p.add_argument("--max-store-bytes", type=int, default=DEFAULTS.max_store_bytes,
                   help=f"quota of the adapter store; an upload that would pass it is RESOURCE_EXHAUSTED (default "
                        f"{DEFAULTS.max_store_bytes}; 0 = none)")
    p.add_argument("--max-concurrent-uploads", type=int, default=DEFAULTS.max_concurrent_uploads,
                   help=f"UploadAdapter calls at once; more are RESOURCE_EXHAUSTED (default "
                        f"{DEFAULTS.max_concurrent_uploads})")
    g = p.add_argument_group("TLS", "of the gRPC port (/metrics stays plain HTTP)")
    g.add_argument("--tls-cert", metavar="PEM", default=None, help="server certificate (chain); with --tls-key: TLS")
    g.add_argument("--tls-key", metavar="PEM", default=None, help="private key of --tls-cert")
    g.add_argument("--tls-client-ca", metavar="PEM", default=None,
                   help="require client certificates signed by this CA (mutual TLS); needs --tls-cert")
    g.add_argument("--admin-client-name", action="append", default=[], metavar="NAME",
                   help="client certificate common name or SAN DNS name allowed to call the admin RPCs without "
                        "the token (repeatable); needs --tls-client-ca")
    p.add_argument("--max-slots", type=int, default=DEFAULTS.max_slots,
                   help=f"adapters on the device at once; a request for another loads it on demand, evicting the "
                        f"least recently used unpinned idle one (default {DEFAULTS.max_slots})")
    p.add_argument("--max-device-bytes", type=int, default=DEFAULTS.max_device_bytes,
                   help="byte budget of adapter factors and heads on the device (default: --max-slots only)")
    p.add_argument("--max-host-bytes", type=int, default=DEFAULTS.max_host_bytes,
                   help=f"bytes of evicted adapters kept in host memory so reloading skips the disk "
                        f"(default {DEFAULTS.max_host_bytes}; 0 = none)")
    p.add_argument("--max-prompt-tokens", type=int, default=DEFAULTS.max_prompt_tokens, help="longest prompt accepted")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULTS.max_new_tokens,
                   help="cap on a request's max_new_tokens")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off; 0 = any free port)")
    p.add_argument("--grace", type=float, default=DEFAULTS.grace_s, help="seconds in-flight requests get on SIGTERM")
    p.add_argument("--drain-delay", type=float, default=DEFAULTS.drain_delay_s,
                   help="on SIGTERM, seconds health already says NOT_SERVING while new requests are still taken, "
                        "before the --grace drain: for endpoint pickers and balancers that follow readiness "
                        f"(default {DEFAULTS.drain_delay_s:g})")
    p.add_argument("--max-message-bytes", type=int, default=DEFAULTS.max_message_bytes,
                   help=f"largest request or response message; a larger one is RESOURCE_EXHAUSTED (default "
                        f"{DEFAULTS.max_message_bytes})")
    p.add_argument("--max-upload-bytes", type=int, default=DEFAULTS.max_upload_bytes,
                   help=f"most bytes of one UploadAdapter, all its files; more is RESOURCE_EXHAUSTED (default "
                        f"{DEFAULTS.max_upload_bytes})")
    limits = AdapterLimits()
    p.add_argument("--max-adapter-rank", type=int, default=limits.max_rank,
                   help=f"highest kept rank of any module of an adapter the store reads or an upload brings; a higher "
                        f"one is refused from its header, before any tensor is read (default {limits.max_rank})")
    p.add_argument("--max-adapter-bytes", type=int, default=limits.max_tensor_bytes,
                   help=f"most bytes of tensor data in one adapter file (default {limits.max_tensor_bytes})")
    p.add_argument("--adapter-dtypes", nargs="+", default=list(limits.dtypes), metavar="DTYPE",
                   help=f"safetensors dtypes an adapter's tensors may have (default: {' '.join(limits.dtypes)})")
    p.add_argument("--ready-file", metavar="PATH", default=None,
                   help='once SERVING, write {"host", "port", "metrics_port", "pid"} as JSON to PATH (atomically; '
                        'removed on shutdown): how a parent that passed --port 0 learns the ports')


def http_port(value: str) -> int | None:
    if value == "off":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number or 'off'") from None


def default_paths(args: argparse.Namespace) -> tuple[str, str]:
    """(base model folder, adapter store) from the flags, or the defaults: the prepared SmolLM2 (FileNotFoundError
    says to run `adalora prepare` when it is not) and ./adapters, created when missing."""
    base = args.base_model
    if base is None:
        from adalora.assets import model_path
        base = str(model_path(DEFAULT_BASE))
    store = args.adapter_dir
    if store is None:
        os.makedirs(DEFAULT_ADAPTER_DIR, exist_ok=True)
        store = DEFAULT_ADAPTER_DIR
    return base, store


def config_from(args: argparse.Namespace) -> ServerConfig:
    base, store = default_paths(args)
    return ServerConfig(base_model=base, adapter_dir=store, preload=tuple(args.preload), reflection=args.reflection,
                        host=args.host, port=args.port, http_port=args.http_port,
                        served_model_name=args.served_model_name, http_timeout_s=args.http_timeout,
                        api_key=args.api_key or os.environ.get("ADALORA_API_KEY") or None, device=args.device,
                        dtype=args.dtype, decoder=args.decoder, weights=args.weights,
                        cuda_graphs=args.cuda_graphs, gather_ms=args.gather_ms,
                        max_batch_size=args.max_batch_size, max_queue=args.max_queue, max_slots=args.max_slots,
                        max_device_bytes=args.max_device_bytes, max_host_bytes=args.max_host_bytes,
                        max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
                        default_max_new_tokens=min(DEFAULTS.default_max_new_tokens, args.max_new_tokens),
                        grace_s=args.grace, drain_delay_s=args.drain_delay, metrics_port=args.metrics_port,
                        ready_file=args.ready_file,
                        max_message_bytes=args.max_message_bytes, max_upload_bytes=args.max_upload_bytes,
                        admin_token=args.admin_token or os.environ.get("ADALORA_ADMIN_TOKEN") or None,
                        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
                        admin_client_names=tuple(args.admin_client_name),
                        insecure_open_admin=args.insecure_open_admin, max_store_bytes=args.max_store_bytes,
                        max_concurrent_uploads=args.max_concurrent_uploads,
                        adapter_limits=AdapterLimits(max_rank=args.max_adapter_rank,
                                                     max_tensor_bytes=args.max_adapter_bytes,
                                                     dtypes=tuple(args.adapter_dtypes)))


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(serve(config_from(args)))
    return 0
