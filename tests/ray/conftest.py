"""Fixtures for the Ray tests."""

from __future__ import annotations

import socket

import pytest


@pytest.fixture(scope="session")
def serve_session(ray_cluster):
    """Ray Serve on a free loopback port, started once for the session: starting and shutting down
    its controller and proxy for every test cost about 10 s a test on two cores."""
    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture
def serve_url(serve_session):
    """The session's Serve for one test; the applications the test deployed are deleted after it."""
    from ray import serve

    before = set(serve.status().applications)
    yield serve_session
    for name in set(serve.status().applications) - before:
        serve.delete(name)
