"""web.batcher.QueryBatcher: queries that arrive while the encoders are busy share the next run,
each caller gets its own answer (or its own error), and a failed run fails only its callers."""

from __future__ import annotations

import threading
import time

import pytest

from stbir_infer.errors import QueryError
from stbir_infer.web.batcher import QueryBatcher


class SlowSearcher:
    """``query_many`` answers each query with its text; the first call waits for ``release``."""

    def __init__(self):
        self.batches, self.release, self.fail = [], threading.Event(), False

    def query_many(self, queries, errors="raise", batch_size=32):
        self.batches.append([q["text"] for q in queries])
        if len(self.batches) == 1:
            self.release.wait(10)
        if self.fail:
            raise RuntimeError("index gone")
        return [QueryError(f"bad {q['text']}") if q["text"].startswith("bad") else [q["text"]]
                for q in queries]


def _ask(batcher, texts):
    out = {}

    def one(t):
        try:
            out[t] = batcher({"text": t})
        except Exception as exc:  # noqa: BLE001
            out[t] = exc
    threads = []
    for t in texts:
        threads.append(threading.Thread(target=one, args=(t,)))
        threads[-1].start()
        if len(threads) == 1:  # the first runs alone and blocks; the rest queue behind it
            while not batcher.searcher.batches:
                time.sleep(0.001)
    while len(batcher._waiting) < len(texts) - 1:
        time.sleep(0.001)
    batcher.searcher.release.set()
    for th in threads:
        th.join(10)
    return out


def test_waiting_queries_share_one_run_and_get_their_own_answers():
    b = QueryBatcher(SlowSearcher(), max_batch=4)
    texts = ["a", "b", "c", "bad d", "e", "f"]
    out = _ask(b, texts)
    assert b.searcher.batches == [["a"], ["b", "c", "bad d", "e"], ["f"]]  # at most max_batch
    assert {t: out[t] for t in texts if not t.startswith("bad")} == {t: [t] for t in "abcef"}
    assert isinstance(out["bad d"], QueryError) and str(out["bad d"]) == "bad bad d"


def test_a_failed_run_fails_its_callers_and_the_batcher_goes_on():
    searcher = SlowSearcher()
    searcher.fail = True
    b = QueryBatcher(searcher, max_batch=8)
    out = _ask(b, ["a", "b", "c"])
    assert all(isinstance(v, RuntimeError) for v in out.values())
    searcher.fail = False
    assert b({"text": "z"}) == ["z"]
    with pytest.raises(QueryError):
        b({"text": "bad"})


def test_concurrent_http_queries_get_the_answers_of_single_queries(client, searcher, gallery):
    import io

    from PIL import Image

    sketches = gallery[3]
    names = sorted(sketches)[:8]
    want = {n: [h.path for h in searcher.query(sketch=Image.open(io.BytesIO(sketches[n])),
                                               text=f"query {n}", top_k=5)] for n in names}
    got = {}

    def one(n):
        status, data = client.query_form({"text": f"query {n}", "top_k": 5},
                                         {"sketch": ("s.png", sketches[n], "image/png")})
        got[n] = (status, [r["path"] for r in data["results"]])
    threads = [threading.Thread(target=one, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == {n: (200, want[n]) for n in names}


def _together(b, texts):
    """``texts`` asked from one thread each, a little apart; all answered within the joins."""
    threads = [threading.Thread(target=b, args=({"text": t},)) for t in texts]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join(5)
    assert not any(t.is_alive() for t in threads)


def test_a_run_waits_for_the_last_runs_callers_but_a_lone_query_does_not():
    searcher = SlowSearcher()
    searcher.release.set()
    b = QueryBatcher(searcher, max_batch=8, linger=30)  # a wait would outlast the joins
    b.round_trip = 30  # however slow this machine is today
    _together(b, "x")
    assert searcher.batches == [["x"]]  # a lone query runs at once
    b._expect, b._last_end = 3, time.monotonic()  # as if a run of three had just ended
    _together(b, "abc")
    assert searcher.batches[1:] == [["a", "b", "c"]]  # a's run waited for the two others
    _together(b, "abc")  # the same three callers again: one run, and none waits for a fourth
    assert searcher.batches[2:] == [["a", "b", "c"]]
    b._last_end -= 60  # a minute later, no one is on the way
    _together(b, "y")
    assert searcher.batches[3:] == [["y"]]
