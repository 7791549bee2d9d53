"""The tests' ``redis-server``: ``bench/redis_server.py``'s, or a failed/skipped test without one.

Without ``redis-server`` on PATH a test fails under CI (``$CI`` set: ``.ci/run`` must install it) and
skips elsewhere, naming the package to install.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

import pytest

from layerpass.bench import redis_server as server
from layerpass.bench.redis_server import RedisServer, free_port

__all__ = ["RedisServer", "closed_port_url", "redis_server_binary", "running_redis", "silent_server"]


def redis_server_binary() -> str:
    """The path of ``redis-server``; fails the test under CI, skips it elsewhere, when it is missing."""
    path = server.redis_server_path()
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail("redis-server is not on PATH: .ci/run must install it (apt-get install -y redis-server) "
                    "before the suite runs")
    pytest.skip("redis-server is not on PATH: install it (apt-get install -y redis-server) to run this test")


@contextlib.contextmanager
def running_redis() -> Iterator[RedisServer]:
    """A started ``RedisServer`` (see ``bench/redis_server.py``), stopped at exit."""
    with server.running_redis(redis_server_binary()) as s:
        yield s


@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """A loopback URL whose socket accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"redis://127.0.0.1:{s.getsockname()[1]}/0"


def closed_port_url() -> str:
    """A loopback URL with nothing listening (the port was free a moment ago)."""
    return f"redis://127.0.0.1:{free_port()}/0"
