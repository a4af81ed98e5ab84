"""Slow clients at the connection limit against ``stbir-infer serve`` (issue 26, item 5).

``--slow`` sockets (default 200, twice the server's default connection limit of 100) each send
half a request line and headers, then one header byte every ``--drip`` seconds (never idle, so
only a header deadline stops them) and reconnect at once whenever the server closes them; one
normal client sends text queries back to back. Reported: the normal queries' latencies (max, p99,
median, count), statuses, and the slow connections the server closed. The App answers from a
fake searcher (no model: this measures the server, not the encoders); the server runs with its
default limits.

    python benchmarks/slowloris.py [--slow 200] [--seconds 30] [--drip 1.0]
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np

PARTIAL = b"POST /api/query HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nX-Pad: "


class _Hit:
    def __init__(self, path):
        self.path, self.score = path, 0.5

    def to_dict(self):
        return {"rank": 1, "score": 0.5, "path": self.path, "duplicates": []}


class _Gallery:
    files = {"/g/a.png": {"sha256": "a" * 64, "size": 1, "mtime_ns": 1, "label": 0}}
    items, paths = {0: "a" * 64}, {0: ["/g/a.png"]}

    def __len__(self):
        return 1


class FakeSearcher:
    """Enough of a Searcher for App: every query answers one hit."""

    index_dir = Path("/nonexistent")
    fusion_weight = 0.5

    class encoders:  # noqa: N801 - the attribute App reads
        fingerprint, clip_model, embed_dim, precision = "f" * 64, "fake", 4, "fp32"

    def current_index(self):
        return _Gallery()

    def query_many(self, queries, **kw):
        return [[_Hit("/g/a.png")] for _ in queries]

    def min_score_for(self, value, sketch=None, text=None, **_):
        return value

    def score_thresholds(self):
        return {}


def _slow_clients(address, n: int, drip: float, stop: threading.Event, counts: dict) -> None:
    sel = selectors.DefaultSelector()
    socks: set = set()

    def connect():
        try:
            s = socket.create_connection(address, timeout=5)  # the kernel's backlog accepts it
            s.sendall(PARTIAL)
            s.setblocking(False)
        except OSError:
            return
        sel.register(s, selectors.EVENT_READ)
        socks.add(s)
        counts["opened"] += 1

    def drop(s):
        sel.unregister(s)
        s.close()
        socks.discard(s)

    for _ in range(n):
        connect()
    while not stop.is_set():
        for s in list(socks):
            try:
                s.send(b"a")
            except BlockingIOError:
                pass
            except OSError:
                drop(s)
        deadline = time.monotonic() + drip
        while not stop.is_set() and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=max(0.0, deadline - time.monotonic())):
                try:
                    data = key.fileobj.recv(4096)
                except OSError:
                    data = b""
                if not data:  # closed by the server
                    counts["closed_by_server"] += 1
                    drop(key.fileobj)
        while len(socks) < n and not stop.is_set():  # reconnect at once
            connect()
    for s in list(socks):
        drop(s)


def run(n_slow: int = 200, seconds: float = 30.0, drip: float = 1.0, **limits) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from stbir_infer.web import App, Limits, make_server

    srv = make_server(App(FakeSearcher()), "127.0.0.1", 0, Limits(**limits) if limits else None)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    address = srv.server_address[:2]
    stop = threading.Event()
    counts = {"opened": 0, "closed_by_server": 0}
    body = json.dumps({"text": "a red star", "top_k": 1}).encode()
    request = (b"POST /api/query HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    slow = threading.Thread(target=_slow_clients, args=(address, n_slow, drip, stop, counts),
                            daemon=True)
    slow.start()
    time.sleep(min(2.0, seconds / 4))  # the slow sockets fill the server first
    latencies, statuses = [], []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        try:
            with socket.create_connection(address, timeout=60) as s:
                s.sendall(request)
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else -1
        except OSError:
            status = -1
        latencies.append(time.perf_counter() - t0)
        statuses.append(status)
    stop.set()
    slow.join(10)
    srv.shutdown()
    srv.server_close()
    lat = np.asarray(latencies)
    return {"slow_sockets": n_slow, "seconds": seconds, "drip_s": drip, "limits": limits or "default",
            "queries": len(lat), "ok": statuses.count(200),
            "max_s": round(float(lat.max()), 3), "p99_s": round(float(np.percentile(lat, 99)), 3),
            "median_s": round(float(np.median(lat)), 4),
            "slow_opened": counts["opened"], "slow_closed_by_server": counts["closed_by_server"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slow", type=int, default=200)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--drip", type=float, default=1.0)
    args = p.parse_args(argv)
    print(json.dumps(run(args.slow, args.seconds, args.drip), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
