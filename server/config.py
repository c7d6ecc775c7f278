"""The server's one typed config, validated once; every limit a request is checked against lives here."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from adalora.config import ConfigError, is_int, is_number
from adalora.dtypes import DTYPE_NAMES
from adalora.engine.lean import WEIGHTS
from adalora.engine.scheduler import DECODERS
from adalora.engine.errors import InvalidRequest
from adalora.engine.stream import GATHER_MAX_S
from adalora.server import tls
from adalora.server.adapter_checks import AdapterLimits


def _positive_int(name: str, value: object) -> None:
    if not is_int(value, 1):
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class ServerConfig:
    """What `adalora serve` runs and the limits it enforces before any work starts."""

    base_model: str
    """Folder of the base model (config.json + safetensors, and a tokenizer for text prompts)."""
    adapter_dir: str
    """The adapter store: one folder per adapter id (native or PEFT format)."""
    preload: tuple[str, ...] = ()
    """Adapter ids loaded before the server reports SERVING."""
    host: str = "127.0.0.1"
    """Address to listen on. The gRPC port is plaintext unless tls_cert / tls_key are set; /metrics is always
    plain HTTP."""
    port: int = 50051
    """Port to listen on; 0 = any free port (create_server returns the one bound)."""
    device: str = "cpu"
    """torch device of the model and the adapter slots, e.g. 'cuda' or 'cuda:1'."""
    dtype: str = "float32"
    """Model and slot dtype: float32, bfloat16, float16, or auto (adalora.dtypes.resolve: bfloat16 where the device
    computes it natively, else float32)."""
    decoder: str = "auto"
    """The generation forward (adalora.engine.scheduler.DECODERS): lean (Llama-family models: fused projections,
    a preallocated KV cache), hf (the transformers forward, any causal LM), auto = lean where it runs the model."""
    weights: str = "float"
    """The lean decoder's dense weights (adalora.engine.lean.WEIGHTS): float (the model's) or bf16 (a bfloat16 copy
    made at start); CPU float32 with the native kernels."""
    cuda_graphs: bool = True
    """On CUDA, the lean decoder replays decode steps from CUDA graphs (adalora.engine.graphs); False: eager."""
    max_batch_size: int = 8
    """Generation rows decoded together; further requests wait for a free row."""
    gather_ms: float = 4.0
    """An idle server that gets a generation request waits for more while each comes within this many ms of the
    last (25 ms at most in all), so that a burst prefills in one forward (adalora.engine.stream.AsyncDriver);
    0 = start at once."""
    max_queue: int = 256
    """Generation requests waiting for a batch row; Generate / GenerateStream past it are RESOURCE_EXHAUSTED at
    once (a client should back off and retry, or the operator raise --max-queue or --max-batch-size)."""
    max_slots: int = 16
    """Adapter versions in device slots at once. A request for an adapter not on the device loads it, evicting
    the least recently used unpinned idle one to the host tier; RESOURCE_EXHAUSTED only when every slot holds a
    pinned adapter."""
    max_device_bytes: int | None = None
    """Bytes of adapter factors and heads on the device, all slots together; None = bounded by max_slots only."""
    max_host_bytes: int = 1024**3
    """Bytes of evicted adapters kept in host memory (the next load skips the disk); 0 = no host tier."""
    max_prompt_tokens: int = 2048
    """Longest prompt accepted, in tokens."""
    max_new_tokens: int = 1024
    """Largest max_new_tokens a request may ask for."""
    default_max_new_tokens: int = 64
    """max_new_tokens of a request that leaves it 0."""
    max_inputs: int = 64
    """Most inputs in one Classify or Embed request."""
    max_message_bytes: int = 4 * 1024 * 1024
    """Largest request or response message; a larger one is refused by gRPC (RESOURCE_EXHAUSTED)."""
    max_upload_bytes: int = 1024**3
    """Most bytes of one UploadAdapter (all its files); an upload declaring more is RESOURCE_EXHAUSTED before any
    byte is written. Its chunks are messages: each stays under max_message_bytes."""
    adapter_limits: AdapterLimits = AdapterLimits()
    """Caps every adapter read from the store or uploaded must fit, checked from its file headers before any tensor
    is read (rank, bytes of tensor data, dtypes, header size, tensor count); a refused adapter is
    FAILED_PRECONDITION and changes nothing that serves."""
    grace_s: float = 10.0
    """On SIGTERM: seconds in-flight requests get to finish before they are cancelled."""
    drain_delay_s: float = 0.0
    """On SIGTERM, before the drain: seconds the server still takes new requests while its health already says
    NOT_SERVING, so that load balancers and endpoint pickers that follow readiness stop sending to it before its
    ports close (a second SIGTERM ends the delay). 0 = drain at once."""
    metrics_port: int | None = None
    """Port of the Prometheus /metrics endpoint on `host`; None = no endpoint, 0 = any free port (the Server
    reports the one bound)."""
    http_port: int | None = None
    """Port of the OpenAI-compatible HTTP API (server.http) on `host`; None = off (`adalora serve` defaults to
    8000), 0 = any free port (Server.http_port reports the one bound). TLS as the gRPC port when tls_cert is set."""
    served_model_name: str | None = None
    """The base model's name in the HTTP API's "model" field and /v1/models; None = the base folder's name."""
    api_key: str | None = None
    """Bearer token every /v1 HTTP route requires (`--api-key` / ADALORA_API_KEY), as vLLM's --api-key; None = none.
    /health and /metrics never need it; the admin routes take the admin credentials instead."""
    http_timeout_s: float = 600.0
    """An HTTP request's deadline: not admitted to a batch row by then, it is dropped unrun (504); still running,
    it is cancelled (504, or the stream ends)."""
    reflection: bool = False
    """Also serve gRPC server reflection (grpc.reflection.v1alpha) for tools such as grpcurl."""
    ready_file: str | None = None
    """`adalora serve` only: once health turns SERVING, this file is written atomically with JSON {"host", "port",
    "metrics_port", "http_port", "pid"} (the bound ports, so whoever started it with port 0 learns them), and it is removed
    when draining starts (and at startup, should an earlier run have left it). None = no file."""

    admin_token: str | None = None
    """Bearer token the admin RPCs (LoadAdapter, UnloadAdapter, UploadAdapter) require in metadata `authorization:
    Bearer <token>` (missing: UNAUTHENTICATED, wrong: PERMISSION_DENIED). None and no admin_client_names: the admin
    RPCs are open on a loopback host and closed (PERMISSION_DENIED) on any other, unless insecure_open_admin. Other
    RPCs never need it."""
    insecure_open_admin: bool = False
    """Open the admin RPCs to every caller on a non-loopback host without credentials (`--insecure-open-admin`);
    logged as a warning at start. Only for a network where every client is trusted."""
    max_store_bytes: int = 8 * 1024**3
    """Quota of the adapter store: bytes of every file in it (uploads in flight counted at their declared size);
    an upload that would pass it is RESOURCE_EXHAUSTED before any byte is written. 0 = no quota."""
    max_concurrent_uploads: int = 4
    """UploadAdapter calls receiving at once, whatever their ids; one more is RESOURCE_EXHAUSTED at once."""

    tls_cert: str | None = None
    """PEM certificate (chain) of the gRPC port; with tls_key the port speaks TLS. None (with tls_key None) =
    plaintext."""
    tls_key: str | None = None
    """PEM private key of tls_cert."""
    tls_client_ca: str | None = None
    """PEM of the CA(s) that sign client certificates: every client must present one they signed (mutual TLS), or
    the handshake fails. Needs tls_cert / tls_key."""
    admin_client_names: tuple[str, ...] = ()
    """Subject common names or SAN DNS names of client certificates that may call the admin RPCs without the
    token (the token, if set, still works too). Needs tls_client_ca, so the names come from verified
    certificates only."""

    def __post_init__(self) -> None:
        if isinstance(self.preload, str) or not isinstance(self.preload, tuple):
            raise ConfigError(f"preload must be a tuple of adapter ids, got {self.preload!r}")
        if not is_int(self.port, 0, 65535):
            raise ConfigError(f"port must be in [0, 65535] (0 = any free port), got {self.port!r}")
        if self.metrics_port is not None:
            if not is_int(self.metrics_port, 0, 65535):
                raise ConfigError(f"metrics_port must be in [0, 65535] (0 = any free port), or None for no metrics "
                                  f"endpoint; got {self.metrics_port!r}")
            if self.metrics_port == self.port != 0:
                raise ConfigError(f"metrics_port and port are both {self.port}; give /metrics a port of its own")
        if self.http_port is not None:
            if not is_int(self.http_port, 0, 65535):
                raise ConfigError(f"http_port must be in [0, 65535] (0 = any free port), or None for no HTTP API; got "
                                  f"{self.http_port!r}")
            if self.http_port != 0 and self.http_port in (self.port, self.metrics_port):
                raise ConfigError(f"http_port {self.http_port} is also the gRPC or metrics port; give the HTTP API a "
                                  f"port of its own (--http-port)")
        for name in ("served_model_name", "api_key"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip() or value != value.strip()):
                raise ConfigError(f"{name} must be a non-empty string without surrounding whitespace, or None; check "
                                  f"--{name.replace('_', '-')}")
        if not is_number(self.http_timeout_s) or self.http_timeout_s <= 0:
            raise ConfigError(f"http_timeout_s must be a number of seconds > 0, got {self.http_timeout_s!r}")
        if self.ready_file is not None and (not isinstance(self.ready_file, str) or not self.ready_file.strip()):
            raise ConfigError(f"ready_file must be a file path, or None for no ready file; got {self.ready_file!r} "
                              f"(check --ready-file)")
        if self.dtype not in DTYPE_NAMES:
            raise ConfigError(f"dtype {self.dtype!r} is not one of {list(DTYPE_NAMES)}")
        if self.decoder not in DECODERS:
            raise ConfigError(f"decoder {self.decoder!r} is not one of {list(DECODERS)}")
        if self.weights not in WEIGHTS:
            raise ConfigError(f"weights {self.weights!r} is not one of {list(WEIGHTS)}")
        if isinstance(self.gather_ms, bool) or not isinstance(self.gather_ms, (int, float)) \
                or not 0 <= self.gather_ms <= GATHER_MAX_S * 1000:
            raise ConfigError(f"gather_ms must be a number of milliseconds in [0, {GATHER_MAX_S * 1000:g}], got "
                              f"{self.gather_ms!r} (check --gather-ms)")
        if not isinstance(self.cuda_graphs, bool):
            raise ConfigError(f"cuda_graphs must be True or False, got {self.cuda_graphs!r}")
        if self.weights != "float" and (self.decoder == "hf" or self.dtype != "float32" or self.device != "cpu"):
            raise ConfigError(f"--weights {self.weights} runs on the lean decoder over a float32 model on the CPU; "
                              f"got --decoder {self.decoder} --dtype {self.dtype} --device {self.device}")
        if self.admin_token is not None and (not isinstance(self.admin_token, str) or not self.admin_token.strip()
                                             or self.admin_token != self.admin_token.strip()):
            raise ConfigError("admin_token must be a non-empty string without surrounding whitespace, or None to "
                              "leave the admin RPCs open; check --admin-token / ADALORA_ADMIN_TOKEN")
        for name in ("max_batch_size", "max_queue", "max_slots", "max_prompt_tokens", "max_new_tokens",
                     "default_max_new_tokens", "max_inputs", "max_message_bytes", "max_upload_bytes",
                     "max_concurrent_uploads"):
            _positive_int(name, getattr(self, name))
        if not is_int(self.max_store_bytes, 0):
            raise ConfigError(f"max_store_bytes must be an integer >= 0 (0 = no quota), got {self.max_store_bytes!r}")
        if self.insecure_open_admin and (self.admin_token is not None or self.admin_client_names):
            raise ConfigError("insecure_open_admin (--insecure-open-admin) opens the admin RPCs to callers without "
                              "credentials; it cannot be combined with an admin token or --admin-client-name")
        if self.max_device_bytes is not None:
            _positive_int("max_device_bytes", self.max_device_bytes)
        if not isinstance(self.adapter_limits, AdapterLimits):
            raise ConfigError(f"adapter_limits must be an AdapterLimits, got {self.adapter_limits!r}")
        if not is_int(self.max_host_bytes, 0):
            raise ConfigError(f"max_host_bytes must be an integer >= 0 (0 = no host tier), got {self.max_host_bytes!r}")
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ConfigError(f"default_max_new_tokens ({self.default_max_new_tokens}) exceeds max_new_tokens "
                              f"({self.max_new_tokens}); lower the default or raise the cap")
        if not isinstance(self.grace_s, (int, float)) or self.grace_s < 0:
            raise ConfigError(f"grace_s must be >= 0 seconds, got {self.grace_s!r}")
        if not is_number(self.drain_delay_s) or self.drain_delay_s < 0:
            raise ConfigError(f"drain_delay_s must be >= 0 seconds (--drain-delay), got {self.drain_delay_s!r}")
        self._check_tls()

    @property
    def model_name(self) -> str:
        """The base model's name on the HTTP API."""
        return self.served_model_name or Path(self.base_model).name

    def max_new(self, requested: int | None) -> int:
        """A request's max_new_tokens: default_max_new_tokens when it gives none (None or 0), refused over the cap."""
        max_new = requested or self.default_max_new_tokens
        if max_new > self.max_new_tokens:
            raise InvalidRequest(f"max_new_tokens {max_new} is over this server's cap of {self.max_new_tokens}; ask "
                                 f"for fewer (the cap is the server's --max-new-tokens)")
        return max_new

    @property
    def loopback_only(self) -> bool:
        """Whether `host` is a loopback address (127.0.0.0/8, ::1, localhost): only this machine can connect."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:  # a host name: it may resolve to any interface
            return False

    @property
    def admin_credentials(self) -> bool:
        return self.admin_token is not None or bool(self.admin_client_names)

    @property
    def admin_open(self) -> bool:
        """Whether the admin RPCs take callers without credentials: no credentials are configured, and the
        server listens on loopback only or was told --insecure-open-admin."""
        return not self.admin_credentials and (self.loopback_only or self.insecure_open_admin)

    def _check_tls(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert (--tls-cert) and tls_key (--tls-key) go together: give both for a TLS port, "
                              "or neither for plaintext")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("tls_client_ca (--tls-client-ca) needs tls_cert and tls_key (--tls-cert, --tls-key): "
                              "client certificates are only asked for on a TLS port")
        for field in ("tls_cert", "tls_key", "tls_client_ca"):
            if getattr(self, field) is not None:
                tls.check_readable(getattr(self, field), f"{field} (--{field.replace('_', '-')})")
        names = self.admin_client_names
        if isinstance(names, str) or not isinstance(names, tuple) or \
                not all(isinstance(n, str) and n.strip() == n != "" for n in names):
            raise ConfigError(f"admin_client_names (--admin-client-name) must be a tuple of non-empty names without "
                              f"surrounding whitespace, got {names!r}")
        if names and self.tls_client_ca is None:
            raise ConfigError("admin_client_names (--admin-client-name) needs tls_client_ca (--tls-client-ca): a "
                              "client certificate's name only counts once the server has verified it")
