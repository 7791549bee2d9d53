"""On-disk cache of compiled pieces (Inductor ``CompiledArtifact``s).

Layout: ``<cache_dir>/artifacts/<key[:2]>/<key>/{artifact.bin, meta.json}`` (0700 dirs, 0600 files);
``meta.json``
holds the key the entry belongs to and the artifact's sha256, so a truncated, corrupted or
misplaced (moved, swapped) entry is detected, logged, removed and recompiled. Entries are
written into a private temporary directory and renamed into place, so concurrent writers never
expose a half-written entry (the first rename wins; the loser's identical entry is discarded).

The cache is best-effort: a cache that cannot be written (read-only, a file, a path under
/proc, a full disk) is warned about once per cache directory and the compile goes on without
storing; an unusable entry is recompiled (and removed when it can be). A cache dir another user
can write is not loaded from (``private_files.py``). With a remote store (``backend/cache/location.py``),
a local miss is looked up there and a hit written here; a stored entry is put there too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Any

import torch

from .location import CacheLocation
from .private_files import atomic_write_dir

logger = logging.getLogger("layerpass")
FORMAT_VERSION = 2  # 2: meta.json records its key
_unwritable_warned: set[str] = set()  # cache roots already warned about (once per process)


def cache_key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class CacheEntry:
    artifact: Any  # a callable CompiledArtifact
    meta: dict[str, Any]


class ArtifactCache:
    def __init__(self, location: CacheLocation | str) -> None:
        self.location = location if isinstance(location, CacheLocation) else CacheLocation(location)
        self.root = os.path.join(self.location.root, "artifacts")
        self.writable = True

    def path(self, key: str) -> str:
        return os.path.join(self.root, key[:2], key)

    @staticmethod
    def entry_name(key: str) -> str:
        return f"artifacts/{key[:2]}/{key}"

    @classmethod
    def entry_files(cls, key: str) -> list[str]:
        """The entry's cache-relative file names, the one that marks it complete last."""
        return [f"{cls.entry_name(key)}/artifact.bin", f"{cls.entry_name(key)}/meta.json"]

    def load(self, key: str) -> CacheEntry | None:
        """The entry from the local dir, else from the remote store (``meta["source"]``: "cache" or "remote")."""
        if not self.location.trusted():
            return None
        entry, source = self.path(key), "cache"
        if not os.path.isdir(entry):
            if not self.location.fetch(self.entry_files(key), entry_dir=self.entry_name(key)):
                return None
            source = "remote"
        try:
            with open(os.path.join(entry, "meta.json")) as f:
                meta = json.load(f)
            if not isinstance(meta, dict):
                raise ValueError(f"meta.json holds a {type(meta).__name__}, not an object")
            art_path = os.path.join(entry, "artifact.bin")
            if meta.get("format") != FORMAT_VERSION:
                raise ValueError(f"format {meta.get('format')!r} != {FORMAT_VERSION}")
            if meta.get("key") != key:
                raise ValueError(f"the entry belongs to key {meta.get('key')!r} (moved or swapped)")
            if file_sha256(art_path) != meta["sha256"]:
                raise ValueError("artifact checksum mismatch (truncated or corrupted)")
            artifact = torch._inductor.CompiledArtifact.load(path=art_path, format="binary")
        except Exception as e:
            shutil.rmtree(entry, ignore_errors=True)
            if os.path.exists(entry):  # e.g. a read-only cache dir
                logger.warning("layerpass: cache entry %s is unusable (%s: %s); recompiling (could not remove it)",
                               entry, type(e).__name__, e)
            else:
                logger.warning("layerpass: cache entry %s is unusable (%s: %s); removed it, recompiling",
                               entry, type(e).__name__, e)
            return None
        return CacheEntry(artifact, dict(meta, source=source))

    def _cannot_write(self, error: OSError) -> None:
        """Warn once per cache directory per process; the compile goes on without storing."""
        self.writable = False
        if self.root in _unwritable_warned:
            return
        _unwritable_warned.add(self.root)
        logger.warning("layerpass: cannot write the artifact cache at %s (%s: %s); compiling without storing to it "
                       "(set CompilationConfig.cache_dir / $LAYERPASS_CACHE_DIR to a writable directory, or "
                       "disable_cache=True)", self.root, type(error).__name__, error)

    def store(self, key: str, artifact: Any, meta: dict[str, Any]) -> bool:
        """Write the entry; ``False`` (never an exception) when it was not stored."""
        if not self.writable or self.root in _unwritable_warned or not self.location.trusted():
            return False
        final = self.path(key)

        def fill(tmp: str) -> None:
            art_path = os.path.join(tmp, "artifact.bin")
            artifact.save(path=art_path, format="binary")
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(dict(meta, key=key, format=FORMAT_VERSION, sha256=file_sha256(art_path)), f, indent=2,
                          default=str)

        try:
            # a concurrent writer's valid entry is kept (it is equal); a broken leftover is replaced
            if not atomic_write_dir(final, fill, keep_existing=lambda _path: self.load(key) is not None):
                return False
            self.location.publish(self.entry_files(key))
            return True
        except OSError as e:  # the location cannot be written: stop trying
            self._cannot_write(e)
            return False
        except Exception as e:  # this artifact could not be saved: the next one may be
            logger.warning("layerpass: could not store cache entry %s: %s: %s", final, type(e).__name__, e)
            return False
