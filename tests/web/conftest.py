"""Fixtures of the ``stbir-infer serve`` tests: one small gallery and one running server per
session (the export comes from tests/conftest.py's ``small_export``)."""

from __future__ import annotations

import pytest
from web_helpers import MAX_BODY, Client, build_gallery, start_server, stop_server


@pytest.fixture(scope="session")
def gallery(small_export, tmp_path_factory):
    index_dir, photos, sketches = build_gallery(small_export, tmp_path_factory.mktemp("serve"))
    return small_export, index_dir, photos, sketches


@pytest.fixture(scope="session")
def searcher(gallery):
    from stbir_infer.searcher import Searcher

    export_dir, index_dir, _, _ = gallery
    return Searcher(export_dir, index_dir, threads=1)


@pytest.fixture(scope="session")
def server(searcher):
    from stbir_infer.web import App

    app = App(searcher, max_body=MAX_BODY)
    app.warm_up()
    srv = start_server(app)
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def client(server):
    return Client(*server.server_address[:2])
