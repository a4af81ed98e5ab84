"""waitress, fitted to ``stbir-infer serve`` (imported only when the ``serve`` extra is installed).

Three additions to waitress's own limits (thread pool, connection limit, idle timeout, header and
body size caps):

* a deadline for a request's line and headers (``header_timeout``): waitress closes a connection
  idle for ``channel_timeout``, but a client that sends one header byte every few seconds is never
  idle; here the headers must be complete ``header_timeout`` seconds after their first byte;
* under pressure (``pressure_share`` of ``connection_limit`` open, half by default) both
  deadlines drop to ``pressure_timeout`` (1 s) and are checked every ``PRESSURE_CHECK_S``: slow
  clients then hold a connection about a second, so they cannot keep the server at its limit
  while normal clients wait in the listen backlog (200 slow sockets against the limit of 100
  delayed queries by up to 20 s; ``benchmarks/slowloris.py``). waitress has no per-address cap,
  and one would not help on loopback, where every client has the same address;
* errors that waitress answers itself (413 body too large, 400 malformed or duplicate
  Content-Length, 431 headers too large) come as the same one-line JSON as the App's.
"""

from __future__ import annotations

import json
import time

from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask

from stbir_infer.web.app import SECURITY_HEADERS
from stbir_infer.web.requests import one_line

PRESSURE_CHECK_S = 0.05  # how often the deadlines are checked under pressure


class JsonErrorTask(ErrorTask):
    """waitress's own refusals as ``{"error": ..., "status": ...}`` with the App's headers."""

    def execute(self):
        err = self.request.error
        limit = self.channel.server.body_limit
        if err.code == 413:
            message = f"request body is over the {limit:,}-byte limit"
        else:
            message = f"{err.reason.lower()}: {one_line(err.body, 200)}"
        body = json.dumps({"error": message, "status": err.code}).encode()
        self.status = f"{err.code} {err.reason}"
        self.response_headers.append(("Content-Type", "application/json; charset=utf-8"))
        self.response_headers.extend(SECURITY_HEADERS.items())
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class Channel(HTTPChannel):
    """One client connection; remembers when the request now being read began."""

    error_task_class = JsonErrorTask
    head_started: float | None = None

    def received(self, data):
        fresh = self.request is None
        now = time.time()
        rv = super().received(data)
        if self.request is None:
            self.head_started = None
        elif fresh or self.head_started is None:
            self.head_started = now
        return rv


class Server(TcpWSGIServer):
    """waitress's TCP server on an already bound socket, with the header deadline, shortened
    under pressure (see the module docstring)."""

    channel_class = Channel

    def __init__(self, wsgi_app, sock, *, header_timeout: float, body_limit: int,
                 pressure_share: float = 0.5, pressure_timeout: float = 0.5, **adjustments):
        self.header_timeout = float(header_timeout)
        self.body_limit = int(body_limit)
        self.closed_by_timeout = 0  # connections this server closed as idle or too slow
        adj = Adjustments(sockets=[sock], **adjustments)
        self.pressure_at = max(1, int(adj.connection_limit * pressure_share))
        self.pressure_timeout = min(float(pressure_timeout), self.header_timeout)
        self._next_pressure_check = 0.0
        super().__init__(wsgi_app, map={}, _sock=sock, bind_socket=False, adj=adj,
                         sockinfo=(sock.family, sock.type, sock.proto, sock.getsockname()))

    def under_pressure(self) -> bool:
        return len(self.active_channels) >= self.pressure_at

    def readable(self):
        now = time.time()
        if now >= self._next_pressure_check and self.under_pressure():
            self._next_pressure_check = now + PRESSURE_CHECK_S
            self.maintenance(now)
        return super().readable()

    def maintenance(self, now):
        pressed = self.under_pressure()
        idle_cutoff = now - (self.pressure_timeout if pressed else self.adj.channel_timeout)
        head_cutoff = now - (self.pressure_timeout if pressed else self.header_timeout)
        for channel in list(self.active_channels.values()):
            if channel.requests or channel.will_close:
                continue  # a request is being answered: the app's own time, not the client's
            started = getattr(channel, "head_started", None)
            if channel.last_activity < idle_cutoff or (
                    started is not None and started < head_cutoff
                    and channel.request is not None and not channel.request.headers_finished):
                channel.will_close = True
                self.closed_by_timeout += 1


__all__ = ["Channel", "JsonErrorTask", "Server"]
