"""GenerationPool: an owned, closeable background thread (no process-wide registry)."""

from __future__ import annotations

import gc
import itertools
import threading
import time

import pytest
import torch

from duodiff.data.pool import GenerationPool

CPU = torch.device("cpu")


def pool_threads(name):
    return [t for t in threading.enumerate() if t.name == name]


def test_items_in_order_and_end_of_a_finite_iterator():
    with GenerationPool(iter(range(7)), pool_size=2, device=CPU, name="pool-order") as pool:
        assert list(pool) == list(range(7))
    assert pool.closed and not pool_threads("pool-order")


def test_error_in_the_thread_is_raised_in_the_consumer():
    def broken():
        yield 1
        raise KeyError("bad item")

    with GenerationPool(broken(), pool_size=2, device=CPU) as pool:
        it = iter(pool)
        assert next(it) == 1
        with pytest.raises(RuntimeError, match="background thread.*bad item") as info:
            next(it)
    assert isinstance(info.value.__cause__, KeyError)


def test_close_stops_the_thread_and_is_idempotent():
    made = []

    def endless():
        for i in itertools.count():
            made.append(i)
            yield i

    pool = GenerationPool(endless(), pool_size=2, device=CPU, name="pool-close")
    assert next(iter(pool)) == 0
    time.sleep(0.5)
    assert len(made) <= 1 + 2 + 1  # consumed + pool + the one waiting for room
    pool.close()
    pool.close()
    assert pool.closed and not pool_threads("pool-close")
    assert "closed" in repr(pool)


def test_a_dropped_pool_stops_its_thread():
    pool = GenerationPool(itertools.count(), pool_size=1, device=CPU, name="pool-dropped")
    assert pool_threads("pool-dropped")
    del pool
    gc.collect()
    assert not pool_threads("pool-dropped")
