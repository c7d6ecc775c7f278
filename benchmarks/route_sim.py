"""Routing many adapters over N replicas of `adalora serve`: a discrete-event simulation in simulated time.

N replicas (1-64) serve requests whose adapter is drawn from a Zipf popularity over A adapters (up to 10,000).
A router sends each request to one replica; this compares four routers on the adapter cache hit rate, adapter
loads per second, p50 / p99 time to first token, and throughput against N (how close to linear).

One replica (server/residency.py and the engine's continuous batching, with the costs of docs/BENCHMARKS.md):

- Continuous batching: up to B rows (--batch 8) decode together. A request takes a free row at the next step
  boundary, else waits in the replica's FIFO queue. Joining costs one prefill (--prefill-ms 40, a 32-token
  prompt) under the model lock; its first token comes at the end of the next decode step, its last after
  --out-tokens (64) steps.
- A decode step of b rows with k distinct adapters among them takes `Costs.step_ms`: 32 + 3.5 b + 1.5 k ms,
  fitted to SmolLM2-135M float32 on the 2-core CPU (batch 1 weight-read bound at ~32 ms, ~60 ms for 8 rows on
  the base, 8 distinct adapters at 0.83x the base's throughput). Every number is a flag.
- Tiers as in server/residency.py: S device slots (--slots 16) and a host tier of H adapters (--host 128), each
  LRU, exclusive. A request acquires its adapter when it reaches the replica, before it queues, and holds it until
  it ends (so queued requests pin their adapters too, as in the server). On the device: a hit, nothing to pay.
  In the host tier: a slot write of --slot-load-ms (15). Otherwise the store read, --disk-read-ms (125), runs
  off the model lock as the server's does (asyncio.to_thread), then the
  slot write; --disk-read-locked charges the read under the lock instead (the pessimistic model). Slot writes
  serialize with the steps (the model lock, taken between two steps) and with each other in the order their
  reads finished (the server's `_room` lock). One load per adapter however many requests wait for it. A full
  device evicts its least recently used idle adapter to the host tier (whose LRU one drops to disk); when every
  slot holds an adapter in use the load waits for a release.

Popularity: adapter i (rank 1..A) has probability proportional to 1 / i^s (--zipf 1.0); --base-fraction of the
requests name no adapter. Arrivals are Poisson at rho * N * mu1, where mu1 is one saturated replica's
throughput without adapter loads: every B requests occupy the B rows for T = out_tokens steps and pay B prefills,

    mu1 = B / (T * step_ms(B, k_bar) + B * prefill_ms)     requests per ms,

with k_bar = sum_i (1 - (1 - (1 - f) p_i)^B) the expected distinct adapters among B requests drawn from the
popularity (f = base fraction). Defaults (Zipf 1.0 over 10,000): k_bar = 7.6, step 71.4 ms, mu1 = 1.64 req/s.
"Linear" is N * mu1; a policy that co-locates an adapter's requests batches fewer distinct adapters than k_bar
and can pass 1.0.

Routers (POLICIES; each `choose(request, cluster, rng)` returns a replica index, or None when no replica has room,
which only Ray's does: the router then retries):

- random: a replica uniformly at random.
- least-loaded: the fewest outstanding requests (routed, not finished), ties at random.
- affinity: consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018) made residency-aware.
  A replica is eligible while its outstanding requests are under bound = max(B, ceil(c * (total + 1) / N))
  (--affinity-slack c = 1.25): a free row always qualifies, and no replica runs more than c times the mean
  load. Among eligible replicas that hold the adapter on the device it picks the least loaded; else among
  those holding it in the host tier; else the first eligible replica in the adapter's own pseudo-random
  preference order over replicas (rendezvous hashing). So an adapter's requests stay on one replica while it
  keeps up, a hot adapter spills to its second, third, ... preferred replicas (a fixed small set per adapter,
  which then hold it too), and a rare one goes to its first preferred replica, where its previous requests
  loaded it. The residency it reads (which replicas hold what) is exact, as a router fed by the replicas'
  load/evict events would see it.
- ray: Ray Serve's default request router with multiplexed model ids (read at ray-project/ray
  python/ray/serve/_private/request_router/pow_2_router.py, PowerOfTwoChoicesRequestRouter.choose_replicas, and
  request_router.py, MultiplexMixin.apply_multiplex_routing, _select_from_candidate_replicas and
  _choose_replicas_with_backoff; constants.py for the defaults), the adapter id as the model id. Each try takes a
  candidate set, samples two of it at random and sends to the one with the shorter queue among those under
  max_ongoing_requests (--ray-max-ongoing; Ray's default is 5, here 2B = 16 so that the B rows can fill).
  Candidates: on the first try the replicas that report the model (else those reporting the fewest models);
  later tries within the matching timeout (uniform in [T, 2T], T = --ray-match-timeout-s 1.0) the replicas
  with the fewest models; after it, those once more, then every replica. A try that finds no candidate with room
  retries: at once the first time, then after 25, 50, 100, ... ms, at most 500 ms. At most min(50, 2N)
  requests are being routed at once (max_num_routing_tasks); later ones wait in the router's FIFO until a
  routing task is free. A replica reports the adapters in its device slots (what `max_num_models_per_replica` =
  --slots would hold), and the router sees them as of the last report tick (--ray-report-ms 100, Ray's
  PUSH_MULTIPLEXED_MODEL_IDS_INTERVAL_S). Queue lengths are read exact (Ray probes them or caches them). Left
  out: locality, the handing of a found replica to an older pending request of the same model (FIFOMixin), and
  the fallback set shared by concurrent requests of a model no replica reports (it only delays such a request
  by one immediate retry).

Metrics, over the requests that arrive after the first --warmup fraction (caches start cold): hit rate =
requests whose adapter was on the device when they reached their replica / requests naming an adapter; loads/s =
slot writes (host and disk) per second of that window, cluster-wide; TTFT = arrival to first token (router wait
included), p50 and p99; throughput = requests finished and tokens decoded per second in the window; and its
fraction of linear, throughput / (N * mu1). After the last arrival the replicas drain, so every measured request
has a TTFT. Arrivals and adapters are the same for every policy at one (N, A, rho, seed): common random numbers.

Reading it: at rho = 1 a replica is at capacity and its queue a random walk, so TTFT there grows with the length
of the run and the throughput cannot pass the arrivals, whose rate over the window is off by ~1/sqrt(arrivals)
(about 2% with the default 4000 requests at N <= 8); compare policies at one N, which see the same arrivals.
rho < 1 is where TTFT is a property of the router, and rho > 1 measures capacity (throughput = what the
replicas sustain). A request holds a row for 1 / mu1 ~ 610 ms of replica time while a load costs the replica a
4 ms slot write, so under these costs routing changes hit rates, loads and TTFT far more than throughput.

    python benchmarks/route_sim.py [--quick] [--replicas 1 2 4 8 16 32 64] [--adapters 1000 10000]
        [--policies random least-loaded affinity ray] [--rho 0.8 1.0] [--seed 0] [--plot docs/img/route_sim.png]
"""

from __future__ import annotations

import argparse
import ast
import functools
import heapq
import itertools
import math
import sys
import textwrap
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TARGET_FRACTION = 0.9


def _require(ok: bool, flag: str, rule: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{flag} must be {rule}, got {value!r}")


# ---- configuration ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Costs:
    """Service times of one replica, in simulated ms."""

    step_base_ms: float = 32.0
    """Decode step of one row on the base: reading the weights (batch 1 is weight-read bound)."""
    row_ms: float = 3.5
    """Each row of a decode step adds this."""
    adapter_ms: float = 1.5
    """Each distinct adapter among a step's rows adds this."""
    prefill_ms: float = 40.0
    """One request's prefill (a 32-token prompt), under the model lock, when it takes a row."""
    slot_load_ms: float = 15.0
    """Writing an adapter from host memory into a device slot (under the model lock): 14-17 ms median for SmolLM2's
    9.2 MiB AdaLoRA adapters (benchmarks/adapter_load.py)."""
    disk_read_ms: float = 125.0
    """Reading an adapter from the store, validated and checksummed (off the lock unless disk_read_locked): 113-140 ms
    median (benchmarks/adapter_load.py, from the page cache)."""
    disk_read_locked: bool = False
    """Charge the store read under the model lock too (the server reads off it)."""

    def __post_init__(self) -> None:
        for name in ("step_base_ms", "row_ms", "adapter_ms", "prefill_ms", "slot_load_ms", "disk_read_ms"):
            value = getattr(self, name)
            _require(isinstance(value, (int, float)) and value >= 0, _flag(name), "a number >= 0 (ms)", value)
        _require(self.step_base_ms + self.row_ms > 0, "--step-base-ms", "> 0 with --row-ms 0", self.step_base_ms)

    def step_ms(self, rows: int, distinct: int) -> float:
        """One decode step of `rows` rows running `distinct` different adapters: the whole cost model."""
        return self.step_base_ms + self.row_ms * rows + self.adapter_ms * distinct

    def load_lock_ms(self, from_disk: bool) -> float:
        """Model-lock time of loading one adapter (the slot write, and the store read if charged there)."""
        return self.slot_load_ms + (self.disk_read_ms if from_disk and self.disk_read_locked else 0.0)


@dataclass(frozen=True)
class ReplicaSpec:
    """What one replica holds."""

    batch: int = 8
    """Rows decoded together (the server's --max-batch-size)."""
    slots: int = 16
    """Adapters on the device at once (--max-slots)."""
    host: int = 128
    """Adapters kept in host memory off the device (the host tier; 0 = none)."""

    def __post_init__(self) -> None:
        _require(_is_int(self.batch, 1), "--batch", "an integer >= 1", self.batch)
        _require(_is_int(self.slots, 1), "--slots", "an integer >= 1", self.slots)
        _require(_is_int(self.host, 0), "--host", "an integer >= 0 (0 = no host tier)", self.host)


@dataclass(frozen=True)
class Workload:
    """The requests, apart from N, A and rho (swept)."""

    zipf: float = 1.0
    """Popularity exponent s: adapter of rank i has probability proportional to 1 / i^s (0 = uniform)."""
    base_fraction: float = 0.0
    """Share of requests that name no adapter."""
    out_tokens: int = 64
    """Tokens each request decodes."""
    requests_per_replica: int = 500
    """Arrivals simulated per replica (the run lasts about this many / (rho * mu1))."""
    min_requests: int = 4000
    """Arrivals simulated at least, whatever N: a small cluster's rates are then as well measured as a large one's."""
    warmup: float = 0.4
    """Share of the arrivals (the first ones) left out of every metric while caches fill."""

    def __post_init__(self) -> None:
        _require(isinstance(self.zipf, (int, float)) and 0 <= self.zipf <= 10, "--zipf", "in [0, 10]", self.zipf)
        _require(isinstance(self.base_fraction, (int, float)) and 0 <= self.base_fraction <= 1,
                 "--base-fraction", "in [0, 1]", self.base_fraction)
        _require(_is_int(self.out_tokens, 1), "--out-tokens", "an integer >= 1", self.out_tokens)
        _require(_is_int(self.requests_per_replica, 10), "--requests-per-replica", "an integer >= 10",
                 self.requests_per_replica)
        _require(_is_int(self.min_requests, 0), "--min-requests", "an integer >= 0", self.min_requests)
        _require(isinstance(self.warmup, (int, float)) and 0 <= self.warmup < 0.9, "--warmup", "in [0, 0.9)",
                 self.warmup)


@dataclass(frozen=True)
class Routing:
    """Parameters of the routers."""

    affinity_slack: float = 1.25
    """Affinity's load bound: at most this times the mean outstanding requests per replica (and always B)."""
    ray_max_ongoing: int = 16
    """Ray's max_ongoing_requests: a replica with this many outstanding refuses (the router retries)."""
    ray_report_ms: float = 100.0
    """How often the Ray router's view of each replica's model ids is refreshed."""
    ray_match_timeout_s: float = 1.0
    """RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S: the model-matching phase lasts U[T, 2T]."""

    def __post_init__(self) -> None:
        _require(isinstance(self.affinity_slack, (int, float)) and self.affinity_slack >= 1, "--affinity-slack",
                 "a number >= 1", self.affinity_slack)
        _require(_is_int(self.ray_max_ongoing, 1), "--ray-max-ongoing", "an integer >= 1", self.ray_max_ongoing)
        _require(isinstance(self.ray_report_ms, (int, float)) and self.ray_report_ms > 0, "--ray-report-ms",
                 "a number > 0 (ms)", self.ray_report_ms)
        _require(isinstance(self.ray_match_timeout_s, (int, float)) and self.ray_match_timeout_s >= 0,
                 "--ray-match-timeout-s", "a number >= 0 (s)", self.ray_match_timeout_s)


@dataclass(frozen=True)
class SimConfig:
    costs: Costs = field(default_factory=Costs)
    replica: ReplicaSpec = field(default_factory=ReplicaSpec)
    workload: Workload = field(default_factory=Workload)
    routing: Routing = field(default_factory=Routing)


@dataclass(frozen=True)
class Sweep:
    """The grid: every policy at every (N, A, rho)."""

    replicas: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    adapters: tuple[int, ...] = (1000, 10_000)
    policies: tuple[str, ...] = ("random", "least-loaded", "affinity", "ray")
    rhos: tuple[float, ...] = (0.8, 1.0)
    seed: int = 0

    def __post_init__(self) -> None:
        _require(len(self.replicas) > 0 and all(_is_int(n, 1) for n in self.replicas), "--replicas",
                 "one or more integers >= 1", self.replicas)
        _require(len(self.adapters) > 0 and all(_is_int(a, 1) for a in self.adapters), "--adapters",
                 "one or more integers >= 1", self.adapters)
        unknown = [p for p in self.policies if p not in POLICIES]
        _require(len(self.policies) > 0 and not unknown, "--policies", f"among {', '.join(POLICIES)}",
                 unknown or self.policies)
        _require(len(self.rhos) > 0 and all(isinstance(r, (int, float)) and 0 < r <= 2 for r in self.rhos),
                 "--rho", "one or more load factors in (0, 2]", self.rhos)
        _require(_is_int(self.seed, 0), "--seed", "an integer >= 0", self.seed)


def _is_int(value: object, low: int) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= low


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ---- the workload and one replica's capacity --------------------------------------------------------------------


def zipf_probs(adapters: int, s: float) -> np.ndarray:
    """(A,) popularity of the adapters by rank, summing to 1."""
    weights = np.arange(1, adapters + 1, dtype=np.float64) ** -s
    return weights / weights.sum()


def expected_distinct(probs: np.ndarray, base_fraction: float, batch: int) -> float:
    """Expected distinct adapters among `batch` independent requests (a base request names none)."""
    return float(np.sum(1.0 - (1.0 - (1.0 - base_fraction) * probs) ** batch))


def saturated_rate(costs: Costs, batch: int, out_tokens: int, distinct: float) -> float:
    """mu1: requests/s of one replica whose B rows are always full, without adapter loads."""
    cycle_ms = out_tokens * costs.step_ms(batch, distinct) + batch * costs.prefill_ms
    return 1000.0 * batch / cycle_ms


def replica_rate(cfg: SimConfig, adapters: int) -> float:
    """mu1 for `adapters` adapters under cfg's popularity."""
    probs = zipf_probs(adapters, cfg.workload.zipf)
    k_bar = expected_distinct(probs, cfg.workload.base_fraction, cfg.replica.batch)
    return saturated_rate(cfg.costs, cfg.replica.batch, cfg.workload.out_tokens, k_bar)


def arrivals(rng: np.random.Generator, count: int, rate_per_ms: float, probs: np.ndarray,
             base_fraction: float) -> tuple[list[float], list[int]]:
    """Poisson arrival times (ms) and each request's adapter (-1 = the base model)."""
    times = np.cumsum(rng.exponential(1.0 / rate_per_ms, count))
    adapter = rng.choice(len(probs), size=count, p=probs)
    adapter[rng.random(count) < base_fraction] = -1
    return times.tolist(), adapter.tolist()


# ---- one replica ------------------------------------------------------------------------------------------------


class Tiers:
    """Device slots and the host tier of one replica, as server/residency.py keeps them: exclusive, each LRU.

    A device adapter in use (users > 0) is never evicted; placing needs a free slot or an idle adapter to evict,
    which moves to the host tier's most recent end (its least recent one then drops to disk)."""

    def __init__(self, slots: int, host: int) -> None:
        self.slots, self.host_size = slots, host
        self.device: dict[int, int] = {}  # adapter -> last use (a tick of self._clock)
        self.users: dict[int, int] = {}  # adapter -> requests holding it
        self.host: OrderedDict[int, None] = OrderedDict()  # least recently evicted first
        self._clock = itertools.count(1)

    def tier(self, adapter: int) -> str:
        if adapter in self.device:
            return "device"
        return "host" if adapter in self.host else "disk"

    def acquire(self, adapter: int, count: int = 1) -> None:
        """`count` requests hold `adapter` (on the device) until release()."""
        self.users[adapter] = self.users.get(adapter, 0) + count
        self.device[adapter] = next(self._clock)

    def release(self, adapter: int) -> None:
        left = self.users[adapter] - 1
        if left:
            self.users[adapter] = left
        else:
            del self.users[adapter]

    def _victim(self) -> int | None:
        idle = [(used, a) for a, used in self.device.items() if a not in self.users]
        return min(idle)[1] if idle else None

    def has_room(self) -> bool:
        return len(self.device) < self.slots or self._victim() is not None

    def place(self, adapter: int) -> tuple[int | None, int | None]:
        """Put `adapter` on the device (has_room() must hold). Returns (evicted to host, dropped to disk)."""
        evicted = dropped = None
        self.host.pop(adapter, None)
        if len(self.device) >= self.slots:
            evicted = self._victim()
            del self.device[evicted]
            dropped = self._to_host(evicted)
        self.device[adapter] = next(self._clock)
        return evicted, dropped

    def _to_host(self, adapter: int) -> int | None:
        if self.host_size == 0:
            return adapter
        self.host[adapter] = None
        if len(self.host) > self.host_size:
            return self.host.popitem(last=False)[0]
        return None


HOST, DISK = 0, 1  # where a load reads the adapter from


class Replica:
    """One `adalora serve`: its tiers, the loads in flight, the FIFO queue and the decoding rows."""

    def __init__(self, index: int, spec: ReplicaSpec) -> None:
        self.index = index
        self.tiers = Tiers(spec.slots, spec.host)
        self.loading: dict[int, list[int]] = {}  # adapter -> requests waiting for its load
        self.ready: deque[tuple[int, int]] = deque()  # (adapter, HOST | DISK): read, waiting for a slot write
        self.queue: deque[int] = deque()  # requests holding their adapter, waiting for a row
        self.rows: list[list[int]] = []  # [request, adapter, tokens left]
        self.row_adapters: dict[int, int] = {}  # adapter (>= 0) -> rows running it
        self.outstanding = 0  # routed here and not finished
        self.busy = False  # a boundary event is scheduled
        self.stepping = False  # ... and it ends a decode step
        self.version = 0  # bumped whenever the device set changes (what a replica reports)


# ---- the cluster a router sees -------------------------------------------------------------------------------


class Request(NamedTuple):
    rid: int
    adapter: int  # -1 = base model
    arrival_ms: float


class Cluster:
    """The replicas and where each adapter is, as routers read them."""

    def __init__(self, n: int, spec: ReplicaSpec) -> None:
        self.replicas = [Replica(i, spec) for i in range(n)]
        self.batch = spec.batch
        self.now = 0.0
        self.total_outstanding = 0
        self.on_device: dict[int, set[int]] = {}  # adapter -> replicas holding it in a slot
        self.in_host: dict[int, set[int]] = {}  # adapter -> replicas holding it in the host tier


def move_holder(adapter: int, replica: int, src: dict[int, set[int]] | None, dst: dict[int, set[int]] | None) -> None:
    """In an index adapter -> replicas holding it: `replica` no longer holds `adapter` in src, now does in dst."""
    if src is not None:
        holders = src[adapter]
        holders.discard(replica)
        if not holders:
            del src[adapter]
    if dst is not None:
        dst.setdefault(adapter, set()).add(replica)


class Policy(Protocol):
    tick_ms: float | None
    """Call tick() this often (simulated ms); None = never."""
    max_tasks: float
    """Requests being routed at once (the others wait in the router's FIFO for one to finish)."""

    def choose(self, req: Request, cluster: Cluster, rng: np.random.Generator) -> int | None:
        """The replica for `req`, or None: none has room, retry after retry_delay_ms()."""

    def tick(self, cluster: Cluster) -> None: ...


def least_loaded(replicas: Sequence[Replica], rng: np.random.Generator) -> int:
    loads = [r.outstanding for r in replicas]
    low = min(loads)
    ties = [i for i, load in enumerate(loads) if load == low]
    return ties[int(rng.integers(len(ties)))] if len(ties) > 1 else ties[0]


class RandomPolicy:
    tick_ms, max_tasks = None, math.inf

    def __init__(self, n: int, adapters: int, routing: Routing, rng: np.random.Generator) -> None:
        self.n = n

    def choose(self, req: Request, cluster: Cluster, rng: np.random.Generator) -> int:
        return int(rng.integers(self.n))

    def tick(self, cluster: Cluster) -> None:
        pass


class LeastLoadedPolicy(RandomPolicy):
    def choose(self, req: Request, cluster: Cluster, rng: np.random.Generator) -> int:
        return least_loaded(cluster.replicas, rng)


class AffinityPolicy:
    """Residency-aware consistent hashing with bounded loads (see the module docstring)."""

    tick_ms, max_tasks = None, math.inf

    def __init__(self, n: int, adapters: int, routing: Routing, rng: np.random.Generator) -> None:
        self.n, self.slack = n, routing.affinity_slack
        self.preference = np.argsort(rng.random((adapters, n)), axis=1)  # (A, N): each adapter's replica order

    def choose(self, req: Request, cluster: Cluster, rng: np.random.Generator) -> int:
        reps = cluster.replicas
        if req.adapter < 0:
            return least_loaded(reps, rng)
        bound = max(cluster.batch, math.ceil(self.slack * (cluster.total_outstanding + 1) / self.n))
        for where in (cluster.on_device, cluster.in_host):
            holders = where.get(req.adapter)
            if holders:
                load, best = min((reps[i].outstanding, i) for i in holders)
                if load < bound:
                    return best
        for i in self.preference[req.adapter].tolist():
            if reps[i].outstanding < bound:
                return i
        raise RuntimeError("no replica under the load bound")  # unreachable: the least loaded one is under it

    def tick(self, cluster: Cluster) -> None:
        pass


@dataclass
class RayContext:
    """One pending request's routing state (Ray's PendingRequest.routing_context)."""

    start_ms: float
    timeout_ms: float
    tried_first: bool = False
    tried_fewest: bool = False


class RayMultiplexPolicy:
    """Ray Serve's PowerOfTwoChoicesRequestRouter with MultiplexMixin (see the module docstring)."""

    def __init__(self, n: int, adapters: int, routing: Routing, rng: np.random.Generator) -> None:
        self.n, self.routing = n, routing
        self.tick_ms = routing.ray_report_ms
        self.max_tasks = min(50, 2 * n)  # RequestRouter.max_num_routing_tasks
        self.reported: list[frozenset[int]] = [frozenset()] * n
        self.seen = [0] * n  # the replica version each report was taken at
        self.where: dict[int, set[int]] = {}  # model id -> replicas reporting it
        self.fewest: list[int] = list(range(n))
        self.pending: dict[int, RayContext] = {}

    def tick(self, cluster: Cluster) -> None:
        changed = False
        for rep in cluster.replicas:
            if rep.version == self.seen[rep.index]:
                continue
            old, new = self.reported[rep.index], frozenset(rep.tiers.device)
            for a in old - new:
                move_holder(a, rep.index, self.where, None)
            for a in new - old:
                move_holder(a, rep.index, None, self.where)
            self.reported[rep.index], self.seen[rep.index] = new, rep.version
            changed = True
        if changed:
            low = min(len(r) for r in self.reported)
            self.fewest = [i for i, r in enumerate(self.reported) if len(r) == low]

    def choose(self, req: Request, cluster: Cluster, rng: np.random.Generator) -> int | None:
        ctx = self.pending.get(req.rid)
        if ctx is None:
            timeout_s = rng.uniform(self.routing.ray_match_timeout_s, 2 * self.routing.ray_match_timeout_s)
            ctx = self.pending[req.rid] = RayContext(cluster.now, 1000.0 * timeout_s)
        chosen = self._pow2(self._candidates(req, ctx, cluster.now), cluster.replicas, rng)
        if chosen is not None:
            del self.pending[req.rid]
        return chosen

    def _candidates(self, req: Request, ctx: RayContext, now: float) -> Sequence[int]:
        if req.adapter < 0:
            return range(self.n)
        if now - ctx.start_ms < ctx.timeout_ms:
            holders = None if ctx.tried_first else self.where.get(req.adapter)
            ctx.tried_first = True
            return sorted(holders) if holders else self.fewest
        if not ctx.tried_fewest:
            ctx.tried_fewest = True
            return self.fewest
        return range(self.n)

    def _pow2(self, candidates: Sequence[int], reps: Sequence[Replica], rng: np.random.Generator) -> int | None:
        n = len(candidates)
        if n == 1:
            picks = [candidates[0]]
        else:  # two distinct, uniformly: i in [0, n), j in [0, n - 1) shifted past i
            i, j = rng.integers([n, n - 1]).tolist()
            picks = [candidates[i], candidates[j + (j >= i)]]
        open_ = [(reps[p].outstanding, k, p) for k, p in enumerate(picks)
                 if reps[p].outstanding < self.routing.ray_max_ongoing]
        return min(open_)[2] if open_ else None


POLICIES: dict[str, Callable[[int, int, Routing, np.random.Generator], Policy]] = {
    "random": RandomPolicy,
    "least-loaded": LeastLoadedPolicy,
    "affinity": AffinityPolicy,
    "ray": RayMultiplexPolicy,
}


# ---- the simulation -------------------------------------------------------------------------------------------

ARRIVE, RETRY, READ_DONE, BOUNDARY, TICK = range(5)


def retry_delay_ms(attempt: int) -> float:
    """Wait before a routing task's next try after `attempt` + 1 failed ones: Ray's _choose_replicas_with_backoff
    (at once, then 25 ms doubling up to 500 ms; the RAY_SERVE_ROUTER_RETRY_* defaults)."""
    return 0.0 if attempt == 0 else min(25.0 * 2.0 ** min(attempt - 1, 32), 500.0)


@dataclass(frozen=True)
class RunResult:
    policy: str
    replicas: int
    adapters: int
    rho: float
    mu1: float
    """One replica's saturated requests/s without loads (the linear reference is replicas * mu1)."""
    requests_s: float
    tokens_s: float
    fraction: float
    """requests_s / (replicas * mu1)."""
    hit_rate: float
    loads_s: float
    disk_loads_s: float
    load_share: float
    """Share of the replicas' time spent writing (and with --disk-read-locked reading) adapters under the lock."""
    ttft_p50_ms: float
    ttft_p99_ms: float
    distinct_per_step: float
    """Mean distinct adapters in a decode step (k of step_ms)."""


class Sim:
    """One run: `policy` routing Poisson arrivals at rho * n * mu1 over n replicas."""

    def __init__(self, cfg: SimConfig, n: int, adapters: int, rho: float, policy: str, seed: int = 0) -> None:
        self.cfg, self.n, self.adapters, self.rho, self.policy_name = cfg, n, adapters, rho, policy
        self.costs, self.out_tokens = cfg.costs, cfg.workload.out_tokens
        self.mu1 = replica_rate(cfg, adapters)
        count = max(n * cfg.workload.requests_per_replica, cfg.workload.min_requests)
        workload_rng = np.random.default_rng([seed, n, adapters, round(rho * 1e6)])
        probs = zipf_probs(adapters, cfg.workload.zipf)
        self.arrival, self.adapter = arrivals(workload_rng, count, rho * n * self.mu1 / 1000.0, probs,
                                              cfg.workload.base_fraction)
        self.rng = np.random.default_rng([seed, n, adapters, round(rho * 1e6), 1 + list(POLICIES).index(policy)])
        self.cluster = Cluster(n, cfg.replica)
        self.policy = POLICIES[policy](n, adapters, cfg.routing, self.rng)
        self.first_token = [math.nan] * count
        self.done = [math.nan] * count
        self.hit = [False] * count
        self.warm = int(cfg.workload.warmup * count)
        self.window = (self.arrival[self.warm], self.arrival[-1])
        self.arrived = self.completed = 0
        self.unrouted: deque[int] = deque()  # arrived, not yet taken by a routing task (FIFO)
        self.tasks = self.retrying = 0  # routing tasks running; those waiting to retry
        self.finished_in_window = self.tokens_in_window = self.steps = self.distinct_sum = 0
        self.loads = {HOST: 0, DISK: 0}  # slot writes in the window, by source
        self.load_lock_ms = 0.0  # model-lock time of those loads
        self._heap: list[tuple[float, int, int, object]] = []
        self._seq = itertools.count()
        self._handlers = {ARRIVE: self._arrive, RETRY: self._retry, READ_DONE: self._read_done,
                          BOUNDARY: self._boundary, TICK: self._tick}
        self._push(self.arrival[0], ARRIVE, 0)
        if self.policy.tick_ms is not None:
            self._push(0.0, TICK, None)

    @property
    def now(self) -> float:
        return self.cluster.now

    def _push(self, at: float, kind: int, arg: object) -> None:
        heapq.heappush(self._heap, (at, next(self._seq), kind, arg))

    def run(self, until: float = math.inf) -> Sim:
        """Process events up to simulated time `until` (ms), or until every request has finished."""
        heap = self._heap
        while heap and heap[0][0] <= until:
            at, _, kind, arg = heapq.heappop(heap)
            self.cluster.now = at
            self._handlers[kind](arg)
        return self

    def in_window(self, at: float) -> bool:
        return self.window[0] <= at <= self.window[1]

    def in_flight(self) -> int:
        """Requests arrived and not finished: at the router or on a replica."""
        return len(self.unrouted) + self.retrying + sum(r.outstanding for r in self.cluster.replicas)

    # ---- events ----

    def _arrive(self, rid: int) -> None:
        self.arrived += 1
        if rid + 1 < len(self.arrival):
            self._push(self.arrival[rid + 1], ARRIVE, rid + 1)
        self.unrouted.append(rid)
        if self.tasks < self.policy.max_tasks:
            self.tasks += 1
            self._route(self.unrouted.popleft(), 0)

    def _retry(self, arg: tuple[int, int]) -> None:
        self.retrying -= 1
        self._route(*arg)

    def _route(self, rid: int, attempt: int) -> None:
        """A routing task tries `rid`; once routed, it takes the oldest request nobody routes yet, until a try
        finds no replica with room (it retries later) or none is left (it ends)."""
        while True:
            choice = self.policy.choose(Request(rid, self.adapter[rid], self.arrival[rid]), self.cluster, self.rng)
            if choice is None:
                self.retrying += 1
                self._push(self.now + retry_delay_ms(attempt), RETRY, (rid, attempt + 1))
                return
            self._enqueue(self.cluster.replicas[choice], rid)
            if not self.unrouted:
                self.tasks -= 1
                return
            rid, attempt = self.unrouted.popleft(), 0

    def _tick(self, _: object) -> None:
        self.policy.tick(self.cluster)
        if self.completed < len(self.arrival):
            self._push(self.now + self.policy.tick_ms, TICK, None)

    def _enqueue(self, rep: Replica, rid: int) -> None:
        """`rid` reaches `rep`: it acquires its adapter (a hit, or joins / starts its load), then queues."""
        rep.outstanding += 1
        self.cluster.total_outstanding += 1
        a = self.adapter[rid]
        if a < 0:
            rep.queue.append(rid)
        elif a in rep.tiers.device:
            self.hit[rid] = True
            rep.tiers.acquire(a)
            rep.queue.append(rid)
        elif a in rep.loading:
            rep.loading[a].append(rid)
        else:
            self._start_load(rep, a, rid)
        if not rep.busy:
            self._boundary(rep)

    def _start_load(self, rep: Replica, a: int, rid: int) -> None:
        rep.loading[a] = [rid]
        if a in rep.tiers.host:
            rep.ready.append((a, HOST))
        elif self.costs.disk_read_locked:
            rep.ready.append((a, DISK))
        else:
            self._push(self.now + self.costs.disk_read_ms, READ_DONE, (rep, a))

    def _read_done(self, arg: tuple[Replica, int]) -> None:
        rep, a = arg
        rep.ready.append((a, DISK))
        if not rep.busy:
            self._boundary(rep)

    def _boundary(self, rep: Replica) -> None:
        """The replica's model lock is free: finish the step that ended, write ready adapters into slots, give
        free rows to queued requests (one prefill each), start the next step; one event at the end of all."""
        if rep.stepping:
            self._finish_step(rep)
        cost = self._place_ready(rep) + self._fill_rows(rep)
        rep.stepping = bool(rep.rows)
        if rep.rows:
            distinct = len(rep.row_adapters)
            cost += self.costs.step_ms(len(rep.rows), distinct)
            self.steps += 1
            self.distinct_sum += distinct
        rep.busy = cost > 0
        if rep.busy:
            self._push(self.now + cost, BOUNDARY, rep)

    def _finish_step(self, rep: Replica) -> None:
        now, out = self.now, self.out_tokens
        if self.in_window(now):
            self.tokens_in_window += len(rep.rows)
        running = []
        for row in rep.rows:
            rid, a, left = row
            if left == out:
                self.first_token[rid] = now
            if left > 1:
                row[2] = left - 1
                running.append(row)
            else:
                self._finish(rep, rid, a)
        rep.rows = running

    def _finish(self, rep: Replica, rid: int, a: int) -> None:
        self.done[rid] = self.now
        self.completed += 1
        self.finished_in_window += self.in_window(self.now)
        rep.outstanding -= 1
        self.cluster.total_outstanding -= 1
        if a >= 0:
            rep.tiers.release(a)
            left = rep.row_adapters[a] - 1
            if left:
                rep.row_adapters[a] = left
            else:
                del rep.row_adapters[a]

    def _place_ready(self, rep: Replica) -> float:
        """Slot writes of the loads whose adapter is read, in order, while there is room. Returns their ms."""
        cost = 0.0
        while rep.ready and rep.tiers.has_room():
            a, source = rep.ready.popleft()
            self._place(rep, a)
            ms = self.costs.load_lock_ms(source == DISK)
            cost += ms
            if self.in_window(self.now):
                self.loads[source] += 1
                self.load_lock_ms += ms
            waiters = rep.loading.pop(a)
            rep.tiers.acquire(a, len(waiters))
            rep.queue.extend(waiters)
        return cost

    def _place(self, rep: Replica, a: int) -> None:
        on_device, in_host, i = self.cluster.on_device, self.cluster.in_host, rep.index
        move_holder(a, i, in_host if a in rep.tiers.host else None, on_device)
        evicted, dropped = rep.tiers.place(a)
        if evicted is not None:
            move_holder(evicted, i, on_device, None if dropped == evicted else in_host)
        if dropped is not None and dropped != evicted:
            move_holder(dropped, i, in_host, None)
        rep.version += 1

    def _fill_rows(self, rep: Replica) -> float:
        cost = 0.0
        while rep.queue and len(rep.rows) < self.cluster.batch:
            rid = rep.queue.popleft()
            a = self.adapter[rid]
            rep.rows.append([rid, a, self.out_tokens])
            if a >= 0:
                rep.row_adapters[a] = rep.row_adapters.get(a, 0) + 1
            cost += self.costs.prefill_ms
        return cost

    # ---- results ----

    def result(self) -> RunResult:
        """Metrics of a finished run (call run() first)."""
        if self.completed < len(self.arrival):
            raise RuntimeError(f"the run has not finished: {self.completed} of {len(self.arrival)} requests done")
        span_s = (self.window[1] - self.window[0]) / 1000.0
        measured = range(self.warm, len(self.arrival))
        ttft = np.array([self.first_token[r] - self.arrival[r] for r in measured])
        named = [r for r in measured if self.adapter[r] >= 0]
        requests_s = self.finished_in_window / span_s
        return RunResult(
            policy=self.policy_name, replicas=self.n, adapters=self.adapters, rho=self.rho, mu1=self.mu1,
            requests_s=requests_s, tokens_s=self.tokens_in_window / span_s,
            fraction=requests_s / (self.n * self.mu1),
            hit_rate=sum(self.hit[r] for r in named) / len(named) if named else math.nan,
            loads_s=(self.loads[HOST] + self.loads[DISK]) / span_s, disk_loads_s=self.loads[DISK] / span_s,
            load_share=self.load_lock_ms / (self.n * 1000.0 * span_s),
            ttft_p50_ms=float(np.percentile(ttft, 50)), ttft_p99_ms=float(np.percentile(ttft, 99)),
            distinct_per_step=self.distinct_sum / max(self.steps, 1))


def simulate(cfg: SimConfig, n: int, adapters: int, rho: float, policy: str, seed: int = 0) -> RunResult:
    return Sim(cfg, n, adapters, rho, policy, seed).run().result()


# ---- the sweep, its table and its plot --------------------------------------------------------------------------


def run_sweep(cfg: SimConfig, sweep: Sweep, progress: Callable[[RunResult], None] | None = None) -> list[RunResult]:
    results = []
    for adapters, rho, n, policy in itertools.product(sweep.adapters, sweep.rhos, sweep.replicas, sweep.policies):
        results.append(simulate(cfg, n, adapters, rho, policy, sweep.seed))
        if progress is not None:
            progress(results[-1])
    return results


HEADERS = ["policy", "N", "adapters", "rho", "hit rate", "loads/s (disk)", "load time", "TTFT p50 ms", "TTFT p99 ms",
           "req/s", "tok/s", "of linear", "k/step"]


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """_common.markdown_table's layout; _common imports adalora (and torch, seconds) which a simulation needs not."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def table_row(r: RunResult) -> list[str]:
    return [r.policy, str(r.replicas), str(r.adapters), f"{r.rho:g}", f"{r.hit_rate:.3f}",
            f"{r.loads_s:.1f} ({r.disk_loads_s:.1f})", f"{r.load_share:.2%}", f"{r.ttft_p50_ms:.0f}",
            f"{r.ttft_p99_ms:.0f}", f"{r.requests_s:.1f}", f"{r.tokens_s:.0f}", f"{r.fraction:.3f}",
            f"{r.distinct_per_step:.2f}"]


def key_setting(results: Sequence[RunResult]) -> tuple[int, int, float]:
    """(N, adapters, rho) of the target: the largest N and adapter count, at rho 1 (else the largest rho)."""
    rhos = {r.rho for r in results}
    return max(r.replicas for r in results), max(r.adapters for r in results), 1.0 if 1.0 in rhos else max(rhos)


def verdict(results: Sequence[RunResult]) -> str:
    """Whether affinity holds >= TARGET_FRACTION of linear at the key setting where random does not, and why."""
    n, adapters, rho = key_setting(results)
    at = {r.policy: r for r in results if (r.replicas, r.adapters, r.rho) == (n, adapters, rho)}
    head = (f"Throughput / linear at N={n}, {adapters} adapters, rho={rho:g}: "
            + ", ".join(f"{p} {r.fraction:.3f}" for p, r in at.items()) + ".")
    if "affinity" not in at or "random" not in at:
        return head + " (the target compares affinity with random: run both)"
    if rho < 1:
        return head + " (the target is read at rho = 1, the arrivals at capacity: add it to --rho)"
    aff, rnd = at["affinity"], at["random"]
    if aff.fraction < TARGET_FRACTION:
        return head + f" Target not met: affinity is below {TARGET_FRACTION}."
    if rnd.fraction < TARGET_FRACTION:
        return head + f" Target met: affinity >= {TARGET_FRACTION}, random below."
    return head + (f" Affinity >= {TARGET_FRACTION}, but random holds it too: loads took {rnd.load_share:.1%} of "
                   f"random's replica time at hit rate {rnd.hit_rate:.2f} (a request costs a replica "
                   f"1000 / mu1 = {1000 / rnd.mu1:.0f} ms, a load only its time under the model lock), so "
                   f"routing shows in the hit rate and TTFT (p99 {rnd.ttft_p99_ms:.0f} ms random, "
                   f"{aff.ttft_p99_ms:.0f} ms affinity), not in throughput.")


def _series(rows: Sequence[RunResult], policy: str, rho: float, metric: str) -> tuple[list[int], list[float]]:
    """(N values, metric values) of one policy at one rho, by N."""
    picked = sorted((r.replicas, getattr(r, metric)) for r in rows if r.policy == policy and r.rho == rho)
    return [p[0] for p in picked], [p[1] for p in picked]


def plot(results: Sequence[RunResult], path: Path) -> None:
    """Fraction of linear at the key rho, p99 TTFT and hit rate (one line style per rho), against N."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    _, adapters, rho_key = key_setting(results)
    rows = [r for r in results if r.adapters == adapters]
    policies = list(dict.fromkeys(r.policy for r in rows))
    rhos = sorted({r.rho for r in rows})
    styles = dict(zip(rhos, ["-", "--", ":", "-."] * len(rhos)))
    colors = dict(zip(policies, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    for policy in policies:
        axes[0].plot(*_series(rows, policy, rho_key, "fraction"), "o-", color=colors[policy], label=policy)
        for rho in rhos:
            for ax, metric in ((axes[1], "ttft_p99_ms"), (axes[2], "hit_rate")):
                ax.plot(*_series(rows, policy, rho, metric), "o" + styles[rho], color=colors[policy])
    low = min(r.fraction for r in rows if r.rho == rho_key)
    axes[0].axhline(TARGET_FRACTION, color="grey", linestyle="--", linewidth=1)
    axes[0].set(title=f"throughput / (N x mu1) at rho {rho_key:g}", ylabel="fraction of linear",
                ylim=(min(0.85, low - 0.02), 1.05))
    axes[1].set(title="p99 time to first token", ylabel="ms", yscale="log")
    axes[2].set(title="adapter hit rate (on the device)", ylabel="hits / requests", ylim=(0, 1.02))
    ns = sorted({r.replicas for r in rows})
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("replicas N")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower left")
    axes[1].legend([Line2D([], [], color="black", linestyle=styles[rho]) for rho in rhos],
                   [f"rho {rho:g}" for rho in rhos], fontsize=8)
    title = f"Routing {adapters} adapters (Zipf) over N replicas, simulated. {verdict(results)}"
    fig.suptitle(textwrap.fill(title, 190), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- command line ---------------------------------------------------------------------------------------------

QUICK = {"replicas": (1, 4, 16), "adapters": (1000,), "rhos": (1.0,), "requests_per_replica": 150, "min_requests": 600}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    joined = lambda values: " ".join(f"{v:g}" for v in values)  # noqa: E731
    ap.add_argument("--replicas", type=int, nargs="+", help=f"replica counts N (default {joined(Sweep.replicas)})")
    ap.add_argument("--adapters", type=int, nargs="+", help=f"adapter counts A (default {joined(Sweep.adapters)})")
    ap.add_argument("--policies", nargs="+", default=list(Sweep.policies), help=f"among {', '.join(POLICIES)}")
    ap.add_argument("--rho", type=float, nargs="+", help=f"arrivals / (N * mu1) (default {joined(Sweep.rhos)})")
    ap.add_argument("--seed", type=int, default=0, help="seeds the arrivals and the routers' draws (default 0)")
    ap.add_argument("--quick", action="store_true", help="N 1 4 16, 1000 adapters, rho 1, 150 requests per replica")
    ap.add_argument("--plot", type=Path, help="PNG path (default docs/img/route_sim.png; --quick: "
                                              "benchmarks/results/route_sim_quick.png)")
    docs = _field_docs()
    for spec in (Costs(), ReplicaSpec(), Workload(), Routing()):
        for name, value in asdict(spec).items():
            doc = docs.get((type(spec).__name__, name), "")
            if isinstance(value, bool):
                ap.add_argument(_flag(name), action="store_true", help=doc)
            elif name in QUICK:  # --quick changes its default
                ap.add_argument(_flag(name), type=int, help=f"{doc} (default {value}; --quick {QUICK[name]})")
            else:
                ap.add_argument(_flag(name), type=type(value), default=value, help=f"{doc} (default {value})")
    return ap.parse_args(argv)


@functools.cache
def _field_docs() -> dict[tuple[str, str], str]:
    """(class, field) -> the docstring under the field in this file: the one place each flag is described."""
    docs = {}
    for cls in ast.parse(Path(__file__).read_text()).body:
        if isinstance(cls, ast.ClassDef):
            for stmt, doc in zip(cls.body, cls.body[1:]):
                is_doc = isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
                if isinstance(stmt, ast.AnnAssign) and is_doc:
                    docs[cls.name, stmt.target.id] = doc.value.value.replace("%", "%%")
    return docs


def configs(args: argparse.Namespace) -> tuple[SimConfig, Sweep]:
    """The flags as validated configs (ValueError naming the flag on a bad value)."""
    quick = QUICK if args.quick else {}
    values = vars(args)
    pick = lambda cls: {k: values[k] for k in asdict(cls()) if values.get(k) is not None}  # noqa: E731
    workload = pick(Workload)
    for name in ("requests_per_replica", "min_requests"):
        workload.setdefault(name, quick.get(name, getattr(Workload, name)))
    cfg = SimConfig(Costs(**pick(Costs)), ReplicaSpec(**pick(ReplicaSpec)), Workload(**workload),
                    Routing(**pick(Routing)))
    sweep = Sweep(replicas=tuple(args.replicas or quick.get("replicas", Sweep.replicas)),
                  adapters=tuple(args.adapters or quick.get("adapters", Sweep.adapters)),
                  policies=tuple(args.policies), rhos=tuple(args.rho or quick.get("rhos", Sweep.rhos)),
                  seed=args.seed)
    return cfg, sweep


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        cfg, sweep = configs(args)
    except ValueError as e:
        raise SystemExit(f"route_sim.py: error: {e}") from None
    for adapters in sweep.adapters:
        mu1 = replica_rate(cfg, adapters)
        print(f"{adapters} adapters: mu1 = {mu1:.3f} requests/s per replica ({mu1 * cfg.workload.out_tokens:.1f} "
              f"tok/s) without loads")
    results = run_sweep(cfg, sweep, progress=lambda r: print(
        f"  {r.policy:>12} N={r.replicas:<3} A={r.adapters:<6} rho={r.rho:g}: {r.fraction:.3f} of linear, "
        f"hit {r.hit_rate:.3f}, p99 TTFT {r.ttft_p99_ms:.0f} ms", file=sys.stderr, flush=True))
    print(markdown_table(HEADERS, [table_row(r) for r in results]))
    print(verdict(results))
    path = args.plot or (RESULTS / "route_sim_quick.png" if args.quick else ROOT / "docs" / "img" / "route_sim.png")
    plot(results, path)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
