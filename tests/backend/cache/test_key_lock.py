"""Per-key locks in a shared cache dir: one holder at a time, a dead holder's lock is taken over at
once, a live but stuck holder is waited for at most ``timeout_s``."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from layerpass.backend.cache.key_lock import KeyLocks

KEY = "ab" * 32
HOLDER = """
import sys, time
from layerpass.backend.cache.key_lock import KeyLocks
with KeyLocks(sys.argv[1], 60).hold(sys.argv[2]) as lock:
    print("held" if lock.acquired else "not held", flush=True)
    time.sleep(120)
"""


def start_holder(root: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, root, KEY], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_uncontended_lock_is_taken_without_waiting(tmp_path):
    locks = KeyLocks(str(tmp_path), timeout_s=5)
    with locks.hold(KEY) as lock:
        assert lock.acquired and not lock.waited
    assert oct(os.stat(locks.path(KEY)).st_mode & 0o777) == oct(0o600)
    assert os.stat(os.path.join(str(tmp_path), "locks")).st_mode & 0o777 == 0o700


def test_a_killed_holder_releases_the_lock_at_once(tmp_path):
    holder = start_holder(str(tmp_path))
    try:
        locks = KeyLocks(str(tmp_path), timeout_s=60)
        t0 = time.monotonic()
        threading.Timer(1.0, lambda: os.kill(holder.pid, signal.SIGKILL)).start()
        with locks.hold(KEY) as lock:
            waited_s = time.monotonic() - t0
            assert lock.acquired and lock.waited
        assert 0.9 <= waited_s < 10, f"took the dead holder's lock after {waited_s:.1f} s"
    finally:
        holder.kill()
        holder.wait()


def test_a_stuck_holder_is_waited_for_at_most_the_timeout(tmp_path, caplog):
    holder = start_holder(str(tmp_path))
    try:
        locks = KeyLocks(str(tmp_path), timeout_s=0.5)
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="layerpass"), locks.hold(KEY, "compiling piece p") as lock:
            assert not lock.acquired and lock.waited
        assert time.monotonic() - t0 < 5
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and f"pid {holder.pid}" in warnings[0] and "compiling it here" in warnings[0]
        assert "lock_timeout_s" in warnings[0]
    finally:
        holder.kill()
        holder.wait()


def test_an_unwritable_lock_dir_runs_the_block_without_a_lock(tmp_path):
    root = tmp_path / "file"
    root.write_text("not a dir")
    with KeyLocks(str(root), timeout_s=1).hold(KEY) as lock:
        assert not lock.acquired and not lock.waited


@pytest.mark.parametrize("timeout", [0.0, 0.2])
def test_holders_in_one_process_exclude_each_other(tmp_path, timeout):
    """flock is per open file: a second hold in the same process waits like another process would."""
    locks = KeyLocks(str(tmp_path), timeout_s=timeout)
    with locks.hold(KEY) as first, locks.hold(KEY) as second:
        assert first.acquired and not second.acquired and second.waited
