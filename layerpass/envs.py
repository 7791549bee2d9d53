"""The one module that reads layerpass's environment variables (as ``vllm/envs.py`` does).

| variable | read | meaning |
| --- | --- | --- |
| ``VLLM_USE_LAYERNAME`` | once, at import | the layer-name switch (below) |
| ``LAYERPASS_CACHE_DIR`` | when a ``CompilationConfig`` is built | default artifact cache dir |
| ``LAYERPASS_DEBUG_DUMP`` | at each piece's pass run | dir for before/after graph dumps |
| ``LAYERPASS_REMOTE_CACHE`` | when a remote store is made | shared store URL (``redis://HOST:PORT/DB``, ``rediss://``, ``unix://``); unset or empty: none |
| ``LAYERPASS_CACHE_SECRET`` | when a remote store or bundle is opened | the shared secret every remote or bundle entry is sealed with (HMAC-SHA256); a remote store without one is refused |

``VLLM_USE_LAYERNAME`` keeps vLLM's name on purpose: layerpass is the layer-name mechanism of
vLLM (PR "hoisted LayerName") packaged for other engines, and an engine that runs both reads one
switch, so a deployment flips them together.

The layer-name switch:

``USE_LAYERNAME`` is computed ONCE, at import, because the custom ops' schemas are
built from it (a layer-name argument is typed ``LayerName`` or ``str``). Changing the
environment variable after ``layerpass`` is imported has no effect: set it before the
process starts (tests that need the other setting run a subprocess).

- ``HAS_OPAQUE_TYPE``: this torch can register a hoisted opaque type (torch 2.11+; how, per
  version, is ``layerpass/torch_compat.py``'s business).
- ``LAYERNAME_ENV_ON``: the variable's value (unset means on).
- ``USE_LAYERNAME = HAS_OPAQUE_TYPE and LAYERNAME_ENV_ON``.
"""

from __future__ import annotations

import os
import re

from layerpass.torch_compat import HAS_OPAQUE_TYPE

ENV_VAR = "VLLM_USE_LAYERNAME"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_bool_env(name: str, value: str | None, default: bool) -> bool:
    """Parse a boolean environment value; unknown values raise ``ValueError``."""
    if value is None:
        return default
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(
        f"{name}={value!r} is not a valid value; allowed (any case): "
        f"{', '.join(_TRUE)} (on) or {', '.join(_FALSE)} (off), or leave it unset (on)"
    )


LAYERNAME_ENV_ON: bool = parse_bool_env(ENV_VAR, os.environ.get(ENV_VAR), default=True)
USE_LAYERNAME: bool = HAS_OPAQUE_TYPE and LAYERNAME_ENV_ON


CACHE_DIR_ENV = "LAYERPASS_CACHE_DIR"
DEBUG_DUMP_ENV = "LAYERPASS_DEBUG_DUMP"
REMOTE_CACHE_ENV = "LAYERPASS_REMOTE_CACHE"
CACHE_SECRET_ENV = "LAYERPASS_CACHE_SECRET"


def cache_dir() -> str:
    """``$LAYERPASS_CACHE_DIR`` or ``~/.cache/layerpass``, resolved (``resolve_path``); read on each
    call (a test may set it)."""
    return resolve_path(os.environ.get(CACHE_DIR_ENV) or os.path.join("~", ".cache", "layerpass"), CACHE_DIR_ENV)


_VARIABLE = re.compile(r"\$(\w+|\{[^}]*\})")


def resolve_path(path: str, what: str) -> str:
    """``path`` with ``~`` and ``$VARS`` expanded, made absolute against the working directory NOW
    (a later ``chdir`` does not move it). ``ValueError`` naming ``what`` if it names a variable
    that is not set (it would otherwise become a directory literally named ``$VAR``)."""
    expanded = os.path.expandvars(path)
    unset = _VARIABLE.search(expanded)
    if unset is not None:
        raise ValueError(f"{what} {path!r} names {unset.group(0)}, which is not set; set it or write the path out")
    return os.path.abspath(os.path.expanduser(expanded))


def debug_dump_dir() -> str | None:
    """``$LAYERPASS_DEBUG_DUMP`` (unset or empty: no dumps); read on each call."""
    return os.environ.get(DEBUG_DUMP_ENV) or None


def remote_cache_url() -> str | None:
    """``$LAYERPASS_REMOTE_CACHE`` (unset or empty: no remote store); read on each call."""
    return os.environ.get(REMOTE_CACHE_ENV) or None


def cache_secret() -> bytes | None:
    """``$LAYERPASS_CACHE_SECRET`` as bytes (unset or empty: none); read on each call."""
    value = os.environ.get(CACHE_SECRET_ENV)
    return value.encode() if value else None
