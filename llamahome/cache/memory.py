"""An in-process store of loaded arrays (token caches read into RAM) under a byte budget."""

from __future__ import annotations

import collections
from typing import Any


class MemoryStore:
    """Maps key -> value with sizes; evicts by policy ('lru' or 'size': largest first) past `budget`."""

    def __init__(self, budget: int, policy: str = "lru"):
        self.budget = budget
        self.policy = policy
        self._items: collections.OrderedDict[str, tuple[Any, int]] = collections.OrderedDict()
        self.bytes = 0
        self.evictions = 0

    def get(self, key: str) -> Any | None:
        if key not in self._items:
            return None
        self._items.move_to_end(key)
        return self._items[key][0]

    def put(self, key: str, value: Any, nbytes: int) -> bool:
        """Stores `value` unless it alone exceeds the budget; returns whether it was stored."""
        if nbytes > self.budget:
            return False
        self.pop(key)
        while self._items and self.bytes + nbytes > self.budget:
            victim = (next(iter(self._items)) if self.policy == "lru"
                      else max(self._items, key=lambda k: self._items[k][1]))
            self.pop(victim)
            self.evictions += 1
        self._items[key] = (value, nbytes)
        self.bytes += nbytes
        return True

    def pop(self, key: str) -> None:
        if key in self._items:
            self.bytes -= self._items.pop(key)[1]

    def __len__(self) -> int:
        return len(self._items)
