"""The cache dir is code: only its owner may write it, and layerpass writes it private.

What ``ssh`` asks of ``~/.ssh``, asked of a cache dir before anything is loaded from it: owned by
this user (or root) and writable by no one else (no group or world write bit). A loaded artifact
or saved program is run, so a dir that another user could write is never loaded from: one
warning naming the fix, then the compile goes on without that cache. Everything layerpass writes
there is ``0600`` (files) and ``0700`` (dirs), whatever the umask.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from typing import BinaryIO

logger = logging.getLogger("layerpass")
FILE_MODE = 0o600
DIR_MODE = 0o700
_untrusted_warned: set[str] = set()


def untrusted_reason(path: str) -> str | None:
    """Why ``path`` (a dir or file in a cache) must not be loaded from, or ``None`` if it may."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None  # nothing there to load
    except OSError as e:
        return f"cannot stat it ({type(e).__name__}: {e})"
    me = os.geteuid()
    if st.st_uid not in (me, 0):
        return (f"it is owned by uid {st.st_uid}, not by this user (uid {me}) or root; fix: "
                f"chown -R {me} {path}, or use a cache dir of your own")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (f"it is writable by {'others' if st.st_mode & stat.S_IWOTH else 'its group'} "
                f"(mode {stat.S_IMODE(st.st_mode):o}); fix: chmod -R go-w {path}")
    return None


def trusted(path: str, what: str) -> bool:
    """``untrusted_reason`` with its one warning per path per process."""
    why = untrusted_reason(path)
    if why is None:
        return True
    if path not in _untrusted_warned:
        _untrusted_warned.add(path)
        logger.warning("layerpass: not loading the %s at %s: %s (a cached program is code, run on load); "
                       "compiling without it", what, path, why)
    return False


def make_private_dirs(path: str) -> None:
    """``os.makedirs`` with mode 0700 for what it creates (the umask cannot widen it)."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent and parent != path:
        make_private_dirs(parent)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, DIR_MODE)
        os.chmod(path, DIR_MODE)


def make_private(path: str) -> None:
    """Files 0600 and dirs 0700, recursively (what another writer, e.g. torch, created)."""
    os.chmod(path, DIR_MODE if os.path.isdir(path) else FILE_MODE)
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), DIR_MODE)
            for f in files:
                os.chmod(os.path.join(root, f), FILE_MODE)


def atomic_write(path: str, data: bytes | Callable[[BinaryIO], None]) -> None:
    """Write ``data`` to ``path`` (0600) through a temporary file and a rename: a reader sees the
    old file or the new one, never part of one. ``data`` is the bytes, or a function that writes
    them into the open file (a tar stream, too large to hold in memory). The one atomic file
    writer of layerpass (``atomic_write_dir`` is its twin for a directory): the cache, the warm
    start, the ISA answer, pass statistics, bundles and bench results go through it."""
    make_private_dirs(os.path.dirname(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))  # mkstemp: 0600
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_write_dir(path: str, fill: Callable[[str], None],
                     keep_existing: Callable[[str], bool] = lambda _path: True) -> bool:
    """Make the directory ``path`` (0700, its files 0600) appear whole: ``fill(tmp)`` writes the
    files into a private temporary dir beside it, which is then renamed to ``path`` in one step,
    so a reader sees no entry or a complete one. If another writer got there first (the rename
    finds ``path`` there), ``keep_existing(path)`` decides: True keeps theirs and returns False;
    False (theirs is broken) replaces it. True when this call's dir is now at ``path``. The one
    atomic directory writer: artifact cache entries and remote entries fetched into the local dir."""
    make_private_dirs(os.path.dirname(path))
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(path))  # mkdtemp: 0700
    try:
        fill(tmp)
        make_private(tmp)  # what fill wrote follows the umask (torch's save does)
        try:
            os.rename(tmp, path)  # atomic; fails if a non-empty ``path`` is already there
        except OSError:
            if not os.path.isdir(path):
                raise
            if keep_existing(path):
                return False
            shutil.rmtree(path, ignore_errors=True)
            os.rename(tmp, path)
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
