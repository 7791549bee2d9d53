"""``LayerpassPass``: the one base every graph pass derives from, and what its ``uuid()`` covers.

A pass's compiled output depends on more than its own module: the pattern module it
registers, the shared op handles, the pattern-pass base, helper modules. ``uuid()`` hashes
the source of every module the pass's classes live in and, transitively, every module those
import (``import m`` / ``from m import x``, resolved statically from the source, so what
happens to be imported at the time does not change the hash) that belongs to the pass's own
top-level package or to ``layerpass``. Editing any of them changes the uuid, which is part
of Inductor's cache key (``CustomGraphPass``) and of layerpass's (``PassManager.uuid()``).
The files are hashed as they are on disk when ``uuid()`` is called.
"""

from __future__ import annotations

import ast
import contextlib
import contextvars
import hashlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import fx

from layerpass.fingerprint import source_digest

ROOT_PACKAGE = "layerpass"

# source path -> (file stamp, the source's digest (layerpass.fingerprint), modules its import statements name)
_SOURCE_CACHE: dict[str, tuple[tuple[int, ...], str, tuple[str, ...]]] = {}


def _module_path(name: str) -> str | None:
    """The source file of module ``name``, found without importing anything: a loaded module's
    ``__file__``, else the file in its parent package's folder (or a top-level module's spec)."""
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None) if module is not None else None
    if path is None:
        parent, _, leaf = name.rpartition(".")
        if parent:
            parent_path = _module_path(parent)
            if parent_path is None or os.path.basename(parent_path) != "__init__.py":
                return None
            folder = os.path.dirname(parent_path)
            candidates = [os.path.join(folder, leaf + ".py"), os.path.join(folder, leaf, "__init__.py")]
            path = next((c for c in candidates if os.path.isfile(c)), None)
        else:
            try:
                spec = importlib.util.find_spec(name)
            except (ImportError, ValueError):
                return None
            path = spec.origin if spec is not None and spec.has_location else None
    return path if path and path.endswith(".py") else None


def _is_module(name: str) -> bool:
    return name in sys.modules or _module_path(name) is not None


def _imported_modules(tree: ast.AST, module_name: str, is_package: bool) -> set[str]:
    """Modules named by the import statements of a module's source (relative ones resolved)."""
    package = module_name if is_package else module_name.rpartition(".")[0]
    names: set[str] = set()
    for node in _statements(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                names.add(sub if alias.name != "*" and _is_module(sub) else base)
    return names


def _statements(tree: ast.AST) -> Iterator[ast.AST]:
    """Every statement of a module, nested ones included (an import is a statement: the expressions,
    most of a module's nodes, are skipped; a warm start hashes these modules, so it is 3x faster)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        todo.extend(child for child in ast.iter_child_nodes(node)
                    if isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)))


def _source_info(name: str) -> tuple[str, tuple[str, ...]] | None:
    """(digest of the module's source, modules it imports), cached per file version."""
    path = _module_path(name)
    if path is None:
        return None
    try:
        st = os.stat(path)
        stamp = (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)
        cached = _SOURCE_CACHE.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1], cached[2]
        with open(path, "rb") as f:
            source = f.read()
    except OSError:
        return None
    try:
        tree = ast.parse(source)
    except SyntaxError:
        imports: tuple[str, ...] = ()
    else:
        imports = tuple(sorted(_imported_modules(tree, name, os.path.basename(path) == "__init__.py")))
    digest = source_digest(source)
    _SOURCE_CACHE[path] = (stamp, digest, imports)
    return digest, imports


def module_closure(roots: list[str], packages: set[str]) -> dict[str, str]:
    """``{module name: source digest}`` for ``roots`` and every module they import, transitively,
    whose top-level package is in ``packages`` (modules without Python source are left out)."""
    seen: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen or name.partition(".")[0] not in packages:
            continue
        info = _source_info(name)
        if info is None:
            continue
        seen[name] = info[0]
        todo.extend(info[1])
    return seen



@dataclass
class PieceContext:
    """What the backend knows about the piece being compiled; every pass's ``prepare`` gets it."""

    piece: str = "piece"  # the split graph's name for it
    layer: int | None = None  # decoder-layer index, when the split knows it
    str_constants: list[tuple[str, str, Any]] = field(default_factory=list)  # (node, op target, value)
    real_inputs: list[Any] = field(default_factory=list)  # the real value behind each placeholder, or None


# The piece being compiled: per-call state in a ContextVar, not on the (shared) passes, so two
# compiles never see each other's piece
_CURRENT_PIECE: contextvars.ContextVar[PieceContext | None] = contextvars.ContextVar("layerpass_piece", default=None)


def current_piece() -> PieceContext:
    """The piece being compiled (an empty context outside ``compiling_piece``)."""
    return _CURRENT_PIECE.get() or PieceContext()


@contextlib.contextmanager
def compiling_piece(context: PieceContext) -> Iterator[PieceContext]:
    """``context`` is the current piece for the passes while the block runs."""
    token = _CURRENT_PIECE.set(context)
    try:
        yield context
    finally:
        _CURRENT_PIECE.reset(token)

class LayerpassPass:
    """A post-grad graph pass. Subclasses set ``name`` and implement ``apply(graph) -> matches``.

    ``registrations`` counts the patterns the pass registered (pattern passes set it);
    ``uuid()`` hashes the source of every module the pass depends on (``hashed_modules()``)
    and whatever ``config_key()`` returns, so editing a pass, its patterns or a helper they
    use invalidates Inductor's and layerpass's caches.
    """

    name: ClassVar[str] = "pass"

    def __init__(self) -> None:
        self.registrations = 0

    def apply(self, graph: fx.Graph) -> int:
        raise NotImplementedError

    def prepare(self, context: PieceContext) -> None:
        """Called before each piece's compile with what the backend knows about it."""

    def config_key(self) -> str:
        return ""

    def _source_modules(self) -> dict[str, str]:
        classes = [c for c in type(self).__mro__ if c is not object]
        packages = {ROOT_PACKAGE, type(self).__module__.partition(".")[0]}
        return module_closure([c.__module__ for c in classes], packages)

    def hashed_modules(self) -> list[str]:
        """The modules whose source ``uuid()`` covers."""
        return sorted(self._source_modules())

    def uuid(self) -> str:
        h = hashlib.sha256()
        for name, digest in sorted(self._source_modules().items()):
            h.update(f"{name}:{digest}\n".encode())
        for cls in type(self).__mro__:  # a class with no source file (defined in a REPL) counts by name
            h.update(cls.__qualname__.encode())
        h.update(self.config_key().encode())
        return h.hexdigest()
