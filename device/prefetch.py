"""Read ahead in a thread: decode the next file while the interpreter runs the current one.

`Prefetched(items, depth)` walks an iterator in one worker thread and hands its
items over in the same order, at most `depth` ready ahead (plus the one the worker
is making), so memory stays bounded by a few decoded images. Decoding (Pillow,
astropy, numpy) and `invoke()` both release the GIL, so on two or more cores the
decode time leaves the critical path. An exception the iterator raises is raised
by `next()` in its place, after the items before it.

The worker runs the iterator to its end unless `close()` stops it (it looks
between items); a generator is closed in the worker thread, the only thread that
ever runs it.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
DEPTH = 1  # items ready ahead of the one in use (the worker makes one more): enough when decode < invoke
_END = object()
_POLL_S = 0.1  # how often a worker blocked on a full queue looks whether it was closed


class Prefetched(Iterator[T]):
    def __init__(self, items: Iterable[T], depth: int = DEPTH):
        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, not {depth}")
        self._items = iter(items)
        self._ready: queue.Queue = queue.Queue(maxsize=depth)
        self._closed = threading.Event()
        self._finished = False
        self._worker = threading.Thread(target=self._produce, name="nebula-prefetch", daemon=True)
        self._worker.start()

    def _produce(self) -> None:
        try:
            for item in self._items:
                if not self._hand_over((item, None)):
                    return
            self._hand_over((_END, None))
        except BaseException as err:  # raised again by __next__, in order
            self._hand_over((_END, err))
        finally:
            close = getattr(self._items, "close", None)
            if close is not None:
                close()

    def _hand_over(self, entry) -> bool:
        while not self._closed.is_set():
            try:
                self._ready.put(entry, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def __next__(self) -> T:
        if self._finished:
            raise StopIteration
        item, err = self._ready.get()
        if item is _END:
            self._finished = True
            self._worker.join()
            if err is not None:
                raise err
            raise StopIteration
        return item

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop reading ahead; items not yet taken are dropped. Waits up to `timeout_s` for the worker
        to finish the item it is on (a daemon thread: one stuck in a read does not keep the process alive)."""
        self._closed.set()
        self._finished = True
        self._worker.join(timeout_s)

    def __enter__(self) -> "Prefetched[T]":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
