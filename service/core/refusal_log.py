"""Refusals summed in the log: a full queue, a drain or a model still loading refuse a call before any work, and
one log line each would say nothing new while costing more than the refusal itself (in a burst of 768 refusals
on 2 cores, the log lines took over half of the refusal path's time on the event loop). Such refusals are logged
as one line a second per kind, with their count; the metrics still count every one. Other failures keep their
line per request."""

from __future__ import annotations

import asyncio
import collections
import logging

from service.failures import Failure

log = logging.getLogger("service.requests")

SUMMED = frozenset({Failure.FULL, Failure.DRAINING, Failure.LOADING})


class RefusalLog:
    """Counts refusals of the SUMMED kinds and logs them once per `interval` seconds. Use on the event loop."""

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self.counts: collections.Counter[Failure] = collections.Counter()
        self._flush: asyncio.TimerHandle | None = None

    def add(self, kind: Failure) -> None:
        self.counts[kind] += 1
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(self.interval, self.flush)

    def flush(self) -> None:
        """Log what was counted since the last line (also when the server stops)."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        for kind, count in self.counts.items():
            log.info("refused %d requests in %.0f s: %s (%s)", count, self.interval, kind.value.meaning,
                     kind.status.name)
        self.counts.clear()
