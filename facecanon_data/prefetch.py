"""Run an iterator in a background thread, a bounded number of items ahead of its consumer.

Used to overlap video decoding (OpenCV releases the GIL) with the work that consumes the frames.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
_END = object()


def prefetch(items: Iterable[T], depth: int = 1, name: str = "prefetch") -> Iterator[T]:
    """Yield ``items`` in order, produced by a thread up to ``depth`` items ahead.

    An exception in the producer is re-raised in the consumer; closing the consumer early stops the
    producer at its next item. Under a thread cap of 1 (``threads.apply_thread_cap``) the items are
    produced inline: one core, no overlap.
    """
    from .threads import thread_cap

    if thread_cap() == 1:
        yield from items
        return
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as exc:  # surfaced in the consumer
            put(exc)

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
