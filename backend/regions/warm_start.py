"""Warm start: the traced region programs saved on disk, so a new process runs without Dynamo.

Layout: ``<cache_dir>/programs/<family>-<model_key>/<class_key>/<id>.bin`` (torch's saved function,
``torch.compiler.load_compiled_function`` reads it) and ``<id>.json`` beside it (the header). ``model_key`` covers what
can change a program: the source of every module class in the model, its config and structure
(parameter/buffer names, shapes, dtypes; Python attributes of every module, layer count
included), the layerpass and torch versions, the compilation config and the pass uuids, and the
layer-name switch. ``class_key`` names the layer class (its name and source). Each pair is one
region: the header (keys, the payload's checksum, what the trace ran through) and torch's
serialised ``AOTCompiledFunction``, whose guards (the input spec among them) decide which layers
it serves; the compiled pieces themselves live in the ``ArtifactCache`` and are loaded once per
distinct piece.

Both files are written to a temporary name and renamed, the header last (an entry exists once its
header does), so concurrent writers never expose a partial entry; two writers of the same region
leave two equal entries, and either serves. Processes sharing the cache dir trace a layer class
under one lock (``hold``): the others wait, then load what the first one saved. Entries are
read from the local dir, else from the remote store (``backend/cache/location.py``), and written to both. Anything that
does not fit (another key, a bad checksum, a torch without the API, a failed load) is one log
line saying why, and the layer is traced and compiled as on a cold start. Never a wrong result.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import inspect
import json
import logging
import os
import sys
import tempfile
import uuid
from typing import Any

import torch
from torch import nn

from layerpass import fingerprint, version
from layerpass.fingerprint import class_source, folders_digest

from . import aot
from ..cache.artifacts import file_sha256
from ..cache.location import CacheLocation
from ..cache.key_lock import LockOutcome
from ..cache.private_files import atomic_write, make_private, make_private_dirs
from .region import Region
from .signature import class_key, module_lines
from .trace_deps import TraceDeps

logger = logging.getLogger("layerpass")
FORMAT_VERSION = 3  # 3: header and torch's payload in two files; 2: the header records TraceDeps


_PROGRAM_PACKAGES = ("layerpass.backend", "layerpass.ops", "layerpass.passes", "layerpass.patterns")


@functools.cache
def program_source_hash() -> str:
    """The source of the layerpass packages that decide how a saved program is compiled, split,
    loaded and what its ops do, and of the fingerprints that check it (the layers and models are
    checked function by function instead: ``TraceDeps``), read once per process."""
    folders = [os.path.dirname(importlib.import_module(name).__file__ or "") for name in _PROGRAM_PACKAGES]
    return folders_digest(folders, [fingerprint.__file__ or ""])


def model_key_parts(model: nn.Module, key_parts: dict[str, Any]) -> dict[str, str]:
    """The parts of a model's program key, each hashed (so a mismatch can be named)."""
    code, structure = hashlib.sha256(), hashlib.sha256()
    for line in module_lines(model, values=True):
        structure.update(line.encode())
    classes = {f"{type(m).__module__}.{type(m).__qualname__}": type(m) for m in model.modules()}
    for name in sorted(classes):
        code.update(name.encode())
        code.update(class_source(classes[name]).encode())
    config = getattr(model, "config", None)
    return {
        **_config_parts(str(key_parts.get("config"))),
        "model code": code.hexdigest()[:24],
        "model config and structure": hashlib.sha256(f"{config!r}".encode() + structure.digest()).hexdigest()[:24],
        "layerpass version": str(version.__version__),
        "layerpass backend and ops source": program_source_hash(),
        "torch version": torch.__version__,
        "python version": sys.version.split()[0],
        "pass uuids": str(key_parts.get("passes"))[:24],
        "layer-name switch": str(key_parts.get("use_layername")),
        "format": str(FORMAT_VERSION),
    }


def _config_parts(fingerprint: str) -> dict[str, str]:
    """One key part per compilation-config field, so a miss can name the field that changed."""
    try:
        fields = json.loads(fingerprint)
    except ValueError:
        fields = None
    if not isinstance(fields, dict):
        return {"compilation config": hashlib.sha256(fingerprint.encode()).hexdigest()[:24]}
    parts = {}
    for name, value in sorted(fields.items()):
        text = json.dumps(value, sort_keys=True, default=str)
        parts[f"config.{name}"] = text if len(text) <= 64 else hashlib.sha256(text.encode()).hexdigest()[:24]
    return parts


class ProgramStore:
    """Saved region programs of one model (see the module docstring)."""

    def __init__(self, location: CacheLocation, model: nn.Module, key_parts: dict[str, Any]) -> None:
        self.location = location
        self.cache_dir = location.root
        self.parts = model_key_parts(model, key_parts)
        self.model_key = hashlib.sha256(json.dumps(self.parts, sort_keys=True).encode()).hexdigest()[:32]
        self.family = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}".encode()).hexdigest()[:16]
        self.root = os.path.join(self.cache_dir, "programs")
        self.name = f"programs/{self.family}-{self.model_key}"  # cache-relative
        self.dir = os.path.join(self.root, f"{self.family}-{self.model_key}")
        self.status = "off"  # what the report says: "loaded", "saved", "fallback: <why>"
        self._warned_write = False
        self._seen: set[str] = set()  # header paths already loaded (or refused) by this store

    def hold(self, cls: type) -> contextlib.AbstractContextManager[LockOutcome]:
        """The lock a process holds while it traces a region of ``cls`` for this model."""
        return self.location.hold(f"program-{self.model_key}-{class_key(cls)}", f"tracing {cls.__qualname__}")

    # -- load ---------------------------------------------------------------------------
    def load(self, cls: type, waited: bool = False) -> list[Region]:
        """Every usable saved region of layer class ``cls`` not loaded before (local dir, else
        the remote store); logs once why there are none. ``waited``: after waiting for another
        process that traced and saved them (its "no saved program yet" is then no fallback)."""
        if not self.location.trusted():
            self._fallback(f"the cache dir {self.cache_dir} is not trusted (see the warning)")
            return []
        folder = os.path.join(self.dir, class_key(cls))
        self._fetch_remote(cls)  # what the remote store has and this dir lacks (another rank may be fetching too)
        names = sorted(n for n in _listdir(folder) if n.endswith(".json"))
        if not names:
            self._fallback(self._why_missing())
            return []
        regions = []
        for name in names:
            header_path = os.path.join(folder, name)
            if header_path in self._seen:
                continue
            self._seen.add(header_path)
            try:
                header, payload_path = self._read(header_path, cls)
                deps = TraceDeps.from_json(header["deps"])
                stale = deps.stale_reason(cls.forward)
                if stale is not None:
                    self._remove(header_path, f"stale: {stale}")
                    continue
                fn, program = _load(payload_path, cls)
                regions.append(Region(fn.fn, fn, program, cls, header["signature"], deps, "loaded", header_path))
            except Exception as e:  # a bad entry is never fatal: trace and compile instead
                self._remove(header_path, f"{type(e).__name__}: {e}")
        if regions and waited and self.status.startswith("fallback: no saved program"):
            self.status = "loaded (after waiting for another process to trace it)"
        elif regions and not self.status.startswith("fallback"):
            self.status = "loaded"
        return regions

    def _fetch_remote(self, cls: type) -> bool:
        """Copy this class's saved regions (and the model's key parts) from the remote store."""
        prefix = f"{self.name}/{class_key(cls)}/"
        headers = [n for n in self.location.remote_names(prefix) if n.endswith(".json")]
        got = False
        for header in sorted(headers):
            if os.path.exists(self.location.local(header)):
                continue
            got |= self.location.fetch([_payload_path(header), header])  # the header last: it marks the entry
        if got and not os.path.exists(os.path.join(self.dir, "parts.json")):
            self.location.fetch([f"{self.name}/parts.json"])
        return got

    def drop(self, region: Region, why: str) -> None:
        """A saved region whose pieces could not be loaded: log, remove its files, compile instead."""
        if region.path is not None:
            self._remove(region.path, why)

    def _remove(self, header_path: str, why: str) -> None:
        removed = "removed"
        for path in (_payload_path(header_path), header_path):
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            except OSError:
                removed = "left in place (cannot remove it)"
        self._fallback(f"saved program {header_path} is unusable ({why}); {removed}")

    def _read(self, header_path: str, cls: type) -> tuple[dict[str, Any], str]:
        with open(header_path, "rb") as f:
            header = json.loads(f.read())
        if header.get("format") != FORMAT_VERSION or header.get("model_key") != self.model_key:
            raise ValueError("it belongs to another model key")
        if header.get("class_key") != class_key(cls):
            raise ValueError("it belongs to another layer class")
        payload_path = _payload_path(header_path)
        if file_sha256(payload_path) != header.get("sha256"):
            raise ValueError("checksum mismatch (truncated or corrupted)")
        return header, payload_path

    def _why_missing(self) -> str:
        """Name the key parts that differ from the nearest saved entry of this model's class
        (the fewest parts changed), if there is one (local dir, else the remote store)."""
        prefix = f"{self.family}-"
        olds = []
        for name in _listdir(self.root):
            if name.startswith(prefix) and name != os.path.basename(self.dir):
                with contextlib.suppress(OSError, ValueError):
                    with open(os.path.join(self.root, name, "parts.json")) as f:
                        olds.append(json.load(f))
        if not olds:
            for name in self.location.remote_names(f"programs/{prefix}"):
                remote = self.location.live_remote()
                data = remote.get(name) if remote is not None and name.endswith("/parts.json") else None  # type: ignore[attr-defined]
                with contextlib.suppress(ValueError):
                    olds.append(json.loads(data or b"null"))
        changed = [[k for k, v in self.parts.items() if old.get(k) != v] for old in olds if isinstance(old, dict)]
        changed = [c for c in changed if c]
        if changed:
            return (f"no saved program for this model: changed since the nearest save: "
                    f"{', '.join(min(changed, key=len))}")
        return "no saved program for this model yet (first run with this cache dir)"

    def _fallback(self, why: str) -> None:
        logger.info("layerpass: warm start: %s; tracing and compiling", why)
        if not self.status.startswith("fallback"):
            self.status = f"fallback: {why}"

    # -- save ---------------------------------------------------------------------------
    def save(self, region: Region) -> None:
        """Best effort: a region that cannot be saved is logged once, never fatal."""
        folder = os.path.join(self.dir, class_key(region.cls))
        if region.unsaved is not None:
            self._not_saved(region.unsaved)
            return
        stem = os.path.join(folder, uuid.uuid4().hex)
        try:
            make_private_dirs(folder)
            aot.save(region.aot, _payload_path(stem), _forward_chain(region.cls))
            make_private(_payload_path(stem))  # torch's save follows the umask
            # never keep what cannot be loaded (torch 2.13 could not restore the guards of some
            # frames): a failed round trip is reported, nothing stays
            _load(_payload_path(stem), region.cls)
            header = {"format": FORMAT_VERSION, "model_key": self.model_key, "class_key": class_key(region.cls),
                      "signature": region.signature, "sha256": file_sha256(_payload_path(stem)),
                      "deps": region.deps.to_json(), "torch": torch.__version__,
                      "pieces": sorted({c.key for c in region.program.pieces.values()})}
            parts_path = os.path.join(self.dir, "parts.json")
            if not os.path.exists(parts_path):
                atomic_write(parts_path, json.dumps(self.parts, indent=1).encode())
            atomic_write(f"{stem}.json", json.dumps(header).encode())
            self._seen.add(f"{stem}.json")
            rel = f"{self.name}/{class_key(region.cls)}/{os.path.basename(stem)}"
            self.location.publish([f"{self.name}/parts.json", f"{rel}.bin", f"{rel}.json"])
            if self.status == "off":
                self.status = "saved"
        except Exception as e:  # best effort: the region runs; only the next process traces again
            with contextlib.suppress(OSError):
                os.remove(_payload_path(stem))
            self._not_saved(f"{type(region.aot).__name__} of {region.cls.__qualname__} cannot be saved "
                            f"({type(e).__name__}: {e})")

    def _not_saved(self, why: str) -> None:
        self.status = f"off: {why}"
        if not self._warned_write:
            self._warned_write = True
            logger.warning("layerpass: warm start: %s; the next process will trace again", why)


def _load(payload_path: str, cls: type) -> tuple[Any, Any]:
    """A saved region of layer class ``cls``: torch's loaded function and its program."""
    return aot.load(payload_path, inspect.unwrap(cls.forward).__globals__, _forward_chain(cls))


def _payload_path(header_path: str) -> str:
    return f"{os.path.splitext(header_path)[0]}.bin"


def _forward_chain(cls: type) -> dict[str, Any]:
    """``cls.forward`` and the functions it wraps (decorated forwards, as in transformers): saved
    by reference, since pickle cannot name a wrapped function, and supplied again on load."""
    chain, fn = {}, cls.forward
    for i in range(8):
        chain[f"forward{i}"] = fn
        fn = getattr(fn, "__wrapped__", None)
        if fn is None:
            break
    return chain


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _mtime(path: str) -> float:
    try:
        return os.path.getmtime(path)
    except OSError:
        return 0.0
