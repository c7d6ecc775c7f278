"""FairLock: the model lock, granted in the order threads asked for it.

threading.Lock is not fair: the generation driver releases it at the end of a step and takes it again at once for
the next one, so under steady traffic a thread waiting to write an adapter slot (an on-demand load) could wait
for as long as the traffic lasted. With tickets, a waiting thread gets the lock at the next step boundary."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class FairLock:
    """A mutex handed out first come, first served; a context manager like threading.Lock (not reentrant)."""

    def __init__(self) -> None:
        self._changed = threading.Condition(threading.Lock())
        self._next = 0
        """The ticket the next caller of acquire() draws."""
        self._serving = 0
        """The ticket that holds the lock, or may take it now."""

    def acquire(self) -> None:
        with self._changed:
            ticket = self._next
            self._next += 1
            while ticket != self._serving:
                self._changed.wait()

    def release(self) -> None:
        with self._changed:
            if self._serving >= self._next:
                raise RuntimeError("release of a FairLock that is not held")
            self._serving += 1
            self._changed.notify_all()

    def run(self, fn: Callable[..., T], *args) -> T:
        """fn(*args) with the lock held (for asyncio.to_thread)."""
        with self:
            return fn(*args)

    def locked(self) -> bool:
        with self._changed:
            return self._serving < self._next

    def __enter__(self) -> FairLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
