"""Where each adapter lives, and the one place that moves it between the tiers:

    device   in an engine slot, serving requests
    host     read and validated, kept in host memory (LRU, within a byte budget): the next load skips the disk
    disk     only in the adapter store

Every request acquires the adapters it names before it is queued and releases them when it ends. Acquiring an
adapter that is not on the device loads it, one load per adapter however many requests wait for it (they await
the same task). The store read runs off the event loop and only the slot write takes the model lock (between
two engine steps), so requests for other adapters keep running while an adapter loads.

A full device (every slot used, or the byte budget reached) makes room by evicting the least recently used
adapter that is neither pinned nor in use; it moves to the host tier. Loads that wait for room wait in arrival
order (one asyncio.Lock). When every evictable adapter is in use, the least recently used one is marked
`evicting`: new requests for it queue behind the waiting load instead of joining it, so it drains within the
lifetime of the requests already running with it. A hot adapter therefore cannot starve a rare one.

Versions: each load of an id gets its own engine key '<id>#<n>'. A reload loads the new version beside the old
one and then points the id at it; requests holding the old key finish on it, and its slot is freed when the
last of them releases it. Every request runs wholly on one version.

All bookkeeping runs on the event loop (single-threaded); the engine is only touched under `lock`, in a thread.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from adalora.adapter import Adapter
from adalora.engine import AdapterEngine
from adalora.engine.errors import AdapterNotFound, DeadlineExpired, InvalidRequest, SlotsFull
from adalora.engine.slots import check_adapter
from adalora.server.locks import FairLock
from adalora.server.store import AdapterStore, StoredAdapter


def host_nbytes(adapter: Adapter) -> int:
    """Bytes of the adapter's tensors in host memory (factors and head)."""
    tensors = [t for layer in adapter.layers.values() for t in (layer.P, layer.lam, layer.Q)]
    tensors += list(adapter.head.values())
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class Budget:
    """What the device and host tiers may hold."""

    max_slots: int
    """Adapter versions in engine slots at once (an old version still finishing its requests counts)."""
    max_device_bytes: int | None = None
    """Bytes of adapter factors and heads on the device; None = bounded by max_slots only."""
    max_host_bytes: int = 0
    """Bytes of adapters kept in host memory off the device; 0 = no host tier (evicted adapters go to disk)."""


@dataclass(eq=False)
class Resident:
    """One version of one adapter in an engine slot."""

    id: str
    key: str
    """Its engine key, '<id>#<n>': unique per load, so two versions of an id can sit side by side."""
    stored: StoredAdapter
    device_bytes: int
    pinned: bool = False
    users: int = 0
    """Requests that acquired it and have not released it (queued or running)."""
    last_used: int = 0
    evicting: bool = False
    """Chosen to make room for a waiting load: takes no new users."""


@dataclass
class Events:
    """What the residency reports to the metrics: each a no-argument or one-argument callback."""

    hit: Callable[[], None] = lambda: None
    miss: Callable[[], None] = lambda: None
    evicted: Callable[[], None] = lambda: None
    loaded: Callable[[float], None] = lambda seconds: None
    changed: Callable[[], None] = lambda: None


@dataclass
class Residency:
    """The adapters of one engine, by tier; see the module docstring."""

    engine: AdapterEngine
    store: AdapterStore
    lock: FairLock
    """The model lock: held for every engine load and unload."""
    budget: Budget
    events: Events = field(default_factory=Events)

    def __post_init__(self) -> None:
        self.device: dict[str, Resident] = {}
        """id -> its current version on the device."""
        self.retired: set[Resident] = set()
        """Versions replaced by a newer one or unloaded: they take no new users, and each slot is freed when its
        last request releases it."""
        self.host: OrderedDict[str, StoredAdapter] = OrderedDict()
        """Adapters off the device but in host memory, least recently used first."""
        self._loads: dict[str, asyncio.Future] = {}
        self._room = asyncio.Lock()
        self._released = asyncio.Event()
        self._clock = itertools.count(1)
        self._keys = itertools.count()
        self.acquiring = 0
        """Requests waiting in acquire() for an adapter to load (they count against the queue limit)."""
        self._wanted: Counter[str] = Counter()
        """id -> requests in acquire() that name it: a freshly loaded adapter is not evicted before they hold it."""

    # ---- what is where ----------------------------------------------------------------------------------------

    def tier(self, adapter_id: str) -> str:
        """'device', 'host' or 'disk' (the latter also for an id the store does not hold)."""
        if adapter_id in self.device:
            return "device"
        return "host" if adapter_id in self.host else "disk"

    @property
    def device_bytes(self) -> int:
        return sum(r.device_bytes for r in self.residents())

    @property
    def host_bytes(self) -> int:
        return sum(host_nbytes(s.adapter) for s in self.host.values())

    def in_use(self) -> dict[str, int]:
        """id -> requests holding any version of it (ids with none left out)."""
        users: dict[str, int] = {}
        for r in self.residents():
            if r.users:
                users[r.id] = users.get(r.id, 0) + r.users
        return users

    def residents(self) -> list[Resident]:
        """Every version in a slot: current ones and retired ones still finishing."""
        return [*self.device.values(), *self.retired]

    # ---- requests ---------------------------------------------------------------------------------------------

    async def acquire(self, ids: Iterable[str], deadline: float | None = None) -> dict[str, Resident]:
        """Hold every adapter of `ids` on the device (loading the missing ones) for one request; release() them
        when it ends. All are taken at once, so a request never holds one adapter while it waits for another.
        Raises what the load raises (AdapterNotFound, StoreError, AdapterMismatch, SlotsFull), or DeadlineExpired
        at time.monotonic() `deadline`."""
        ids = sorted(set(ids))
        if len(ids) > self.budget.max_slots:
            raise InvalidRequest(f"the request names {len(ids)} adapters, more than the {self.budget.max_slots} "
                                 f"this server can hold on the device at once (--max-slots); name fewer")
        found = {i for i in ids if self._ready(i)}  # the others count as misses when their load places them
        self.acquiring += 1
        self._wanted.update(ids)
        try:
            while True:
                missing = [i for i in ids if not self._ready(i)]
                if not missing:
                    break
                await _until(asyncio.gather(*(asyncio.shield(self._load(i)) for i in missing)), deadline,
                             f"adapter {missing[0]!r} to load")
                for i in ids:  # fresh loads are the most recently used: the next load evicts something else
                    if self._ready(i):
                        self.device[i].last_used = next(self._clock)
        finally:
            self.acquiring -= 1
            self._wanted.subtract(ids)
            for i in ids:
                if self._wanted[i] <= 0:
                    del self._wanted[i]
        held = {i: self.device[i] for i in ids}
        now = next(self._clock)
        for resident in held.values():
            resident.users += 1
            resident.last_used = now
        for _ in found:
            self.events.hit()
        return held

    def release(self, held: Iterable[Resident]) -> None:
        """The request that acquired `held` has ended (synchronous: safe in a finally block)."""
        for resident in held:
            resident.users -= 1
            if resident in self.retired and resident.users == 0:
                asyncio.ensure_future(self._free(resident))
        self._wake()

    def _wake(self) -> None:
        """Tell a load waiting for room (in _make_room) that an adapter was released or freed."""
        self._released.set()
        self._released = asyncio.Event()

    def _ready(self, adapter_id: str) -> bool:
        resident = self.device.get(adapter_id)
        return resident is not None and not resident.evicting

    # ---- loading ----------------------------------------------------------------------------------------------

    def _load(self, adapter_id: str) -> asyncio.Future:
        """The load of `adapter_id` in progress, or a new one (single flight)."""
        task = self._loads.get(adapter_id)
        if task is None:
            task = asyncio.ensure_future(self._load_now(adapter_id))
            self._loads[adapter_id] = task

            def done(t: asyncio.Future) -> None:
                if self._loads.get(adapter_id) is t:
                    del self._loads[adapter_id]
                if not t.cancelled():
                    t.exception()  # retrieved: every waiter may have given up on it

            task.add_done_callback(done)
        return task

    async def _load_now(self, adapter_id: str) -> Resident:
        started = time.perf_counter()
        current = self.device.get(adapter_id)  # one being evicted: its copy is the version to load back
        stored = current.stored if current is not None else self.host.get(adapter_id)
        if stored is None:
            stored = await asyncio.to_thread(self.store.read, adapter_id)
        return await self.place(stored, started=started)

    async def place(self, stored: StoredAdapter, pin: bool = False, started: float | None = None) -> Resident:
        """Put `stored` in a slot as the current version of its id (making room first), unless that version is
        already there; a different version already there is retired. Returns the current resident. `started`:
        when its load began (perf_counter), for the load-time metric."""
        started = time.perf_counter() if started is None else started
        slots = self.engine.slots
        check_adapter(stored.adapter, slots.identity, slots.shapes)  # before anything is evicted for it
        nbytes = self.engine.footprint(stored.adapter)
        if self.budget.max_device_bytes is not None and nbytes > self.budget.max_device_bytes:
            raise SlotsFull(f"adapter {stored.id!r} needs {nbytes} device bytes, more than this server's whole "
                            f"adapter budget of {self.budget.max_device_bytes} (--max-device-bytes); raise it")
        async with self._room:
            current = self.device.get(stored.id)
            if current is not None and current.stored.version == stored.version:
                current.evicting = False
                current.pinned = current.pinned or pin
                return current
            await self._make_room(nbytes)
            current = self.device.get(stored.id)  # making room may have evicted the old version itself
            resident = Resident(stored.id, f"{stored.id}#{next(self._keys)}", stored, nbytes, pin,
                                last_used=next(self._clock))
            await asyncio.to_thread(self.lock.run, self.engine.load, resident.key, stored.adapter)
            if current is not None:
                resident.pinned = resident.pinned or current.pinned
                await self._retire(current)
            self.device[stored.id] = resident
            self.host.pop(stored.id, None)
        self.events.miss()
        self.events.loaded(time.perf_counter() - started)
        self.events.changed()
        return resident

    def _fits(self, nbytes: int) -> bool:
        if len(self.residents()) >= self.budget.max_slots:
            return False
        limit = self.budget.max_device_bytes
        return limit is None or self.device_bytes + nbytes <= limit

    async def _make_room(self, nbytes: int) -> None:
        """Evict until `nbytes` fit; wait for requests to release adapters when every candidate is in use.
        Runs under self._room, so waiting loads get room in arrival order."""
        marked: Resident | None = None
        try:
            while not self._fits(nbytes):
                candidates = sorted((r for r in self.device.values() if not r.pinned), key=lambda r: r.last_used)
                idle = [r for r in candidates if r.users == 0 and (r.evicting or not self._wanted[r.id])]
                if not idle and not any(r.users for r in self.residents()):
                    idle = [r for r in candidates if r.users == 0]  # nothing will be released: do not wait forever
                if idle:
                    await self._evict(idle[0])
                    continue
                if not candidates and not self.retired:
                    pinned = sorted(self.device)
                    raise SlotsFull(f"no room on the device for another adapter: every one there is pinned "
                                    f"({', '.join(pinned)}); unload one, or raise --max-slots / --max-device-bytes")
                if marked is not None and self.device.get(marked.id) is not marked:
                    marked = None  # it left (evicted or replaced): mark the next one if still short of room
                if candidates and marked is None:  # stop new requests joining the LRU one, so it drains
                    marked = candidates[0]
                    marked.evicting = True
                await self._released.wait()
        finally:
            if marked is not None and marked.id in self.device and self.device[marked.id] is marked:
                marked.evicting = False

    async def _evict(self, resident: Resident) -> None:
        """Move an idle current version from its slot to the host tier."""
        del self.device[resident.id]
        await asyncio.to_thread(self.lock.run, self.engine.unload, resident.key)
        self._to_host(resident.stored)
        self.events.evicted()
        self.events.changed()

    def _to_host(self, stored: StoredAdapter) -> None:
        self.host[stored.id] = stored
        self.host.move_to_end(stored.id)
        total = self.host_bytes
        while self.host and total > self.budget.max_host_bytes:
            _, dropped = self.host.popitem(last=False)  # least recently used first: back to the disk tier
            total -= host_nbytes(dropped.adapter)

    async def _retire(self, resident: Resident) -> None:
        """Take `resident` out of service: freed now when idle, else when its last request releases it."""
        if self.device.get(resident.id) is resident:
            del self.device[resident.id]
        self.retired.add(resident)
        if resident.users == 0:
            await self._free(resident)

    async def _free(self, resident: Resident) -> None:
        if resident not in self.retired:
            return
        self.retired.discard(resident)
        try:
            await asyncio.to_thread(self.lock.run, self.engine.unload, resident.key)
        finally:
            self.events.evicted()
            self.events.changed()
            self._wake()

    # ---- admin ------------------------------------------------------------------------------------------------

    def stored_anew(self, stored: StoredAdapter) -> None:
        """The store now holds `stored` (an upload): a host copy of another version is dropped, so the next
        on-demand load reads the new one; a version on the device keeps serving until LoadAdapter(reload)."""
        cached = self.host.get(stored.id)
        if cached is not None and cached.version != stored.version:
            del self.host[stored.id]
            self.events.changed()

    def preload(self, stored: StoredAdapter) -> Resident:
        """Before serving (no event loop, no requests): put `stored` in a slot, pinned."""
        slots = self.engine.slots
        check_adapter(stored.adapter, slots.identity, slots.shapes)
        nbytes = self.engine.footprint(stored.adapter)
        if stored.id in self.device:
            raise InvalidRequest(f"adapter {stored.id!r} is preloaded twice; name it once in --preload")
        if not self._fits(nbytes):
            raise SlotsFull(f"preloading {stored.id!r} ({nbytes} bytes) exceeds the device budget: "
                            f"{len(self.device)} adapters ({self.device_bytes} bytes) are already preloaded, the "
                            f"limits are --max-slots {self.budget.max_slots} and --max-device-bytes "
                            f"{self.budget.max_device_bytes}; preload fewer or raise them")
        resident = Resident(stored.id, f"{stored.id}#{next(self._keys)}", stored, nbytes, pinned=True,
                            last_used=next(self._clock))
        self.lock.run(self.engine.load, resident.key, stored.adapter)
        self.device[stored.id] = resident
        return resident

    async def unload(self, adapter_id: str) -> int:
        """Take `adapter_id` off the device and out of host memory; returns the device bytes freed (at once,
        or when the requests still running with it end). Raises AdapterNotFound when it is in neither."""
        resident = self.device.get(adapter_id)
        in_host = self.host.pop(adapter_id, None) is not None
        if resident is None:
            if not in_host:
                raise AdapterNotFound(f"adapter {adapter_id!r} is not loaded (on the device: {sorted(self.device)})")
            self.events.changed()
            return 0
        async with self._room:
            await self._retire(resident)
        self.events.changed()
        return resident.device_bytes


async def _until(awaitable: Awaitable, deadline: float | None, what: str):
    """Await `awaitable`, giving up with DeadlineExpired at time.monotonic() `deadline` (None = no limit)."""
    if deadline is None:
        return await awaitable
    try:
        return await asyncio.wait_for(awaitable, max(0.0, deadline - time.monotonic()))
    except TimeoutError as e:
        raise DeadlineExpired(f"the request's deadline passed while it waited for {what}; allow a longer "
                              f"deadline, or LoadAdapter it ahead of traffic") from e
