"""stbir-infer serve, the server layer (waitress behind a WSGI adapter): body limits enforced from
the headers, malformed framing refused, threads and connections bounded, idle and slow clients
closed by the server's own timeouts, no 1 s stalls when many clients connect at once."""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from web_helpers import MAX_BODY, Client, start_server, stop_server

from stbir_infer.web import App


def _raw(server, data: bytes, timeout: float = 10) -> bytes:
    """Send ``data`` on a fresh connection; everything the server answers until it closes."""
    with socket.create_connection(server.server_address[:2], timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def _wait_closed(sock: socket.socket, timeout: float) -> float | None:
    """Seconds until the server closes ``sock`` (None: still open after ``timeout``)."""
    t0 = time.monotonic()
    sock.settimeout(timeout)
    try:
        while True:
            if not sock.recv(4096):
                return time.monotonic() - t0
    except ConnectionResetError:
        return time.monotonic() - t0
    except TimeoutError:
        return None


def test_oversized_body_is_413(client):
    big = os.urandom(MAX_BODY + 1)
    status, data = client.query_form({"text": "x"}, {"sketch": ("big.png", big, "image/png")})
    assert status == 413
    assert "limit" in data["error"]
    # the server goes on answering
    assert client.json("GET", "/api/health")[0] == 200


def test_oversized_body_is_refused_before_it_is_sent(server):
    """The 413 comes from the headers alone: the client may stop sending."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    conn.putrequest("POST", "/api/query")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(50 << 20))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and resp.getheader("Connection") == "close"
    conn.close()


def test_a_client_that_hangs_up_mid_body(server, client):
    with socket.create_connection(server.server_address[:2], timeout=10) as sock:
        sock.sendall(b"POST /api/query HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"text\": ")
        sock.shutdown(socket.SHUT_WR)
        assert _wait_closed(sock, 5) is not None  # the server lets the half request go
    assert client.json("GET", "/api/health")[0] == 200




def test_duplicate_content_length_is_400(server):
    body = b'{"text": "a red star"}'
    for lengths in ((len(body), len(body)), (len(body), 3)):
        head = "".join(f"Content-Length: {n}\r\n" for n in lengths)
        reply = _raw(server, (f"POST /api/query HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                              f"Content-Type: application/json\r\n{head}\r\n").encode() + body)
        status_line, _, rest = reply.partition(b"\r\n")
        assert status_line.startswith(b"HTTP/1.1 400"), reply[:200]
        assert "Content-Length" in json.loads(rest.split(b"\r\n\r\n", 1)[1])["error"]


def test_errors_of_the_server_itself_are_json(server):
    reply = _raw(server, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * (70 << 10) + b"\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].split()[1] == b"431" and b"application/json" in head
    assert json.loads(body)["status"] == 431


def test_head_has_no_body(client):
    status, headers, body = client.request("HEAD", "/api/health")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0


def test_many_clients_at_once_do_not_stall(server):
    """http.server listened with a backlog of 5: the 6th simultaneous connection waited for a
    SYN retransmit (1 s). Here 32 clients connect at the same instant."""
    client = Client(*server.server_address[:2])
    barrier = threading.Barrier(32)

    def one(_):
        barrier.wait()
        t0 = time.monotonic()
        status, _ = client.json("GET", "/api/health")
        return status, time.monotonic() - t0

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(one, range(32)))
    assert all(s == 200 for s, _ in answers)
    assert max(t for _, t in answers) < 0.9, sorted(t for _, t in answers)[-5:]


def test_idle_connections_cost_no_threads_and_are_closed(searcher):
    """200 idle connections: no thread each (the pool stays at its size), and the server closes
    every one of them after ``channel_timeout``, while a normal request is still answered."""
    srv = start_server(App(searcher), threads=4, connection_limit=300, channel_timeout=1,
                       cleanup_interval=1)
    try:
        before = threading.active_count()
        socks = [socket.create_connection(srv.server_address[:2], timeout=10) for _ in range(200)]
        for s in socks[::2]:
            s.sendall(b"GET /api/health HTTP/1.1\r\n")  # half a request, then nothing
        time.sleep(0.3)
        assert threading.active_count() <= before + 1  # + the test's own nothing: no thread each
        assert Client(*srv.server_address[:2]).json("GET", "/api/health")[0] == 200
        closed = [_wait_closed(s, 5) for s in socks]
        assert all(t is not None for t in closed), sum(t is None for t in closed)
        assert srv.closed_by_timeout >= 200
    finally:
        for s in socks:
            s.close()
        stop_server(srv)


def test_slow_headers_have_a_deadline(searcher):
    """A client that sends a header byte every 0.3 s is never idle; the header deadline closes it."""
    srv = start_server(App(searcher), channel_timeout=5, header_timeout=1.5, cleanup_interval=1)
    try:
        with socket.create_connection(srv.server_address[:2], timeout=10) as sock:
            sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            t0 = time.monotonic()
            closed = False
            while time.monotonic() - t0 < 6 and not closed:
                time.sleep(0.3)
                try:
                    sock.sendall(b"a")
                    sock.setblocking(False)
                    closed = sock.recv(4096) == b""
                except BlockingIOError:
                    pass
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                finally:
                    sock.setblocking(True)
            took = time.monotonic() - t0
        assert closed and took < 1.5 + 1 + 1.0, took  # deadline + cleanup interval + slack
    finally:
        stop_server(srv)


def test_keep_alive_connection_serves_several_requests(server):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    try:
        for _ in range(3):
            conn.request("GET", "/api/health")
            resp = conn.getresponse()
            assert resp.status == 200 and json.loads(resp.read())["status"] == "ok"
    finally:
        conn.close()
