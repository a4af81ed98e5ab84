"""Queries that arrive together are answered together: one ``Searcher.query_many`` call for all
the requests waiting at that moment, instead of one encoder run each.

No thread of its own: the first request thread to find the encoders free runs the waiting
queries (at most ``max_batch``, oldest first) and hands each its answer; the others wait. So one
encoder run goes at a time (onnxruntime spreads each over the cores; two at once only fight for
them). A run takes what queued while the previous one ran, and waits (at most ``linger``
seconds) for the queries known to be on their way: requests being parsed right then
(``arriving``), and, when the previous run answered several and ended less than ``round_trip``
ago, its callers' next queries (concurrent clients are a round trip away). Without that, 8 clients
settle into two groups of 4 that take turns, and batches of 4 cost more CPU a query than
batches of 8 (``benchmarks/server_load.py``). A lone query never waits.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager

from stbir_infer.query_spec import QuerySpec


class _Slot:
    __slots__ = ("query", "result", "done")

    def __init__(self, query: QuerySpec):
        self.query, self.result, self.done = query, None, False


class QueryBatcher:
    """``batcher(query_kwargs)`` -> ``Searcher.query``'s answer for them (or its exception)."""

    round_trip = 0.1  # seconds: a concurrent client's next query comes well within this

    def __init__(self, searcher, max_batch: int = 32, linger: float = 0.01):
        self.searcher = searcher
        self.max_batch = max(1, int(max_batch))
        self.linger = float(linger)
        self._cond = threading.Condition()
        self._waiting: list[_Slot] = []
        self._arriving = 0  # requests being parsed, whose query comes next
        self._busy = False
        self._expect = 0  # queries the next run can count on: the last run's callers come back
        self._last_end = float("-inf")  # when the last run ended (time.monotonic)
        self.runs = self.answered = 0  # query_many calls, and the queries they answered

    @contextmanager
    def arriving(self):
        """Around the parsing of a request whose query is then passed to the batcher."""
        with self._cond:
            self._arriving += 1
        try:
            yield
        finally:
            with self._cond:
                self._arriving -= 1
                self._cond.notify_all()

    def __call__(self, query: QuerySpec):
        slot = _Slot(query)
        with self._cond:
            self._waiting.append(slot)
            self._cond.notify_all()  # a run may be waiting for this arrival
        while True:
            with self._cond:
                while self._busy and not slot.done:
                    self._cond.wait()
                if slot.done:
                    break
                self._busy = True  # this thread runs the next batch (its own query: in it or later)
                self._gather()
                batch = self._waiting[:self.max_batch]
                del self._waiting[:self.max_batch]
            self._run(batch)
        if isinstance(slot.result, BaseException):
            raise slot.result
        return slot.result

    def _gather(self) -> None:
        """Before a run (lock held): wait, at most ``linger`` seconds, for the queries on their
        way: those being parsed, and, under concurrent load (a run of several just ended), the
        next queries of its callers."""
        now = time.monotonic()
        deadline = now + self.linger
        returning = self._expect if now - self._last_end < self.round_trip else 0
        while True:
            want = min(max(returning, len(self._waiting) + self._arriving), self.max_batch)
            left = deadline - time.monotonic()
            if len(self._waiting) >= want or left <= 0:
                return
            self._cond.wait(left)

    def _run(self, batch: list[_Slot]) -> None:
        results = None
        try:
            results = self.searcher.query_many([s.query for s in batch], errors="return",
                                               batch_size=self.max_batch)
        except Exception as exc:  # the whole batch failed (e.g. the index went away)
            results = [exc] * len(batch)
        finally:
            if results is None:  # interrupted: the others must not wait for ever
                results = [RuntimeError("the query was interrupted")] * len(batch)
            with self._cond:
                self.runs += 1
                self.answered += len(batch)
                # Its callers come back (one of them may be the next runner), and what queued
                # meanwhile is still waiting; a lone caller is no sign of concurrent load.
                self._expect = len(self._waiting) + len(batch) if len(batch) > 1 else 0
                self._last_end = time.monotonic()
                for s, r in zip(batch, results):
                    s.result, s.done = r, True
                self._busy = False
                self._cond.notify_all()


__all__ = ["QueryBatcher"]
