"""One lock per cache key in the cache dir, so processes sharing it compile each key once.

The lock is ``flock`` on ``<cache_dir>/locks/<key[:2]>/<key>.lock``: the kernel releases it
when its holder exits, however it exits (SIGKILL included), so a dead holder's lock is simply
taken by the next process that asks; no stale-lock clean-up, no heartbeat. ``flock`` works on
local filesystems and on NFSv4 (Linux maps it to a byte-range lock there); on a filesystem that
refuses it, the lock is skipped with one warning (every process then compiles for itself, as
without a lock).

A holder that is alive but stuck must not stall the others for ever: a waiter gives up after
``timeout_s`` and compiles the key itself, with a warning. Whoever holds or gave up on the lock
writes the same entry, and the cache's atomic renames keep either one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

from .private_files import FILE_MODE, make_private_dirs

logger = logging.getLogger("layerpass")
_POLL_S = (0.01, 0.25)  # first and longest sleep between tries (doubling)
_unlockable_warned: set[str] = set()


@dataclass
class LockOutcome:
    """What taking a key's lock did: ``waited`` (another process held it; it has probably
    stored the entry: look again before compiling), ``acquired`` (False: gave up, or the
    filesystem has no locks), and the seconds spent waiting."""

    acquired: bool
    waited: bool
    wait_s: float = 0.0
    holder: str = ""


class KeyLocks:
    """Per-key locks under ``<root>/locks``."""

    def __init__(self, root: str, timeout_s: float) -> None:
        self.root = os.path.join(root, "locks")
        self.timeout_s = timeout_s

    def path(self, key: str) -> str:
        return os.path.join(self.root, key[:2], f"{key}.lock")

    @contextlib.contextmanager
    def hold(self, key: str, what: str = "") -> Iterator[LockOutcome]:
        """Hold ``key``'s lock for the block (or, past ``timeout_s`` waiting, run it without)."""
        path = self.path(key)
        try:
            make_private_dirs(os.path.dirname(path))
            fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        except OSError as e:  # an unwritable cache dir: the cache itself says so; no lock to take
            yield LockOutcome(acquired=False, waited=False, holder=f"no lock ({type(e).__name__})")
            return
        try:
            outcome = self._acquire(fd, path, what or key[:12])
            if outcome.acquired:
                _write_holder(fd)
            yield outcome
        finally:
            os.close(fd)  # releases the flock

    def _acquire(self, fd: int, path: str, what: str) -> LockOutcome:
        t0 = time.monotonic()
        sleep, waited = _POLL_S[0], False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return LockOutcome(acquired=True, waited=waited, wait_s=time.monotonic() - t0)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):  # e.g. ENOLCK: this filesystem has no locks
                    _warn_unlockable(path, e)
                    return LockOutcome(acquired=False, waited=False)
            waited = True
            elapsed = time.monotonic() - t0
            if elapsed >= self.timeout_s:
                holder = _read_holder(path)
                logger.warning("layerpass: waited %.0f s for %s to finish %s (lock %s); compiling it here "
                               "(CompilationConfig.lock_timeout_s sets the wait)", elapsed, holder or "another process",
                               what, path)
                return LockOutcome(acquired=False, waited=True, wait_s=elapsed, holder=holder)
            time.sleep(min(sleep, self.timeout_s - elapsed))
            sleep = min(sleep * 2, _POLL_S[1])


def _write_holder(fd: int) -> None:
    """Who holds the lock, for a waiter's message (best effort)."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)


def _read_holder(path: str) -> str:
    with contextlib.suppress(OSError), open(path, "rb") as f:
        return f.read(200).decode(errors="replace")
    return ""


def _warn_unlockable(path: str, error: OSError) -> None:
    root = os.path.dirname(os.path.dirname(path))
    if root not in _unlockable_warned:
        _unlockable_warned.add(root)
        logger.warning("layerpass: the cache dir's filesystem refuses file locks (%s at %s); processes sharing it "
                       "compile each piece for themselves", error, path)
