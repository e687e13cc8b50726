"""Fixtures for the Ray tests."""

from __future__ import annotations

import socket

import pytest


@pytest.fixture
def serve_url(ray_cluster):
    """Ray Serve on a free loopback port for one test; shut down after it."""
    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
