"""On-disk cache of compiled pieces (Inductor ``CompiledArtifact``s).

Layout: ``<cache_dir>/artifacts/<key[:2]>/<key>/{artifact.bin, meta.json}``; ``meta.json``
holds the artifact's sha256, so a truncated or corrupted entry is detected, logged,
removed and recompiled. Entries are written into a private temporary directory and
renamed into place, so concurrent writers never expose a half-written entry (the
first rename wins; the loser's identical entry is discarded).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger("layerpass")
FORMAT_VERSION = 1


def cache_key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _sha256(path: str) -> str:
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
    def __init__(self, root: str) -> None:
        self.root = os.path.join(root, "artifacts")

    def path(self, key: str) -> str:
        return os.path.join(self.root, key[:2], key)

    def load(self, key: str) -> CacheEntry | None:
        entry = self.path(key)
        if not os.path.isdir(entry):
            return None
        try:
            with open(os.path.join(entry, "meta.json")) as f:
                meta = json.load(f)
            art_path = os.path.join(entry, "artifact.bin")
            if meta.get("format") != FORMAT_VERSION:
                raise ValueError(f"format {meta.get('format')!r} != {FORMAT_VERSION}")
            if _sha256(art_path) != meta["sha256"]:
                raise ValueError("artifact checksum mismatch (truncated or corrupted)")
            artifact = torch._inductor.CompiledArtifact.load(path=art_path, format="binary")
        except Exception as e:
            logger.warning("layerpass: cache entry %s is unusable (%s: %s); removing it and recompiling", entry, type(e).__name__, e)
            shutil.rmtree(entry, ignore_errors=True)
            return None
        return CacheEntry(artifact, meta)

    def store(self, key: str, artifact: Any, meta: dict[str, Any]) -> bool:
        final = self.path(key)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".tmp-{key[:8]}-", dir=os.path.dirname(final))
        try:
            art_path = os.path.join(tmp, "artifact.bin")
            artifact.save(path=art_path, format="binary")
            meta = dict(meta, format=FORMAT_VERSION, sha256=_sha256(art_path))
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(meta, f, indent=2, default=str)
            try:
                os.rename(tmp, final)  # atomic; fails if another writer got there first
            except OSError:
                if self.load(key) is not None:
                    return False  # a concurrent writer stored an equal, valid entry
                shutil.rmtree(final, ignore_errors=True)  # a broken leftover: replace it
                os.rename(tmp, final)
            return True
        except Exception as e:
            logger.warning("layerpass: could not store cache entry %s: %s: %s", final, type(e).__name__, e)
            return False
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
