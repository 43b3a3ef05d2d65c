"""A small thread-safe LRU cache for expensive, immutable things (seeded modules, tables)."""

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    """Keeps the `maxsize` most recently used values (never None); `maxsize=0` caches nothing."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        """The value kept for `key` (now the most recently used), or None."""
        with self._lock:
            value = self._items.get(key)  # one lookup: a config's __eq__ is Python
            if value is not None:
                self._items.move_to_end(key)
            return value

    def get_or_create(self, key: K, create: Callable[[], V]) -> V:
        value = self.get(key)
        if value is not None:
            return value
        # Built outside the lock: two threads may build the same value once each, but a slow
        # build never blocks requests for other keys.
        value = create()
        if self.maxsize > 0:
            with self._lock:
                self._items[key] = value
                self._items.move_to_end(key)
                while len(self._items) > self.maxsize:
                    self._items.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._items)
