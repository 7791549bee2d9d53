"""Every place layerpass replaces a torch internal, under one discipline (torch 2.13).

Each patch replaces one attribute of a torch class while at least one caller is inside its
block, and puts torch's own back when the last caller leaves: one lock and a depth counter per
patch, so blocks nest and overlap across threads. The patched code runs for every thread while
any block is open, so each replacement is written to be right for callers that did not ask for
it (it only adds to what torch does).

The patches, and the torch behaviour each one works around:

- ``saveable_guards``: ``torch._dynamo.guards.GuardsStatePickler.reducer_override``. torch's
  guard-state pickler saves values no guard reads as ``_Missing`` by ``id()`` (a dtype held by a
  module attribute turns every later tensor's dtype into ``_Missing``), saves ``functools.wraps``
  wrappers and instance-bound methods as ``_Missing`` or the wrong function, and pickles tensors
  with their ``.grad``: programs that save fine then fail to load. The replacement (the reducer
  in ``backend/regions/guard_pickling.py``, which documents each gap) saves what the guards need.
- ``recording_traced_code``: ``torch._dynamo.package.SourceInfo.add_code``. ``aot_compile`` hands
  each code object it inlined to ``add_code`` and keeps only a checksum of its source lines,
  silently skipping code with no module; nothing in a saved program can tell later whether a
  helper changed, so layerpass must see the code objects themselves (``backend/regions/trace_deps.py``
  fingerprints them). The replacement calls torch's and also hands each code object to the
  recordings open in the calling thread (``aot_compile`` calls ``add_code`` in the thread that
  traces): two models tracing in two threads each record their own code, never the other's, and
  neither loses the hook when the other finishes.

A torch without the patched attribute makes the block a no-op (``TorchPatch.target`` returns
None); the caller then gets torch's behaviour.

One torch internal is used rather than patched, and lives here too:

- ``dynamo_compile_lock``: ``torch._dynamo.convert_frame.compile_lock``. Dynamo and the FX tracing
  under it are not thread-safe (two threads tracing at once fail in torch: ``CURRENT_PATCHER is
  None in finally block``, a module global of ``torch.fx._symbolic_trace``). torch's own
  ``torch.compile`` path holds this re-entrant lock for each frame it compiles, backend
  included; ``aot_compile`` does not, so layerpass holds it around each ``aot_compile``: two
  models making their first calls in two threads trace one after the other, and a whole-model
  ``torch.compile`` in a third thread waits as well.
"""

from __future__ import annotations

import contextlib
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

from .guard_pickling import patched_reducer, pickler_class

_MISSING = object()


class TorchPatch:
    """One torch attribute replaced while a block is open (see the module docstring)."""

    def __init__(self, name: str, target: Callable[[], type | None], attr: str,
                 replace: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        self.name = name
        self.target = target  # the class to patch on this torch, or None (then the block does nothing)
        self.attr = attr
        self.replace = replace  # torch's function -> the one installed
        self._lock = threading.Lock()
        self._depth = 0
        self._owner: type | None = None
        self._original: Any = _MISSING  # the class's own attribute (_MISSING: inherited)

    @property
    def depth(self) -> int:
        """How many blocks are open (all threads)."""
        return self._depth

    @contextlib.contextmanager
    def active(self) -> Iterator[bool]:
        """The patch is installed for the block; yields whether this torch has it."""
        with self._lock:
            if self._depth == 0:
                owner = self.target()
                if owner is None:
                    self._owner = None
                else:
                    self._owner, self._original = owner, owner.__dict__.get(self.attr, _MISSING)
                    setattr(owner, self.attr, self.replace(getattr(owner, self.attr)))
            self._depth += 1
            installed = self._owner is not None
        try:
            yield installed
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0 and self._owner is not None:
                    if self._original is _MISSING:
                        delattr(self._owner, self.attr)  # inherited: drop the override
                    else:
                        setattr(self._owner, self.attr, self._original)
                    self._owner, self._original = None, _MISSING


# -- the guard-state pickler ---------------------------------------------------------------------
GUARD_PICKLER = TorchPatch("saveable guards", pickler_class, "reducer_override", patched_reducer)


@contextlib.contextmanager
def saveable_guards() -> Iterator[None]:
    """Within the block, torch's guard-state pickler saves what the guards need to be rebuilt on
    load (``backend/regions/guard_pickling.py``). Wrap the ``aot_compile`` call with it."""
    with GUARD_PICKLER.active():
        yield


# -- the traced code list -----------------------------------------------------------------------
_recordings = threading.local()  # .lists: the open recordings of this thread, outermost first


def _source_info_class() -> type | None:
    try:
        from torch._dynamo.package import SourceInfo
    except ImportError:
        return None
    return SourceInfo if callable(getattr(SourceInfo, "add_code", None)) else None


def _recording_add_code(original: Callable[..., Any]) -> Callable[..., Any]:
    def add_code(self: Any, code: types.CodeType) -> None:
        for codes in getattr(_recordings, "lists", ()):
            codes.append(code)
        original(self, code)

    add_code.__layerpass_patch__ = True  # type: ignore[attr-defined]
    return add_code


TRACED_CODE = TorchPatch("traced code", _source_info_class, "add_code", _recording_add_code)


@contextlib.contextmanager
def recording_traced_code() -> Iterator[list[types.CodeType]]:
    """Every code object ``aot_compile`` records as inlined in this thread while the block is open
    (torch's ``SourceInfo.add_code``), including those it skips silently because they have no
    module. Nested blocks each get the codes of their own span."""
    codes: list[types.CodeType] = []
    with TRACED_CODE.active():
        stack = getattr(_recordings, "lists", None)
        if stack is None:
            stack = _recordings.lists = []
        stack.append(codes)
        try:
            yield codes
        finally:
            del stack[next(i for i, c in enumerate(stack) if c is codes)]  # by identity: lists compare equal


# -- Dynamo's compile lock ----------------------------------------------------------------------
_OWN_COMPILE_LOCK = threading.RLock()  # where this torch has no compile lock of its own


def dynamo_compile_lock() -> Any:
    """The lock torch's own ``torch.compile`` holds while it compiles a frame (module docstring);
    hold it around an ``aot_compile``."""
    try:
        from torch._dynamo.convert_frame import compile_lock
    except ImportError:
        return _OWN_COMPILE_LOCK
    return compile_lock
