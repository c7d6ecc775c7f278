"""benchmarks/route_sim.py: the cost model and mu1 by hand, an idle replica's TTFT analytically, conservation and
determinism, the LRU tiers on a hand-traced sequence, the routers' choices, and the refusal of bad flags."""

import math

import pytest

from benchmarks import route_sim as rs

STEP_CASES = [  # (rows, distinct adapters, ms) = 32 + 3.5 rows + 1.5 distinct
    (1, 0, 35.5),
    (1, 1, 37.0),
    (8, 0, 60.0),
    (8, 1, 61.5),
    (8, 8, 72.0),
]


@pytest.mark.parametrize("rows,distinct,ms", STEP_CASES)
def test_step_formula(rows, distinct, ms):
    assert rs.Costs().step_ms(rows, distinct) == pytest.approx(ms)


MU1_CASES = [  # (batch, distinct, requests/s) = 1000 B / (64 step(B, k) + 40 B)
    (8, 8, 1000 * 8 / (64 * 72.0 + 8 * 40)),  # 1.6234
    (8, 1, 1000 * 8 / (64 * 61.5 + 8 * 40)),  # 1.8797
    (1, 1, 1000 * 1 / (64 * 37.0 + 40)),  # 0.4153
]


@pytest.mark.parametrize("batch,distinct,rate", MU1_CASES)
def test_saturated_rate(batch, distinct, rate):
    assert rs.saturated_rate(rs.Costs(), batch, 64, distinct) == pytest.approx(rate)


DISTINCT_CASES = [  # (probs, base fraction, batch, expected distinct adapters among batch requests)
    ([1.0], 0.0, 8, 1.0),
    ([0.125] * 8, 0.0, 8, 8 * (1 - (7 / 8) ** 8)),  # 5.2511
    ([0.5, 0.5], 0.5, 2, 2 * (1 - 0.75**2)),  # each adapter drawn with probability 1/4
    ([0.5, 0.5], 1.0, 8, 0.0),
]


@pytest.mark.parametrize("probs,base,batch,expected", DISTINCT_CASES)
def test_expected_distinct(probs, base, batch, expected):
    import numpy as np

    assert rs.expected_distinct(np.array(probs), base, batch) == pytest.approx(expected)


def test_replica_rate_of_one_adapter():
    assert rs.replica_rate(rs.SimConfig(), 1) == pytest.approx(MU1_CASES[1][2])


def quiet(requests: int = 40) -> rs.SimConfig:
    return rs.SimConfig(workload=rs.Workload(requests_per_replica=requests, min_requests=0, warmup=0.0))


def test_idle_replica_ttft_is_analytic():
    """One replica, one adapter, arrivals ~minutes apart (a request alone takes 40 + 64 * 37 ms): the first
    request reads and writes the adapter, every later one hits; TTFT = prefill + one step of one row."""
    cfg = quiet()
    sim = rs.Sim(cfg, n=1, adapters=1, rho=0.005, policy="random").run()
    c = cfg.costs
    alone = [r for r in range(1, len(sim.arrival)) if sim.arrival[r] > sim.done[r - 1]]
    assert len(alone) >= len(sim.arrival) - 3  # the low load leaves almost every request alone
    first = sim.first_token[0] - sim.arrival[0]
    assert first == pytest.approx(c.disk_read_ms + c.slot_load_ms + c.prefill_ms + c.step_ms(1, 1))  # 111 ms
    for r in alone:
        assert sim.first_token[r] - sim.arrival[r] == pytest.approx(c.prefill_ms + c.step_ms(1, 1))  # 77 ms
        if r + 1 == len(sim.arrival) or sim.arrival[r + 1] > sim.done[r]:  # no other row joined it
            assert sim.done[r] - sim.arrival[r] == pytest.approx(c.prefill_ms + 64 * c.step_ms(1, 1))
    assert sim.hit[0] is False and all(sim.hit[1:])
    result = sim.result()
    assert result.hit_rate == pytest.approx((len(sim.arrival) - 1) / len(sim.arrival))
    assert result.distinct_per_step == pytest.approx(1.0)


CONSERVATION_CASES = [(policy, 16) for policy in rs.POLICIES] + [("ray", 4)]  # (policy, Ray's max ongoing)


@pytest.mark.parametrize("policy,max_ongoing", CONSERVATION_CASES)
def test_conservation(policy, max_ongoing):
    """At any time: arrived = finished + in flight (at the router, loading, queued or in a row)."""
    cfg = quiet(60)
    cfg = rs.SimConfig(cfg.costs, cfg.replica, cfg.workload, rs.Routing(ray_max_ongoing=max_ongoing))
    sim = rs.Sim(cfg, n=4, adapters=500, rho=1.0, policy=policy)
    at_router = 0
    for until in (5_000.0, 15_000.0, 30_000.0):
        sim.run(until)
        assert sim.arrived == sim.completed + sim.in_flight()
        on_replicas = sum(len(r.rows) + len(r.queue) + sum(map(len, r.loading.values())) for r in sim.cluster.replicas)
        assert on_replicas == sum(r.outstanding for r in sim.cluster.replicas)
        assert 0 < sim.completed < len(sim.arrival)
        at_router += len(sim.unrouted) + sim.retrying
    assert (at_router > 0) == (max_ongoing < 8)  # 4 ongoing per replica cannot keep up: requests wait at the router
    sim.run()
    assert sim.completed == sim.arrived == len(sim.arrival) and sim.in_flight() == 0
    assert all(not math.isnan(t) for t in sim.first_token)


@pytest.mark.parametrize("policy", list(rs.POLICIES))
def test_deterministic_for_a_seed(policy):
    cfg = quiet(60)
    runs = [rs.simulate(cfg, 4, 500, 0.9, policy, seed) for seed in (3, 3, 4)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def trace(tiers: rs.Tiers, sequence: str) -> dict[str, int]:
    """Each adapter requested once in turn (held only while it runs): count where it was found."""
    counts = {"device": 0, "host": 0, "disk": 0}
    for a in map(ord, sequence):
        tier = tiers.tier(a)
        counts[tier] += 1
        if tier != "device":
            tiers.place(a)
        tiers.acquire(a)
        tiers.release(a)
    return counts


TIER_CASES = [  # (slots, host, sequence, device hits, host loads, disk loads), traced by hand
    # S=2, H=1: A B C (A to host) A (from host; B to host) B (from host; C to host) D (A to host, C dropped)
    # C (disk; B to host, A dropped) A (disk; D to host, B dropped) D (from host; C to host) A (hit)
    # C (from host; D, the least recent, to host)
    (2, 1, "ABCABDCADAC", 1, 4, 6),
    (2, 0, "ABCABDCADAC", 1, 0, 10),  # no host tier: every miss reads the disk
    (4, 4, "ABCABDCADAC", 7, 0, 4),  # everything fits on the device: only the first use of each misses
    (1, 2, "ABABAB", 0, 4, 2),  # one slot: each switch swaps the other one back from the host tier
]


@pytest.mark.parametrize("slots,host,sequence,hits,host_loads,disk_loads", TIER_CASES)
def test_lru_tiers(slots, host, sequence, hits, host_loads, disk_loads):
    assert trace(rs.Tiers(slots, host), sequence) == {"device": hits, "host": host_loads, "disk": disk_loads}


def test_adapter_in_use_is_never_evicted():
    tiers = rs.Tiers(slots=2, host=4)
    for a in (1, 2):
        tiers.place(a)
        tiers.acquire(a)
    assert not tiers.has_room()
    tiers.release(1)
    assert tiers.has_room()
    assert tiers.place(3) == (1, None)  # the idle one goes to the host tier
    assert tiers.tier(1) == "host" and tiers.tier(2) == "device"


def test_affinity_hits_more_than_random():
    cfg = rs.SimConfig(workload=rs.Workload(requests_per_replica=150, min_requests=0, warmup=0.4))
    hit = {p: rs.simulate(cfg, 8, 2000, 0.8, p).hit_rate for p in ("random", "affinity")}
    assert hit["affinity"] >= hit["random"] + 0.1, hit


def make_cluster(n: int, device: dict[int, list[int]]) -> rs.Cluster:
    """n replicas; device: replica -> adapters placed in its slots."""
    cluster = rs.Cluster(n, rs.ReplicaSpec())
    for i, adapters in device.items():
        for a in adapters:
            cluster.replicas[i].tiers.place(a)
            rs.move_holder(a, i, None, cluster.on_device)
        cluster.replicas[i].version += 1
    return cluster


@pytest.mark.parametrize("policy", ["affinity", "ray"])
def test_routers_prefer_the_replica_holding_the_adapter(policy):
    import numpy as np

    cluster = make_cluster(4, {2: [7], 0: [1, 3]})
    rng = np.random.default_rng(0)
    router = rs.POLICIES[policy](4, 10, rs.Routing(), rng)
    router.tick(cluster)
    assert router.choose(rs.Request(0, 7, 0.0), cluster, rng) == 2
    cluster.replicas[2].outstanding = 16  # full for both: affinity's bound is B = 8, Ray's max_ongoing 16
    choice = router.choose(rs.Request(1, 7, 0.0), cluster, rng)
    if policy == "ray":  # the holder refuses; the retry goes to those reporting the fewest models
        assert choice is None
        assert router.choose(rs.Request(1, 7, 0.0), cluster, rng) in (1, 3)
    else:
        assert choice in (0, 1, 3)


def test_ray_refuses_when_every_replica_is_full():
    import numpy as np

    cluster = make_cluster(2, {})
    for rep in cluster.replicas:
        rep.outstanding = 16
    rng = np.random.default_rng(0)
    router = rs.RayMultiplexPolicy(2, 10, rs.Routing(), rng)
    assert router.choose(rs.Request(0, 5, 0.0), cluster, rng) is None
    cluster.replicas[1].outstanding = 15
    assert router.choose(rs.Request(0, 5, 0.0), cluster, rng) == 1


def test_retry_backoff():
    delays = [rs.retry_delay_ms(attempt) for attempt in range(2000)]
    assert delays[:7] == [0.0, 25.0, 50.0, 100.0, 200.0, 400.0, 500.0]
    assert set(delays[6:]) == {500.0}  # capped, however long a task retries


BAD_FLAGS = [
    (["--replicas", "0"], "--replicas"),
    (["--adapters", "0"], "--adapters"),
    (["--policies", "round-robin"], "--policies"),
    (["--rho", "0"], "--rho"),
    (["--slots", "0"], "--slots"),
    (["--batch", "0"], "--batch"),
    (["--host", "-1"], "--host"),
    (["--zipf", "-1"], "--zipf"),
    (["--base-fraction", "1.5"], "--base-fraction"),
    (["--warmup", "0.95"], "--warmup"),
    (["--prefill-ms", "-1"], "--prefill-ms"),
    (["--affinity-slack", "0.5"], "--affinity-slack"),
    (["--ray-max-ongoing", "0"], "--ray-max-ongoing"),
    (["--requests-per-replica", "5"], "--requests-per-replica"),
]


@pytest.mark.parametrize("argv,flag", BAD_FLAGS)
def test_bad_flag_refused_naming_it(argv, flag):
    with pytest.raises(ValueError, match=f"^{flag} must be"):
        rs.configs(rs.parse_args(argv))
    with pytest.raises(SystemExit, match=flag):
        rs.main(argv)


def test_quick_flags_give_small_sizes():
    cfg, sweep = rs.configs(rs.parse_args(["--quick", "--slots", "4"]))
    assert (sweep.replicas, sweep.adapters, sweep.rhos) == (rs.QUICK["replicas"], rs.QUICK["adapters"], (1.0,))
    assert cfg.workload.requests_per_replica == rs.QUICK["requests_per_replica"] and cfg.replica.slots == 4
    assert cfg.workload.min_requests == rs.QUICK["min_requests"]


def result(policy: str, fraction: float, rho: float = 1.0) -> rs.RunResult:
    return rs.RunResult(policy=policy, replicas=64, adapters=10_000, rho=rho, mu1=1.6, requests_s=0.0, tokens_s=0.0,
                        fraction=fraction, hit_rate=0.5, loads_s=0.0, disk_loads_s=0.0, load_share=0.01,
                        ttft_p50_ms=0.0, ttft_p99_ms=0.0, distinct_per_step=4.0)


VERDICT_CASES = [  # (affinity's fraction, random's, rho, what the verdict says)
    (0.95, 0.85, 1.0, "Target met"),
    (0.95, 0.93, 1.0, "random holds it too"),
    (0.85, 0.80, 1.0, "Target not met"),
    (0.75, 0.70, 0.8, "add it to --rho"),
]


@pytest.mark.parametrize("affinity,random,rho,says", VERDICT_CASES)
def test_verdict(affinity, random, rho, says):
    results = [result("affinity", affinity, rho), result("random", random, rho), result("random", 0.1, 0.5)]
    assert says in rs.verdict(results)
