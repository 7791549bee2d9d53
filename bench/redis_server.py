"""A real ``redis-server`` on a free loopback port: the fleet bench's shared store, and the tests'.

``running_redis()`` starts one (no persistence, its own temp dir, ``DEBUG`` allowed from loopback so a
test can make it slow), waits until it answers PING, yields a ``RedisServer`` and always stops the
process at exit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


def redis_server_path() -> str | None:
    """``redis-server`` on PATH, or None."""
    return shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PortTaken(RuntimeError):
    """Another process bound the port between ``free_port()`` and the server's start."""


class RedisServer:
    """One ``redis-server`` process; ``stop()`` / ``start()`` restart it on the same port (empty again)."""

    def __init__(self, binary: str, workdir: str) -> None:
        self.binary, self.workdir = binary, workdir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self):
        """A raw client (bytes in, bytes out) for setting the server up or tampering with it."""
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, socket_connect_timeout=5)

    def start(self) -> None:
        assert self.proc is None, "already running"
        log = open(os.path.join(self.workdir, "redis.log"), "wb")  # this run's log only
        with log:
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--daemonize", "no", "--dir", self.workdir, "--enable-debug-command", "local"],
                stdout=log, stderr=subprocess.STDOUT)
        self._wait_for_ping()

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _wait_for_ping(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        client = self.client()
        try:
            while True:
                if self.proc.poll() is not None:
                    self.proc = None
                    error = PortTaken if "Address already in use" in self._log_tail() else RuntimeError
                    raise error(f"redis-server exited on port {self.port}: "
                                       f"{self._log_tail()}")
                try:
                    if client.ping():
                        return
                except Exception:  # not listening yet
                    if time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(f"redis-server did not answer PING within {START_TIMEOUT_S} s: "
                                           f"{self._log_tail()}") from None
                    time.sleep(0.02)
        finally:
            client.close()

    def _log_tail(self) -> str:
        with open(os.path.join(self.workdir, "redis.log"), "rb") as f:
            return f.read()[-2000:].decode(errors="replace")


@contextlib.contextmanager
def running_redis(binary: str | None = None) -> Iterator[RedisServer]:
    """A started ``RedisServer`` (``binary``: default ``redis-server`` on PATH), stopped (and its dir
    removed) at exit, whatever happened."""
    binary = binary or redis_server_path()
    if binary is None:
        raise RuntimeError("redis-server is not on PATH (Debian: apt-get install -y redis-server)")
    workdir = tempfile.mkdtemp(prefix="layerpass-redis-")
    server = RedisServer(binary, workdir)
    try:
        for attempt in range(3):
            try:
                server.start()
                break
            except PortTaken:
                if attempt == 2:
                    raise
                server.port = free_port()
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
