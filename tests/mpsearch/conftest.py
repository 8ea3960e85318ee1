"""Shared fixtures of the mpsearch tests."""

from __future__ import annotations

import socket

import pytest


@pytest.fixture(scope="session")
def free_port():
    """A function returning a TCP port free on 127.0.0.1 right now (for servers the tests start)."""

    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return pick
