"""Work ahead on a background thread: ``Prefetcher(fn, items)`` yields ``fn(item)`` in order.

The trainer uses it to gather the next batches of a streamed dataset (memory-mapped shards,
:mod:`.shards`) — read, copy into a pinned buffer on CUDA — while the current batch trains.

* **Bounded**: at most ``depth`` results wait in the queue (plus the one being made), so
  memory stays a few batches whatever the dataset's size.
* **In order**, one thread: the results come in the order of ``items``.
* **Errors travel**: an exception raised by ``fn`` on the thread is raised, with its
  traceback, by the ``next()`` that would have returned that item.
* **Clean shutdown**: :meth:`Prefetcher.close` (also on leaving a ``with`` block) stops the
  thread and joins it; the thread also ends by itself after the last item. It never blocks
  on a full queue longer than ``POLL_S`` without looking whether it was told to stop.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

__all__ = ["POLL_S", "Prefetcher"]

T = TypeVar("T")
POLL_S = 0.05
_OK, _END, _ERROR = "ok", "end", "error"


class Prefetcher(Generic[T]):
    """Iterate ``fn(item)`` for ``item`` in ``items``, computed ``depth`` ahead on a thread."""

    def __init__(
        self,
        fn: Callable[[Any], T],
        items: Iterable[Any],
        depth: int = 2,
        name: str = "agelab-prefetch",
    ):
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        # The thread sees only the queue, the flag and the work, not this object: an owner
        # that forgets to close() lets go of it, and __del__ then stops the thread.
        self._thread = threading.Thread(
            target=_run, args=(fn, items, self._queue, self._stop), name=name, daemon=True
        )
        self._thread.start()

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        kind, value = self._queue.get()
        if kind == _OK:
            return value
        self._done = True
        self._thread.join()
        if kind == _ERROR:
            raise value
        raise StopIteration

    def close(self) -> None:
        """Stop the thread (after the item it is working on) and wait for it; idempotent."""
        self._done = True
        self._stop.set()
        while True:  # drop what was made ahead: frees the memory and the thread's put
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # a safety net only: owners close() explicitly
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()


def _run(fn: Callable[[Any], Any], items: Iterable[Any], q: queue.Queue, stop: threading.Event):
    """The thread: ``fn`` of each item into ``q``, then an end (or the error) marker."""
    try:
        for item in items:
            if stop.is_set():
                return
            if not _put(q, stop, (_OK, fn(item))):
                return
    except BaseException as exc:  # handed to the consumer, raised there
        _put(q, stop, (_ERROR, exc))
        return
    _put(q, stop, (_END, None))


def _put(q: queue.Queue, stop: threading.Event, message: tuple[str, Any]) -> bool:
    """Queue ``message``; False when told to stop while waiting for room."""
    while not stop.is_set():
        try:
            q.put(message, timeout=POLL_S)
            return True
        except queue.Full:
            continue
    return False
