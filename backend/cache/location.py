"""Where cache entries live: a local dir, and optionally a remote store shared by machines.

Both kinds of entry (compiled pieces in ``artifacts/``, saved region programs in ``programs/``)
are files at a cache-relative name (``artifacts/ab/<key>/artifact.bin``). A read looks in the
local dir first, then in the remote store, and a remote hit is written to the local dir (the
next read is local); a new entry is written to both. The remote store holds the same names,
each value sealed with the cache secret (``backend/cache/remote_store.py``), so a machine that did
not compile an entry can check that one that holds the secret did.

Before anything is loaded the local dir must be trusted (``backend/cache/private_files.py``): a dir
another user can write is not used at all, with one warning. Processes sharing the dir take a
lock per key (``backend/cache/key_lock.py``) before compiling, so each key is compiled once.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from .key_lock import KeyLocks, LockOutcome
from .private_files import atomic_write, atomic_write_dir, trusted

logger = logging.getLogger("layerpass")
_refused_warned: set[str] = set()


def open_remote_store(url: str | None) -> object | None:
    """The remote store at ``url`` sealed with ``$LAYERPASS_CACHE_SECRET``, or ``None``: no URL, or
    one that is refused (no secret, a malformed URL: one warning, the compile goes on locally)."""
    if url is None:
        return None
    from layerpass.envs import cache_secret

    from .remote_store import RemoteStore

    try:
        return RemoteStore(url, cache_secret())
    except (ValueError, TypeError) as e:
        if url not in _refused_warned:
            _refused_warned.add(url)
            logger.warning("layerpass: remote cache refused: %s; compiling with the local cache only", e)
        return None


class CacheLocation:
    """A local cache dir (``root``) plus an optional ``RemoteStore``."""

    def __init__(self, root: str, remote: object | None = None, lock_timeout_s: float = 600.0) -> None:
        self.root = root
        self.remote = remote  # a RemoteStore (get / put / names), or None
        self.locks = KeyLocks(root, lock_timeout_s)

    def local(self, name: str) -> str:
        return os.path.join(self.root, *name.split("/"))

    def trusted(self) -> bool:
        """Whether entries may be loaded from here (warns once per untrusted dir)."""
        return all(trusted(p, "cache dir") for p in (self.root, os.path.join(self.root, "artifacts"),
                                                       os.path.join(self.root, "programs")))

    def hold(self, key: str, what: str) -> contextlib.AbstractContextManager[LockOutcome]:
        return self.locks.hold(key, what)

    # -- the remote store -------------------------------------------------------------
    def live_remote(self) -> object | None:
        """The remote store, unless there is none or it went unavailable (a fault already warned of)."""
        return self.remote if self.remote is not None and getattr(self.remote, "available", True) else None

    def fetch(self, names: list[str], entry_dir: str | None = None) -> bool:
        """Copy ``names`` from the remote store into the local dir: all of them or none. With
        ``entry_dir`` (a name prefix), they appear there together (one rename of a dir);
        otherwise one by one in the given order (the file that marks an entry last)."""
        remote = self.live_remote()
        if remote is None:
            return False
        blobs = []
        for name in names:
            data = remote.get(name)
            if data is None:
                return False
            blobs.append((name, data))
        return self.write(blobs, entry_dir)

    def write(self, blobs: list[tuple[str, bytes]], entry_dir: str | None = None) -> bool:
        """Write ``(name, data)`` files into the local dir (0600): with ``entry_dir`` (a name
        prefix holding them all) through one rename of a temporary dir, so the entry appears
        whole; otherwise one by one, each atomically, in the given order. False if it could not."""
        try:
            if entry_dir is None:
                for name, data in blobs:
                    atomic_write(self.local(name), data)
                return True
            final = self.local(entry_dir)

            def fill(tmp: str) -> None:
                for name, data in blobs:
                    atomic_write(os.path.join(tmp, os.path.relpath(name, entry_dir)), data)

            atomic_write_dir(final, fill)  # a concurrent writer got there first: keep theirs
            return os.path.isdir(final)
        except OSError as e:
            logger.warning("layerpass: could not write cache entries to %s (%s: %s)", self.root, type(e).__name__, e)
            return False

    def publish(self, names: list[str]) -> None:
        """Put the local files ``names`` into the remote store (best effort, in order)."""
        remote = self.live_remote()
        if remote is None:
            return
        for name in names:
            try:
                with open(self.local(name), "rb") as f:
                    data = f.read()
            except OSError:
                return
            if not remote.put(name, data):
                return

    def remote_names(self, prefix: str) -> list[str]:
        remote = self.live_remote()
        return [] if remote is None else list(remote.names(prefix))


def iter_files(root: str, prefix: str) -> Iterator[str]:
    """Cache-relative names of the files under ``root/prefix`` (sorted; temporaries skipped)."""
    base = os.path.join(root, *prefix.split("/"))
    for dirpath, dirs, files in os.walk(base):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".tmp"))
        for f in sorted(files):
            if not f.startswith(".tmp"):
                yield os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/")
