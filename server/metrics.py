"""Prometheus metrics of the gRPC server, served over HTTP at /metrics by `adalora serve --metrics-port` (with
/healthz beside it: the server's health for HTTP probes).

Each Server owns one Metrics with its own CollectorRegistry (never prometheus_client's global one), so a process
can hold many servers (the tests do). Who records what:

  servicer  adalora_requests_total{rpc, adapter, status}  every RPC, errors included (status: grpc code name)
            adalora_request_seconds{rpc, adapter}         every RPC's latency, errors included
  backend   adalora_queue_seconds{adapter}                Generate: received -> start of the step that admitted it
            adalora_time_to_first_token_seconds{adapter}  received -> first token
            adalora_time_per_output_token_seconds{adapter}  (last token - first token) / (tokens - 1), per request
            adalora_prompt_tokens_total{adapter}, adalora_generated_tokens_total{adapter}  of finished generations
            adalora_batch_size                            rows of each decode forward of the generation loop
            adalora_adapter_load_seconds, adalora_adapter_cache_{hits,misses}_total, adalora_adapter_evictions_total
  scrape    adalora_queue_depth, adalora_running_requests, adalora_adapters{tier}, adalora_adapter_device_bytes,
            lora_requests_info, and the vllm: aliases below (computed when scraped, from the live state)

The three timing histograms count generations whose caller stayed to the end; a cancelled request is dropped
at the next step and an expired one never runs, so neither counts tokens or timings; time per output token needs
two tokens or more.

Adapter cache (the device slots; server.residency): a hit is a request (or a LoadAdapter) whose adapter was on
the device already, a miss one that had to load it (from host memory or the disk; a reload=true replace counts
too; concurrent requests waiting for one load are one miss), and an eviction an adapter version leaving its slot
(to make room, UnloadAdapter, or the old version a reload replaced, once its last request ended); load seconds
are observed per load. adapters{tier}: device = in slots, host = in host memory, disk = store folders in neither.

`adapter` label values stay bounded by the adapters the server knows:
  <id>          an id that is loaded or a folder in the store
  __unknown__   any other id (unknown, malformed): requests naming 1000 unknown ids add no series
  __mix__       a weighted mixture, whatever its ids
  ""            the request names no adapter (generation on the base model, ListAdapters)

Gateway API Inference Extension: its model server protocol (gateway-api-inference-extension
docs/proposals/003-model-server-protocol) has the endpoint picker (EPP) scrape /metrics for a gauge of queued
requests (TotalQueuedRequests, vLLM's `vllm:num_requests_waiting`), a KV-cache utilization gauge, and for LoRA
affinity the gauge `vllm:lora_requests_info` with labels running_lora_adapters and waiting_lora_adapters
(comma-joined ids) and max_lora, whose value is the time of the last update (the EPP reads the newest series).
Names need not match, types and semantics must; the EPP picks them by name (flags --total-queued-requests-metric,
--total-running-requests-metric, --lora-info-metric, or engineConfigs in EndpointPickerConfig since v1.5), with
vLLM's names as defaults. So the queue and running gauges and lora_requests_info are exposed under our names and
again under vLLM's (`vllm:num_requests_waiting`, `vllm:num_requests_running`, `vllm:lora_requests_info`), and an
EPP with default settings reads them. lora_requests_info has exactly one series, valued at the scrape's unix time.
KV-cache utilization: the generator's cache has no fixed pool to fill (it grows with its batch); what fills up is
the batch's rows, past which requests queue. So `adalora_batch_rows_used_ratio` (running requests / max batch
rows, 0..1) is also exported as `vllm:gpu_cache_usage_perc`, the EPP's default KV-cache metric, and as
`vllm:kv_cache_usage_perc`, the name newer EPPs (and vLLM >= 0.10) default to: 1.0 means a new request will wait,
as with a full KV cache.

Names keep their colons in every exposition format (`exposition`): prometheus_client >= 0.23 escapes a name's colons
to underscores in OpenMetrics unless the scraper asks otherwise, and a Prometheus that negotiates OpenMetrics (2.x
does by default) then stores `vllm_num_requests_waiting`, which an EPP asking for the vLLM name never finds.
"""

from __future__ import annotations

import math
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client import openmetrics
from prometheus_client.exposition import ThreadingWSGIServer, choose_encoder
from prometheus_client.openmetrics import exposition as openmetrics_exposition
from prometheus_client.core import GaugeMetricFamily, Metric

from adalora.engine.engine import Selection
from adalora.engine.scheduler import GenerationResult
from adalora.server.store import AdapterStore

NO_ADAPTER, MIX, UNKNOWN = "", "__mix__", "__unknown__"
"""`adapter` label values other than a known adapter id (see the module docstring)."""

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class InFlight:
    """Generation requests from submit to finish, each waiting (not yet in the batch) or running, with the adapter
    ids it runs. Thread-safe: the event loop queues and finishes, the generation thread admits, scrapes read."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[int, tuple[bool, frozenset[str]]] = {}
        """key -> (running, adapter ids)."""

    def queued(self, key: int, adapter_ids: Iterable[str]) -> None:
        with self._lock:
            self._requests[key] = (False, frozenset(adapter_ids))

    def admitted(self, key: int) -> None:
        with self._lock:
            if key in self._requests:
                self._requests[key] = (True, self._requests[key][1])

    def finished(self, key: int) -> None:
        with self._lock:
            self._requests.pop(key, None)

    def snapshot(self) -> tuple[list[frozenset[str]], list[frozenset[str]]]:
        """(adapter ids of each waiting request, of each running request)."""
        with self._lock:
            states = list(self._requests.values())
        return [ids for running, ids in states if not running], [ids for running, ids in states if running]


def joined(requests: list[frozenset[str]]) -> str:
    """Sorted distinct ids of `requests`, comma-joined (the lora_requests_info label format)."""
    return ",".join(sorted(set().union(*requests)))


class Metrics:
    """The server's metrics and the small recording API the servicer and the Backend call."""

    def __init__(self, max_slots: int, max_batch_size: int | None = None) -> None:
        self.registry = CollectorRegistry()
        self.max_slots, self.max_batch_size = max_slots, max_batch_size
        self.inflight = InFlight()
        self.loaded: frozenset[str] = frozenset()
        """Ids in slots, replaced whole by adapters_changed (scrapes read it from another thread)."""
        self.host: frozenset[str] = frozenset()
        """Ids in host memory, off the device."""
        self.device_bytes = 0
        self._store: AdapterStore | None = None
        r = self.registry
        self.requests = Counter("adalora_requests", "RPCs answered, by method, adapter and gRPC status",
                                ("rpc", "adapter", "status"), registry=r)
        self.request_seconds = Histogram("adalora_request_seconds", "RPC latency, errors included",
                                         ("rpc", "adapter"), buckets=LATENCY_BUCKETS, registry=r)
        self.queue_seconds = Histogram("adalora_queue_seconds", "Generate: received until admitted to the batch",
                                       ("adapter",), buckets=LATENCY_BUCKETS, registry=r)
        self.first_token_seconds = Histogram("adalora_time_to_first_token_seconds", "Generate: received until the "
                                             "first token", ("adapter",), buckets=LATENCY_BUCKETS, registry=r)
        self.token_seconds = Histogram("adalora_time_per_output_token_seconds", "Generate: mean time between "
                                       "output tokens of one request", ("adapter",), buckets=TOKEN_BUCKETS, registry=r)
        self.prompt_tokens = Counter("adalora_prompt_tokens", "Prompt tokens of finished generations", ("adapter",),
                                     registry=r)
        self.generated_tokens = Counter("adalora_generated_tokens", "Tokens generated by finished generations",
                                        ("adapter",), registry=r)
        self.batch_size = Histogram("adalora_batch_size", "Rows of each decode step", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.load_seconds = Histogram("adalora_adapter_load_seconds", "Adapter loads onto the device: read (disk "
                                      "or host memory), validation and slot write",
                                      buckets=LOAD_BUCKETS, registry=r)
        self.cache_hits = Counter("adalora_adapter_cache_hits", "Adapters a request found on the device",
                                  registry=r)
        self.cache_misses = Counter("adalora_adapter_cache_misses", "Adapter loads onto the device", registry=r)
        self.evictions = Counter("adalora_adapter_evictions", "Adapter versions that left their slot (unload or "
                                 "replaced by a reload)", registry=r)
        r.register(LiveCollector(self))

    # ---- labels ---------------------------------------------------------------------------------------------

    def watch_store(self, store: AdapterStore) -> None:
        """Ids in `store` become label values, and its folders count as the disk tier."""
        self._store = store

    def registered(self, adapter_id: str) -> bool:
        return adapter_id in self.loaded or (self._store is not None and self._store.holds(adapter_id))

    def adapter_label(self, adapter: Selection) -> str:
        if adapter is None:
            return NO_ADAPTER
        if isinstance(adapter, Mapping):
            return MIX
        return adapter if self.registered(adapter) else UNKNOWN

    # ---- recording ------------------------------------------------------------------------------------------

    def rpc_done(self, rpc: str, adapter: Selection, status: str, seconds: float) -> None:
        label = self.adapter_label(adapter)
        self.requests.labels(rpc, label, status).inc()
        self.request_seconds.labels(rpc, label).observe(seconds)

    def generation_timed(self, label: str, queue_s: float, first_token_s: float, total_s: float,
                         tokens: int) -> None:
        self.queue_seconds.labels(label).observe(queue_s)
        self.first_token_seconds.labels(label).observe(first_token_s)
        if tokens > 1:
            self.token_seconds.labels(label).observe((total_s - first_token_s) / (tokens - 1))

    def generation_finished(self, key: int, label: str, result: GenerationResult | None) -> None:
        """The request left the generator: with its result, or None when it failed."""
        self.inflight.finished(key)
        if result is not None:
            self.prompt_tokens.labels(label).inc(result.prompt_tokens)
            self.generated_tokens.labels(label).inc(result.completion_tokens)

    def adapters_changed(self, device: Iterable[str], host: Iterable[str], device_bytes: int) -> None:
        """The ids on the device and in host memory, and the bytes the device slots hold, after any move."""
        self.loaded, self.host, self.device_bytes = frozenset(device), frozenset(host), device_bytes

    def disk_adapters(self) -> float:
        if self._store is None:
            return 0
        try:
            return len(set(self._store.ids()) - self.loaded - self.host)
        except OSError:  # the store folder went away: unknown, not 0
            return math.nan


def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


class LiveCollector:
    """The gauges computed at scrape time from the live state, so they cannot drift and lora_requests_info
    never has a stale label set."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        waiting, running = m.inflight.snapshot()
        for name in ("adalora_queue_depth", "vllm:num_requests_waiting"):
            yield gauge(name, "Generation requests waiting for a batch row", len(waiting))
        for name in ("adalora_running_requests", "vllm:num_requests_running"):
            yield gauge(name, "Generation requests in the batch", len(running))
        if m.max_batch_size:
            for name in ("adalora_batch_rows_used_ratio", "vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc"):
                yield gauge(name, "Running requests / batch rows (1 = new requests wait; the KV-cache "
                            "utilization signal)", len(running) / m.max_batch_size)
        for name in ("lora_requests_info", "vllm:lora_requests_info"):
            info = GaugeMetricFamily(name, "Adapters with running / waiting requests; value: unix time of this "
                                     "state", labels=("running_lora_adapters", "waiting_lora_adapters", "max_lora"))
            info.add_metric((joined(running), joined(waiting), str(m.max_slots)), time.time())
            yield info
        tiers = GaugeMetricFamily("adalora_adapters", "Adapters by tier: device = loaded in slots, host = in host "
                                  "memory, disk = in the store only", labels=("tier",))
        for tier, count in (("device", len(m.loaded)), ("host", len(m.host)), ("disk", m.disk_adapters())):
            tiers.add_metric((tier,), count)
        yield tiers
        yield gauge("adalora_adapter_device_bytes", "Bytes of adapter factors and heads in slots", m.device_bytes)


def exposition(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """(body, content type) of a scrape whose Accept header is `accept`: prometheus_client's negotiation, except
    that OpenMetrics keeps every name as it is (escaping=allow-utf-8; all our names are legal OpenMetrics names,
    colons included, so none is quoted)."""
    encoder, content_type = choose_encoder(accept or "")
    if content_type.startswith("application/openmetrics-text"):
        body = openmetrics_exposition.generate_latest(registry, escaping=openmetrics.exposition.ALLOWUTF8)
        return body, "application/openmetrics-text; version=1.0.0; charset=utf-8; escaping=allow-utf-8"
    return encoder(registry), content_type


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        pass  # one line per scrape or probe on stderr is noise


class MetricsEndpoint:
    """Plain HTTP on a daemon thread; port 0 = any free port:
      GET /metrics  `registry` in the format the Accept header asks for (`exposition`)
      GET /healthz  200 "SERVING" or 503 "NOT_SERVING": the gRPC health status of the whole server (`serving`),
                    for probes that speak HTTP whatever the gRPC port's TLS (Docker HEALTHCHECK, kubelet httpGet)
      anything else 404
    """

    def __init__(self, registry: CollectorRegistry, host: str, port: int, serving: Callable[[], bool]) -> None:
        def app(environ, start_response):
            path = environ.get("PATH_INFO")
            if path == "/metrics":
                body, content_type = exposition(registry, environ.get("HTTP_ACCEPT"))
                start_response("200 OK", [("Content-Type", content_type)])
                return [body]
            if path == "/healthz":
                ok = serving()
                start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
                return [b"SERVING\n" if ok else b"NOT_SERVING\n"]
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: this port serves /metrics and /healthz\n"]

        class Server(ThreadingWSGIServer):
            address_family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)[0][0]

        try:
            self._httpd = make_server(host, port, app, Server, handler_class=_QuietHandler)
        except OSError as e:
            raise OSError(f"cannot serve metrics on {host}:{port} ({e}); pick another --metrics-port") from e
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="adalora-metrics", daemon=True)
        self._thread.start()
        self.port: int = self._httpd.server_port

    def close(self) -> None:
        """Stop serving (blocks up to the server's 0.5 s poll interval)."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
