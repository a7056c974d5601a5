"""`GenerationPool`: a background thread that keeps a bounded queue of generated items ready.

Why it exists: a streaming dataset should generate the next pairs while the consumer trains on the last
ones, without holding more than a few pairs in memory and without leaving a thread behind. The pool is an
owned, closeable object: :meth:`GenerationPool.close` (or leaving its ``with`` block, or dropping it, or the
interpreter exiting) stops the thread after the item it is making and waits for it. Waiting matters: a
daemon thread still inside a torch op when the interpreter tears down can abort the process ("terminate
called without an active exception"), so every pool stops its own thread through a ``weakref.finalize``,
which Python also runs at exit.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["GenerationPool"]

#: Longest wait for the thread's current generation call when a pool closes (seconds).
JOIN_TIMEOUT_S = 300.0


class _Failure:
    """Carries an exception from the generation thread to the consumer."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_DONE = object()  # the item iterator is exhausted


def _put(pool: queue.Queue, obj: Any, stop: threading.Event) -> bool:
    """Put ``obj`` once there is room; ``False`` when the pool was stopped first."""
    while not stop.is_set():
        try:
            pool.put(obj, timeout=0.2)
            return True
        except queue.Full:
            continue
    return False


def _fill(items: Iterator[Any], pool: queue.Queue, stop: threading.Event, device: torch.device) -> None:
    """The thread's work: move items into the pool until stopped; hand any error to the consumer."""
    try:
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            while not stop.is_set():  # checked before making the next item, not only while waiting for room
                item = next(items, _DONE)
                if not _put(pool, item, stop) or item is _DONE:
                    return
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises
        _put(pool, _Failure(e), stop)


def _stop(stop: threading.Event, thread: threading.Thread, timeout: float) -> None:
    stop.set()
    if thread is not threading.current_thread() and thread.is_alive():
        thread.join(timeout)


class GenerationPool:
    """Items of ``items``, made in a background thread and kept ready in a queue of at most ``pool_size``.

    The thread pulls the next item only when there is room, so at most ``pool_size`` items wait in the
    queue plus the one being made. Iterate to take items in order; an exception raised while making one is
    re-raised in the consumer as a ``RuntimeError`` (chained), never swallowed or hung on.

    Example:
        >>> with GenerationPool(iter(range(5)), pool_size=2, device=torch.device("cpu")) as pool:
        ...     list(pool)
        [0, 1, 2, 3, 4]

    Args:
        items: the iterator to run in the thread (e.g. a generator that calls the model). Only the
            thread touches it.
        pool_size: items kept ready.
        device: on a CUDA device the thread generates in its own CUDA stream.
        name: the thread's name.
    """

    def __init__(self, items: Iterator[Any], *, pool_size: int, device: torch.device,
                 name: str = "duodiff-synthetic-pool") -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=pool_size)
        self._stop_event = threading.Event()
        # the thread holds the items and the queue, not the pool, so a dropped pool is collected and stops it
        self._thread = threading.Thread(target=_fill, args=(items, self._queue, self._stop_event, device),
                                        daemon=True, name=name)
        self._finalizer = weakref.finalize(self, _stop, self._stop_event, self._thread, JOIN_TIMEOUT_S)
        self._thread.start()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Stop the thread after its current item and wait for it (up to 5 minutes). Idempotent."""
        self._finalizer()

    def __enter__(self) -> GenerationPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self._queue.qsize()}/{self._queue.maxsize} ready"
        return f"GenerationPool({self._thread.name!r}, {state})"

    def __iter__(self) -> Iterator[Any]:
        while True:
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                if self.closed:
                    return
                if not self._thread.is_alive():
                    raise RuntimeError("The synthetic generation thread stopped without an error.") from None
                continue
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise RuntimeError(
                    f"Generating synthetic pairs failed in the background thread: {item.exc!r}"
                ) from item.exc
            yield item
