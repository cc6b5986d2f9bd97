"""Run a generator ahead of its consumer in a background thread, with a bounded queue.

Used by ingest (read + transform the next chunk while TileDB writes this one) and by the training
loader (read and assemble minibatches while the model trains). TileDB, h5py and numpy release the
GIL, so the producer really overlaps the consumer.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_END = object()


def prefetch(items: Iterable[T], depth: int = 2, name: str = "atlasmix-prefetch") -> Iterator[T]:
    """Yield the items of ``items``, produced by a daemon thread up to ``depth`` items ahead.

    Parameters
    ----------
    items : iterable
        Usually a generator; it runs entirely in the producer thread.
    depth : int
        Queue size: at most ``depth`` produced items wait in memory (plus one being made).
    name : str
        Thread name (shows in py-spy / debuggers).

    Yields
    ------
    The items, in order. An exception raised by the producer is re-raised here. When the consumer
    stops early (``break``, ``close()``, an error), the producer is stopped, the queue drained and the
    generator closed (its ``finally`` blocks run) before this returns.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def run() -> None:
        it = iter(items)
        try:
            for item in it:
                if stop.is_set():
                    return
                q.put(item)
            q.put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(e)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    t = threading.Thread(target=run, daemon=True, name=name)
    t.start()
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
        while t.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass
        t.join()
