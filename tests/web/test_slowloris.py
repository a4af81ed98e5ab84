"""Issue 26, item 5: 200 slow-header sockets against the default connection limit of 100 cost a
normal query at most 2 s (they delayed queries by up to 21 s, and 5 queries got through in 60 s,
when the server only closed them at its 10 s header deadline). Under pressure the deadlines drop
to half a second (``web._waitress``); ``benchmarks/slowloris.py`` is the measurement."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_200_slow_sockets_cost_a_normal_query_at_most_2_s():
    spec = importlib.util.spec_from_file_location("stbir_bench_slowloris",
                                                  REPO / "benchmarks" / "slowloris.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    r = bench.run(n_slow=200, seconds=8.0, drip=1.0)
    # The goal is 2 s; measured here, quietly, 1.05 s worst case and 8 queries in the 8 s. The
    # bounds leave room for a CI machine twice as slow (or sharing its cores) yet stay far from
    # the old behaviour, which this same run measured at 18.2 s worst case and 1 query
    # (up to 21 s in the issue): at most 5 s, and at least 3 queries.
    assert r["queries"] >= 3 and r["ok"] == r["queries"], r
    assert r["max_s"] < 5.0, r
    assert r["slow_closed_by_server"] > 200, r  # the server, not the clients, ended them
