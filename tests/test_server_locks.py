"""FairLock, the model lock: a thread that asks while another loops release-then-acquire (the generation driver
between steps) gets it at the next release; and a release of a lock nobody holds is an error."""

import threading
import time

import pytest

from adalora.server.locks import FairLock


def test_a_waiting_thread_gets_the_lock_at_the_next_release():
    lock, stop, asked, got = FairLock(), threading.Event(), threading.Event(), threading.Event()
    holds_after_ask = []

    def driver():  # steps back to back, as the generation thread does under traffic
        while not stop.is_set():
            with lock:
                if asked.is_set() and not got.is_set():
                    holds_after_ask.append(1)
                time.sleep(0.002)

    thread = threading.Thread(target=driver)
    thread.start()
    try:
        time.sleep(0.05)
        asked.set()
        with lock:  # the slot write
            got.set()
    finally:
        stop.set()
        thread.join(10)
    assert len(holds_after_ask) <= 1  # at most the step in progress when it asked


def test_fair_lock_is_a_mutex_and_refuses_a_stray_release():
    lock, inside, most = FairLock(), [0], [0]

    def work():
        for _ in range(200):
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert most[0] == 1 and not lock.locked()
    with pytest.raises(RuntimeError, match="not held"):
        lock.release()
