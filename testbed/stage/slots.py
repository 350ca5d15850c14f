"""Which request cache a full stage gives up: least recently used among the idle ones.

A stage holds at most ``max_requests`` caches. A cache idle past ``request_ttl_s`` (default
600 s) is dropped by the server's sweeper; that alone would let a flood of prefills that never
continue lock every slot for the TTL. So when a prefill finds every slot taken, the stage evicts
the least recently used cache that has been idle for at least ``evict_idle_s`` (default 5 s)
and is not running a step; a request stepping more often than that is never the victim. When
none qualifies the prefill gets 503 ``cache_full`` as before.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class RecentRequests:
    """Request ids in order of their last step (event loop only)."""

    def __init__(self, evict_idle_s: float, max_entries: int):
        self.evict_idle_s = evict_idle_s
        self._max_entries = max_entries  # beyond this, ids without a cache are forgotten
        self._used: OrderedDict[str, float] = OrderedDict()  # id -> monotonic time, oldest first

    def touch(self, request_id: str, held: Callable[[], list[str]]) -> None:
        """A step of ``request_id`` was admitted; ``held()``: ids with a cache (for pruning)."""
        self._used[request_id] = time.monotonic()
        self._used.move_to_end(request_id)
        if len(self._used) > self._max_entries:
            keep = set(held())
            for rid in [r for r in self._used if r not in keep]:
                del self._used[rid]

    def forget(self, request_id: str) -> None:
        self._used.pop(request_id, None)

    def victims(self) -> list[str]:
        """Ids idle for at least ``evict_idle_s``, least recently used first."""
        now = time.monotonic()
        out = []
        for rid, used in self._used.items():
            if now - used < self.evict_idle_s:
                break
            out.append(rid)
        return out
