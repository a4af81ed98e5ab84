"""The socket layer of ``stbir-infer serve``: a thin WSGI adapter over ``App.handle``, served by
waitress (the ``serve`` extra: ``pip install 'stbir[serve]'``), and the CLI's ``serve()``.

waitress reads requests in one asynchronous loop and hands complete ones to a fixed pool of
threads, so slow or idle clients cost a socket, never a thread. The limits, all bounded:

    threads          worker threads answering requests (queries also wait for an encoder slot)
    connection_limit open connections at once; beyond it new ones wait in the listen backlog
    backlog          the listen backlog (http.server's 5 made 8 simultaneous clients stall 1 s)
    channel_timeout  seconds a connection may sit idle before the server closes it
    header_timeout   seconds a request's line and headers may take from their first byte
                     (under pressure, half the connection limit open: both timeouts 0.5 s)
    body limit       the App's ``max_body``: a larger Content-Length is a 413 before the body is read

    from stbir_infer.searcher import Searcher
    from stbir_infer.web import App, make_server
    server = make_server(App(Searcher("export", "index")), "127.0.0.1", 8000)
    server.serve_forever()
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
import threading
from dataclasses import asdict, dataclass
from http import HTTPStatus
from urllib.parse import quote

from stbir_infer.session import DEFAULT_PROVIDER
from stbir_infer.web.app import SECURITY_HEADERS, App, ServeError
from stbir_infer.web.requests import DEFAULT_MAX_BODY, one_line

INSTALL_HINT = "stbir-infer serve needs the `serve` extra: install it with pip install 'stbir[serve]'"
LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1"}


@dataclass(frozen=True)
class Limits:
    """The server's bounds (see the module docstring)."""

    threads: int = 8
    connection_limit: int = 100
    backlog: int = 1024
    channel_timeout: int = 30
    header_timeout: float = 10.0
    cleanup_interval: int = 2
    max_header_bytes: int = 64 * 1024


# -- WSGI ---------------------------------------------------------------------------------------

class Headers:
    """A WSGI environ's request headers as ``App.handle`` reads them: ``get(name)``, any case."""

    def __init__(self, environ: dict):
        self._environ = environ

    def get(self, name: str, default=None):
        key = name.upper().replace("-", "_")
        if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            key = "HTTP_" + key
        return self._environ.get(key, default)


def request_target(environ: dict) -> str:
    """The request target as the client wrote it (``%2F`` stays encoded)."""
    raw = environ.get("REQUEST_URI")  # waitress, gunicorn, uwsgi
    if raw:
        return raw
    path = quote(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""), safe="/:@!$&'()*+,;=")
    query = environ.get("QUERY_STRING")
    return f"{path}?{query}" if query else path


class WSGIAdapter:
    """``App`` as a WSGI application (PEP 3333). The server has read the whole body already (and
    refused it beyond its limit), so ``read_body`` reads from ``wsgi.input``."""

    def __init__(self, app: App):
        self.app = app

    def __call__(self, environ, start_response):
        method = environ.get("REQUEST_METHOD", "GET")
        target = request_target(environ)
        resp = self.app.handle(method, target, Headers(environ), environ["wsgi.input"].read)
        headers = [("Content-Type", resp.content_type), ("Content-Length", str(len(resp.body)))]
        headers += [(k, v) for k, v in {**SECURITY_HEADERS, **resp.headers}.items()]
        if resp.close:
            headers.append(("Connection", "close"))
        try:
            phrase = HTTPStatus(resp.status).phrase
        except ValueError:
            phrase = "Unknown"
        start_response(f"{resp.status} {phrase}", headers)
        self.app.log(f"{environ.get('REMOTE_ADDR', '-')} - \"{one_line(method, 10)} "
                     f"{one_line(target, 200)}\" {resp.status} {len(resp.body)}")
        if method == "HEAD" or resp.status in (204, 304):
            return [b""]
        return [resp.body]


# -- the server ---------------------------------------------------------------------------------

def _waitress_server():
    try:
        from stbir_infer.web import _waitress
    except ImportError as exc:
        if (exc.name or "").split(".")[0] != "waitress":
            raise
        raise ServeError(INSTALL_HINT) from None
    return _waitress.Server


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Server:
    """A bound, listening server: ``serve_forever()`` in one thread, ``shutdown()`` from another,
    then ``server_close()`` (the methods socketserver's servers have)."""

    def __init__(self, app: App, sock: socket.socket, limits: Limits):
        impl = _waitress_server()
        self.app = app
        self.limits = limits
        self.server_address = sock.getsockname()
        self._impl = impl(WSGIAdapter(app), sock, header_timeout=limits.header_timeout,
                          body_limit=app.max_body, threads=limits.threads,
                          connection_limit=limits.connection_limit, backlog=limits.backlog,
                          channel_timeout=limits.channel_timeout,
                          cleanup_interval=limits.cleanup_interval,
                          max_request_header_size=limits.max_header_bytes,
                          # waitress refuses Content-Length >= this: exactly the App's limit
                          max_request_body_size=app.max_body + 1,
                          ident="stbir-infer", expose_tracebacks=False,
                          clear_untrusted_proxy_headers=True)
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}/"

    @property
    def closed_by_timeout(self) -> int:
        """Connections the server closed because they sat idle or sent their headers too slowly."""
        return self._impl.closed_by_timeout

    def serve_forever(self) -> None:
        from waitress import wasyncore

        self._stopped.clear()
        try:
            adj = self._impl.adj
            while not self._stop.is_set():
                wasyncore.loop(timeout=adj.asyncore_loop_timeout, map=self._impl._map,
                               use_poll=adj.asyncore_use_poll, count=1)
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop ``serve_forever`` (from another thread) and wait for it to return."""
        self._stop.set()
        self._impl.pull_trigger()
        self._stopped.wait()

    def server_close(self) -> None:
        """Close every connection and the listening socket; stop the worker threads."""
        from waitress import wasyncore

        self._impl.task_dispatcher.shutdown(timeout=5)
        wasyncore.close_all(self._impl._map)


def make_server(app: App, host: str = "127.0.0.1", port: int = 8000,
                limits: Limits | None = None) -> Server:
    """Bind (port 0: any free port). On a loopback address, requests must name a loopback Host."""
    limits = limits or Limits()
    _waitress_server()  # the extra is installed, or one line says how to install it
    if is_loopback(host) and app.allowed_hosts is None:
        app.allowed_hosts = set(LOOPBACK_HOSTS)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=limits.backlog)
    except OSError as exc:
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        return Server(app, sock, limits)
    except BaseException:
        sock.close()
        raise


def _route_logs(echo, quiet: bool) -> None:
    """waitress's own log lines (queue depth, connection limit reached) on the same stream."""

    class _Echo(logging.Handler):
        def emit(self, record):
            echo(f"stbir-infer: waitress: {one_line(record.getMessage(), 300)}")

    logger = logging.getLogger("waitress")
    logger.handlers[:] = [_Echo()]
    logger.propagate = False
    logger.setLevel(logging.ERROR if quiet else logging.WARNING)
    # "Task queue depth is N": a request waited for a free thread; routine under load.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)


def serve(model_dir, index_dir, *, host: str = "127.0.0.1", port: int = 8000,
          threads: int | None = None, precision: str = "fp32", provider: str = DEFAULT_PROVIDER,
          max_body: int = DEFAULT_MAX_BODY,
          quiet: bool = False, echo=None, limits: Limits | None = None) -> None:
    """Load the export and the index once, then answer until interrupted (the CLI's ``serve``)."""
    from stbir_infer.searcher import Searcher

    _waitress_server()  # before the models load: a missing extra is a one-line error at once
    echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    searcher = Searcher(model_dir, index_dir, threads=threads, precision=precision, provider=provider)
    if searcher.current_index() is None:
        raise ServeError(f"{index_dir}: no index here yet (run `stbir-infer enroll --images DIR "
                         f"--index {index_dir}` first)")
    app = App(searcher, max_body=max_body, log=None if quiet else echo)
    app.warm_up()
    server = make_server(app, host, port, limits)
    _route_logs(echo, quiet)
    if not is_loopback(host):
        echo(f"stbir-infer: warning: listening on {host}: anyone who can reach this machine can "
             "search the gallery and view its photos")
    n = len(app._gallery().items)
    lim = server.limits
    echo(f"stbir-infer: serving {n} image{'s' if n != 1 else ''} at {server.url} (Ctrl+C to stop)")
    if not quiet:
        echo(f"stbir-infer: limits: {', '.join(f'{k} {v}' for k, v in asdict(lim).items())}, "
             f"max_body {max_body}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        echo("stbir-infer: stopped")
    finally:
        server.server_close()


__all__ = ["INSTALL_HINT", "Limits", "Server", "WSGIAdapter", "is_loopback", "make_server", "serve"]
