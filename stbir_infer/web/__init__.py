"""``stbir-infer serve``: a local web page and JSON API over one ``Searcher``.

    requests    request parsing: headers and body bytes -> a Query, or a 4xx HTTPError
    multipart   multipart/form-data in one linear pass, with part and header caps
    thumbnails  /api/image: bounded decodes of files that still hold their enrolled content
    app         the App: routes over a Searcher, independent of any server (App.handle)
    server      a WSGI adapter over App.handle, served by waitress (the `serve` extra), and serve()

``App`` and the parsing work without the extra; ``make_server`` / ``serve`` need waitress
(``pip install 'stbir[serve]'``) and say so in one line when it is missing.
"""

from __future__ import annotations

from stbir_infer.web.app import App, Response, ServeError
from stbir_infer.web.requests import DEFAULT_MAX_BODY, HTTPError, Query, parse_multipart

_SERVER_NAMES = ("Limits", "Server", "WSGIAdapter", "make_server", "serve")


def __getattr__(name: str):
    # The server layer is imported on first use, so `import stbir_infer.web` stays cheap.
    if name in _SERVER_NAMES:
        from stbir_infer.web import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["App", "DEFAULT_MAX_BODY", "HTTPError", "Limits", "Query", "Response", "ServeError",
           "Server", "WSGIAdapter", "make_server", "parse_multipart", "serve"]
