"""Issue 13, "must show": 50 slow-header clients do not hurt 8 normal ones, and the server closes the
slow sockets by its own timeouts.

On loopback, bounded in time (about 5 s quiet + 30 s hostile) and in sockets (50 slow at a time):

1. quiet: 8 clients send text queries back to back; their p99 latency is the reference;
2. hostile: the same 8 clients go on while 50 slow clients each open a connection, send half a
   request line and headers, then either go silent (25 of them) or drip one header byte every
   0.5 s (25: never idle, so only a header deadline stops them). Whenever the server closes one,
   it reconnects at once, so 50 are held open throughout.

Asserts: hostile p99 < 10x quiet p99; every normal query answered 200; every slow socket closed by
the server within its timeout (idle: ``channel_timeout``, drip: ``header_timeout``, each plus
the maintenance interval and 1.5 s of slack); threads do not grow with the slow sockets.
"""

from __future__ import annotations

import json
import selectors
import socket
import threading
import time

import numpy as np
from web_helpers import Client, start_server, stop_server

from stbir_infer.web import App

N_NORMAL, N_SLOW = 8, 50
QUIET_S, HOSTILE_S = 5.0, 30.0
CHANNEL_TIMEOUT, HEADER_TIMEOUT, CLEANUP = 2, 3.0, 1
SLACK = 1.5
PARTIAL = b"POST /api/query HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nX-Pad: "


def _normal_load(address, seconds: float) -> tuple[list[float], list[int]]:
    """N_NORMAL clients querying back to back for ``seconds``: (latencies, statuses)."""
    client = Client(*address)
    body = json.dumps({"text": "a red striped star", "top_k": 5}).encode()
    latencies: list[float] = []
    statuses: list[int] = []
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def run():
        while time.monotonic() < end:
            t0 = time.perf_counter()
            try:
                status = client.request("POST", "/api/query", body=body,
                                        headers={"Content-Type": "application/json"})[0]
            except OSError:
                status = -1
            took = time.perf_counter() - t0
            with lock:
                latencies.append(took)
                statuses.append(status)

    threads = [threading.Thread(target=run) for _ in range(N_NORMAL)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, statuses


class SlowClients:
    """N_SLOW slow-header connections held open (reconnecting as the server closes them), in one
    thread. ``lifetimes`` records (kind, seconds from connect to the server's close)."""

    def __init__(self, address):
        self.address = address
        self.lifetimes: list[tuple[str, float]] = []
        self.max_open = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _open(self, sel, kind):
        sock = socket.create_connection(self.address, timeout=5)
        sock.sendall(PARTIAL)
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, (kind, time.monotonic()))

    def _closed(self, sel, sock, kind, t0):
        self.lifetimes.append((kind, time.monotonic() - t0))
        sel.unregister(sock)
        sock.close()
        if not self._stop.is_set():
            self._open(sel, kind)

    def _run(self):
        sel = selectors.DefaultSelector()
        for i in range(N_SLOW):
            self._open(sel, "idle" if i % 2 else "drip")
        next_drip = time.monotonic() + 0.5
        while not self._stop.is_set():
            for key, _ in sel.select(timeout=0.1):
                try:
                    data = key.fileobj.recv(4096)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    self._closed(sel, key.fileobj, *key.data)
            if time.monotonic() >= next_drip:
                next_drip += 0.5
                for key in list(sel.get_map().values()):
                    if key.data[0] == "drip":
                        try:
                            key.fileobj.send(b"a")
                        except (BlockingIOError, InterruptedError):
                            pass
                        except OSError:
                            self._closed(sel, key.fileobj, *key.data)
            self.max_open = max(self.max_open, len(sel.get_map()))
        for key in list(sel.get_map().values()):
            key.fileobj.close()
        sel.close()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)


def test_slow_header_clients_do_not_hurt_normal_queries(searcher):
    app = App(searcher)
    app.warm_up()
    srv = start_server(app, threads=8, connection_limit=100, channel_timeout=CHANNEL_TIMEOUT,
                       header_timeout=HEADER_TIMEOUT, cleanup_interval=CLEANUP)
    address = srv.server_address[:2]
    try:
        _normal_load(address, 1.0)  # warm: first connections, caches
        threads_before = threading.active_count()
        quiet, quiet_status = _normal_load(address, QUIET_S)
        with SlowClients(address) as slow:
            time.sleep(0.5)
            threads_slow = threading.active_count()
            hostile, hostile_status = _normal_load(address, HOSTILE_S - 0.5)
        closed_by_server = srv.closed_by_timeout
    finally:
        stop_server(srv)

    quiet_p99 = float(np.percentile(quiet, 99))
    hostile_p99 = float(np.percentile(hostile, 99))
    idle = [t for kind, t in slow.lifetimes if kind == "idle"]
    drip = [t for kind, t in slow.lifetimes if kind == "drip"]
    print(f"\nhostile clients: quiet p99 {quiet_p99 * 1000:.1f} ms ({len(quiet)} queries), "
          f"hostile p99 {hostile_p99 * 1000:.1f} ms ({len(hostile)} queries), "
          f"slow sockets open at most {slow.max_open}, closed by the server: {len(slow.lifetimes)} "
          f"(idle {len(idle)}, max {max(idle, default=0):.2f} s; drip {len(drip)}, "
          f"max {max(drip, default=0):.2f} s); server's timeout count {closed_by_server}")

    assert set(quiet_status) == {200} and set(hostile_status) == {200}
    assert slow.max_open == N_SLOW
    assert threads_slow <= threads_before + 1  # the slow clients' own thread; none in the server
    assert hostile_p99 < 10 * quiet_p99, (quiet_p99, hostile_p99)
    # every slow socket, silent or dripping, was closed by the server's own timeouts, in time
    assert len(idle) >= N_SLOW // 2 and len(drip) >= N_SLOW // 2
    assert max(idle) <= CHANNEL_TIMEOUT + CLEANUP + SLACK, sorted(idle)[-5:]
    assert max(drip) <= HEADER_TIMEOUT + CLEANUP + SLACK, sorted(drip)[-5:]
    assert closed_by_server >= len(slow.lifetimes)
