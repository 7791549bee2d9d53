"""A model's compile in one file, to carry to another machine: ``layerpass cache export/import``.

A bundle is a tar of cache entries at their cache-relative names (the model's saved region
programs, its key parts, and every compiled piece those programs call), each member's bytes
sealed with the cache secret exactly as a remote-store value is (``remote_store.seal``: magic,
length, HMAC-SHA256 over the name and the data). Importing unseals every member against its name
before anything is written, so a bundle that was altered, truncated, renamed or made with another
secret is refused member by member, with a warning, and never reaches the cache dir. Only regular
files under ``artifacts/`` and ``programs/`` with plain relative names are taken.
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import tarfile
from dataclasses import dataclass, field
from typing import BinaryIO

from .artifacts import ArtifactCache
from .location import CacheLocation, iter_files
from .private_files import atomic_write
from .remote_store import EntryRefused, seal, unseal
from ..regions.warm_start import ProgramStore

logger = logging.getLogger("layerpass")
_TOP_DIRS = ("artifacts", "programs")
_MAX_MEMBER_BYTES = 4 << 30


class BundleError(ValueError):
    """A bundle that cannot be written or read at all (named with why)."""


@dataclass
class BundleReport:
    files: int = 0
    bytes: int = 0
    refused: list[str] = field(default_factory=list)  # "name: why"


def _require_secret(secret: bytes | None, what: str) -> bytes:
    if not secret:
        raise BundleError(f"{what} needs the cache secret: set LAYERPASS_CACHE_SECRET (the same value on every "
                          f"machine that shares compiles); bundle entries are code and are sealed with it")
    return secret


def bundle_names(store: ProgramStore) -> list[str]:
    """The cache-relative files of ``store``'s model: its programs, then the pieces they call."""
    root = store.location.root
    programs = list(iter_files(root, store.name))
    if not any(n.endswith(".json") and not n.endswith("/parts.json") for n in programs):
        raise BundleError(f"no saved program for this model in {root} (run `layerpass precompile` with the same "
                          f"model, layers and config first)")
    pieces: set[str] = set()
    for name in programs:
        if name.endswith(".json") and not name.endswith("/parts.json"):
            with open(store.location.local(name)) as f:
                pieces.update(json.load(f).get("pieces", []))
    artifacts = []
    for key in sorted(pieces):
        files = ArtifactCache.entry_files(key)
        missing = [n for n in files if not os.path.isfile(store.location.local(n))]
        if missing:
            raise BundleError(f"compiled piece {key[:12]} of a saved program is not in {root} ({missing[0]}); "
                              f"run `layerpass precompile` again to fill the cache")
        artifacts += files
    return artifacts + programs  # pieces first: a program is only useful once its pieces are there


def all_names(location: CacheLocation) -> list[str]:
    """Every complete entry of the cache at ``location``: pieces first, then programs (a
    tensor-parallel model's programs are keyed by its shard shapes: export them all)."""
    artifacts = [n for n in iter_files(location.root, "artifacts")
                 if os.path.isfile(location.local(f"{posixpath.dirname(n)}/meta.json"))]
    programs = list(iter_files(location.root, "programs"))
    if not any(n.endswith(".json") and not n.endswith("/parts.json") for n in programs):
        raise BundleError(f"no saved program in {location.root} (run `layerpass precompile` first)")
    return artifacts + programs


def export_bundle(location: CacheLocation, names: list[str], path: str, secret: bytes | None) -> BundleReport:
    """Write the cache files ``names`` (``bundle_names`` of one model, or ``all_names``) to the
    tar ``path``, each member sealed."""
    secret = _require_secret(secret, "cache export")
    report = BundleReport()

    def write_tar(f: BinaryIO) -> None:
        with tarfile.open(fileobj=f, mode="w") as tar:
            for name in names:
                with open(location.local(name), "rb") as member:
                    sealed = seal(secret, name, member.read())
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(sealed), 0o600
                tar.addfile(info, io.BytesIO(sealed))
                report.files += 1
                report.bytes += len(sealed)

    atomic_write(path, write_tar)
    return report


def _checked_name(member: tarfile.TarInfo) -> str | None:
    """Why a member is not a plain cache file (a link, an absolute or ``..`` path, another dir)."""
    name = member.name
    if not member.isfile():
        return "not a regular file"
    if name.startswith("/") or posixpath.normpath(name) != name or ".." in name.split("/"):
        return "not a plain relative path"
    if name.split("/")[0] not in _TOP_DIRS or name.count("/") < 2:
        return f"not under {' or '.join(_TOP_DIRS)}/"
    if member.size > _MAX_MEMBER_BYTES:
        return f"larger than {_MAX_MEMBER_BYTES} bytes"
    return None


def import_bundle(path: str, location: CacheLocation, secret: bytes | None) -> BundleReport:
    """Unseal every member of the bundle at ``path`` and write the good ones into ``location``
    (pieces as whole entries, a program's header after its payload). Refused members are
    warned about and listed; nothing of theirs is written."""
    secret = _require_secret(secret, "cache import")
    report = BundleReport()
    try:
        tar = tarfile.open(path, "r:")
    except (OSError, tarfile.TarError) as e:
        raise BundleError(f"{path} is not a layerpass bundle (a tar file): {type(e).__name__}: {e}") from None
    good: dict[str, bytes] = {}
    with tar:
        for member in tar:
            why = _checked_name(member)
            if why is None:
                try:
                    good[member.name] = unseal(secret, member.name, tar.extractfile(member).read())  # type: ignore[union-attr]
                    continue
                except EntryRefused as e:
                    why = str(e)
            report.refused.append(f"{member.name}: {why}")
            logger.warning("layerpass: bundle %s: refused %s (%s); not imported", path, member.name, why)
    entries: dict[str, list[tuple[str, bytes]]] = {}
    for name, data in good.items():
        top = name.split("/")[0]
        entry = posixpath.dirname(name) if top == "artifacts" else name  # a piece is its dir; a program file is itself
        entries.setdefault(entry, []).append((name, data))
    for entry, blobs in sorted(entries.items(), key=lambda kv: (kv[0].startswith("programs"), kv[0].endswith(".json"))):
        if entry.startswith("artifacts/"):
            if {posixpath.basename(n) for n, _ in blobs} != {"artifact.bin", "meta.json"}:
                report.refused.append(f"{entry}: incomplete piece entry")
                continue
            written = os.path.isdir(location.local(entry)) or location.write(blobs, entry_dir=entry)
        else:
            written = location.write(blobs)
        if written:
            report.files += len(blobs)
            report.bytes += sum(len(d) for _, d in blobs)
    return report
