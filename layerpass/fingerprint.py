"""Fingerprints of code, values and source: the one answer to "is this the same as before?".

Every key layerpass computes over code goes through here: the piece hash (a user function called
in a graph), the trace deps (the code a saved program ran through, the objects its dropped guards
matched), the structure signature and the warm-start key (class and package source), and the pass
uuids (module source). Each is the same in every process: nothing depends on ``id()``, file
paths or the per-process ``str`` hash seed (a set literal ``x in {"a", "b"}`` is a frozenset
constant whose iteration order follows that seed, so sets are sorted).

It lives in the ``layerpass`` core package, beside ``envs`` and ``torch_compat``, because
``passes/`` needs it as much as ``backend/`` does, and ``passes/`` must not import ``backend/``
(the folders depend backend -> passes -> patterns -> ops, never back; every folder may import
the core).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import types
from collections.abc import Iterable
from typing import Any

import torch

DIGEST_CHARS = 32  # hex characters of a code fingerprint


def source_digest(source: bytes | str) -> str:
    """The digest of a piece of source text (full sha256 hex)."""
    return hashlib.sha256(source.encode() if isinstance(source, str) else source).hexdigest()


# -- code ------------------------------------------------------------------------------------------
def stable_repr(const: Any) -> str:
    """A code constant's repr, the same in every process: frozensets (set literals) sorted, tuples
    element by element, nested code by its fingerprint; everything else a code object can hold
    (numbers, strings, bytes, ``None``, ``...``) has a deterministic ``repr``."""
    if isinstance(const, types.CodeType):
        return f"code:{code_fingerprint(const)}"
    if isinstance(const, (frozenset, set)):
        return f"{type(const).__name__}({sorted(stable_repr(x) for x in const)!r})"
    if isinstance(const, tuple):
        return "(" + ",".join(stable_repr(x) for x in const) + ")"
    return f"{type(const).__name__}:{const!r}"


_CODE_FIELDS = ("co_qualname", "co_name", "co_names", "co_varnames", "co_freevars", "co_cellvars",
                "co_argcount", "co_posonlyargcount", "co_kwonlyargcount", "co_flags")


def code_fingerprint(code: types.CodeType) -> str:
    """The bytecode and everything it names: qualified name, names, variables, argument counts,
    flags, the exception table, the constants (nested code included, by its own fingerprint). Not
    the file or line numbers: a moved function matches, an edited one never does."""
    h = hashlib.sha256()
    h.update(code.co_code)
    h.update(getattr(code, "co_exceptiontable", b""))
    h.update(repr(tuple(getattr(code, f, None) for f in _CODE_FIELDS)).encode())
    h.update(stable_repr(code.co_consts).encode())
    return h.hexdigest()[:DIGEST_CHARS]


# -- values ----------------------------------------------------------------------------------------
def value_fingerprint(value: Any, _seen: frozenset[int] = frozenset()) -> str:
    """What an object is, in a form stable across processes: plain values by value (sets and dict
    keys sorted), functions by name, code and closure (a function whose closure holds itself, as
    transformers' checkpointing wrapper does, is named once), classes and modules by name, any
    other object by its type."""
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return f"{type(value).__name__}:{value!r}"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__}({','.join(value_fingerprint(v, _seen) for v in value)})"
    if isinstance(value, (set, frozenset)):
        return f"{type(value).__name__}({','.join(sorted(value_fingerprint(v, _seen) for v in value))})"
    if isinstance(value, dict):
        items = sorted((value_fingerprint(k, _seen), value_fingerprint(v, _seen)) for k, v in value.items())
        return f"dict({','.join(f'{k}:{v}' for k, v in items)})"
    if isinstance(value, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return f"{type(value).__name__}:{value}"
    if isinstance(value, types.ModuleType):
        return f"module:{value.__name__}"
    if isinstance(value, types.MethodType):
        return f"method:{value_fingerprint(value.__func__, _seen)}"
    if isinstance(value, types.FunctionType):
        fn = value
        parts = [f"function:{fn.__module__}.{fn.__qualname__}:{code_fingerprint(fn.__code__)}"]
        if id(fn) in _seen:
            return parts[0] + ":<cycle>"
        for cell in fn.__closure__ or ():
            with contextlib.suppress(ValueError):  # an empty cell
                parts.append(value_fingerprint(cell.cell_contents, _seen | {id(fn)}))
        return "|".join(parts)
    if isinstance(value, type):
        return f"class:{value.__module__}.{value.__qualname__}"
    name = getattr(value, "__qualname__", None) or getattr(value, "__name__", None)
    if callable(value) and isinstance(name, str):  # builtins, op packets
        return f"callable:{getattr(value, '__module__', None)}.{name}:{type(value).__qualname__}"
    if isinstance(value, torch._ops.OpOverloadPacket | torch._ops.OpOverload):
        return f"op:{value}"
    return f"object:{type(value).__module__}.{type(value).__qualname__}"


# -- source ----------------------------------------------------------------------------------------
def class_source(cls: type) -> str:
    """``cls``'s source, or its qualified name when the source cannot be read."""
    with contextlib.suppress(OSError, TypeError):
        return inspect.getsource(cls)
    return f"{cls.__module__}.{cls.__qualname__}"


_FILE_DIGESTS: dict[str, tuple[tuple[int, ...], str]] = {}  # path -> (file stamp, digest)


def file_digest(path: str) -> str | None:
    """``source_digest`` of the file at ``path`` as it is on disk now (cached per file version:
    mtime, ctime, size, inode), or None if it cannot be read."""
    try:
        st = os.stat(path)
        stamp = (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)
        cached = _FILE_DIGESTS.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        with open(path, "rb") as f:
            digest = source_digest(f.read())
    except OSError:
        return None
    _FILE_DIGESTS[path] = (stamp, digest)
    return digest


def folders_digest(folders: Iterable[str], files: Iterable[str] = ()) -> str:
    """One digest of every ``.py`` file under ``folders`` and of ``files``: each by its path
    relative to its folder (its name, for a file) and its content, in a fixed order."""
    h = hashlib.sha256()
    for folder in folders:
        for root, dirs, names in os.walk(folder):
            dirs.sort()
            for name in sorted(names):
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    h.update(f"{os.path.relpath(path, folder)}\n{file_digest(path)}\n".encode())
    for path in files:
        h.update(f"{os.path.basename(path)}\n{file_digest(path)}\n".encode())
    return h.hexdigest()[:24]
