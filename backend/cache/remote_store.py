"""A cache store shared beyond one machine: entries on a Redis server, each sealed with the cache secret.

A cached artifact or saved program is code (loading one runs it), so nothing read from the server is
trusted unless it carries an HMAC-SHA256 tag made with the shared secret over the entry's *name* and
data: a forged value, one written with another secret, a truncated or extended one, or a valid entry
copied under another name is refused, and the caller compiles instead.

The store is best-effort and never slows a compile down for long: every call has a socket timeout and
no retries; the first connection-level fault (down, wrong port, timeout, a server that is not Redis)
is warned about once and turns the store off for the rest of the process; a refused entry is warned
about once per name; a write the server refuses (full, read-only) is warned about once per store.

Value layout: ``MAGIC`` + 8-byte big-endian data length + 32-byte tag + data; key ``layerpass:<name>``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import threading
import time
from urllib.parse import parse_qs, urlsplit, urlunsplit

from layerpass import envs

logger = logging.getLogger("layerpass")

MAGIC = b"LPR1"
_DOMAIN = b"layerpass-entry-v1\0"
_LEN_BYTES = 8
_TAG_BYTES = hashlib.sha256().digest_size
_HEADER = len(MAGIC) + _LEN_BYTES + _TAG_BYTES
KEY_PREFIX = "layerpass:"
MAX_VALUE_BYTES = 512 * 1024 * 1024  # Redis' own limit on one value (proto-max-bulk-len)
MAX_NAMES = 10_000
_SCHEMES = ("redis", "rediss", "unix")
# a URL's query string overrides the client's keyword arguments: these would undo the bounds below
_RESERVED_QUERY = ("socket_timeout", "socket_connect_timeout", "retry", "retry_on_timeout", "retry_on_error")


class EntryRefused(ValueError):
    """A remote value that is not an authentic entry of the name it was read under."""


def _tag(secret: bytes, name: str, data: bytes) -> bytes:
    # names never hold NUL (checked by the callers), so name + NUL + data reads back one way only
    return hmac.new(secret, _DOMAIN + name.encode() + b"\0" + data, hashlib.sha256).digest()


def _check_name(name: str) -> None:
    if not isinstance(name, str) or "\0" in name or not _encodable(name):
        raise ValueError(f"entry name {name!r}: must be a UTF-8 str without NUL characters (a cache-relative path)")


def _encodable(name: str) -> bool:
    try:
        name.encode()
        return True
    except UnicodeEncodeError:  # lone surrogates
        return False


def seal(secret: bytes, name: str, data: bytes) -> bytes:
    """``data`` as a value stored under ``name``: magic, length and an HMAC tag in front."""
    _check_name(name)
    return MAGIC + len(data).to_bytes(_LEN_BYTES, "big") + _tag(secret, name, data) + data


def unseal(secret: bytes, name: str, blob: bytes) -> bytes:
    """The data of a value ``seal(secret, name, data)`` made; ``EntryRefused`` saying why for anything else."""
    try:
        _check_name(name)
    except ValueError as e:
        raise EntryRefused(str(e)) from None
    if len(blob) < _HEADER or blob[: len(MAGIC)] != MAGIC:
        raise EntryRefused(f"not a layerpass entry (expected {_HEADER}+ bytes starting with {MAGIC!r}, "
                           f"got {len(blob)} bytes starting with {bytes(blob[: len(MAGIC)])!r})")
    expected = int.from_bytes(blob[len(MAGIC): len(MAGIC) + _LEN_BYTES], "big")
    data = blob[_HEADER:]
    if len(data) != expected:
        how = "truncated" if len(data) < expected else "extended"
        raise EntryRefused(f"{how}: the header says {expected} data bytes, the value holds {len(data)}")
    if not hmac.compare_digest(blob[len(MAGIC) + _LEN_BYTES: _HEADER], _tag(secret, name, data)):
        raise EntryRefused("its tag does not verify (forged, written with another secret, or copied from "
                           "another entry's name)")
    return data


def _redacted(url: str) -> str:
    """``url`` without its password, in the user part or the query (it goes into log lines)."""
    parts = urlsplit(url)
    if parts.password is None and "password" not in parse_qs(parts.query):
        return url
    if parts.password is not None:
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    query = "&".join("password=***" if q.split("=", 1)[0] == "password" else q for q in parts.query.split("&"))
    return urlunsplit(parts._replace(query=query))


def _check_url(url: object) -> None:
    allowed = "redis://HOST:PORT/DB, rediss://HOST:PORT/DB or unix:///PATH/TO/SOCKET"
    if not isinstance(url, str):
        raise ValueError(f"remote cache URL {url!r} is not a string; allowed: {allowed}")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError as e:
        raise ValueError(f"remote cache URL {_redacted(url)!r} is malformed ({e}); allowed: {allowed}") from None
    if parts.scheme not in _SCHEMES:
        scheme = f"scheme {parts.scheme!r}" if parts.scheme else "no scheme"
        raise ValueError(f"remote cache URL {_redacted(url)!r} has {scheme}; allowed: {allowed}")
    if parts.scheme == "unix" and not parts.path:
        raise ValueError(f"remote cache URL {_redacted(url)!r} names no socket path; allowed: {allowed}")
    if parts.scheme != "unix":
        if not parts.hostname:
            raise ValueError(f"remote cache URL {_redacted(url)!r} names no host; allowed: {allowed}")
        db = parts.path.lstrip("/")
        if db and not db.isdigit():
            raise ValueError(f"remote cache URL {_redacted(url)!r}: database {db!r} is not a number; "
                             f"allowed: {allowed}")
    reserved = sorted(set(parse_qs(parts.query)) & set(_RESERVED_QUERY))
    if reserved:
        raise ValueError(f"remote cache URL {_redacted(url)!r} sets {', '.join(reserved)}: layerpass bounds "
                         "every call itself (timeout_s, no retries); remove them from the URL")


def _secret_bytes(secret: bytes | str | None) -> bytes:
    if isinstance(secret, str):
        secret = secret.encode()
    if not secret:
        raise ValueError(f"a remote cache needs a shared secret: set {envs.CACHE_SECRET_ENV} (the same value on "
                         "every machine that shares the store; entries are authenticated with it, since loading "
                         "one runs its code)")
    if not isinstance(secret, bytes):
        raise ValueError(f"the cache secret must be bytes or str, not {type(secret).__name__}")
    return secret


class RemoteStore:
    """A shared store of cache entries on a Redis server, every value sealed with the cache secret."""

    def __init__(self, url: str, secret: bytes | str | None, *, timeout_s: float = 2.0,
                 max_value_bytes: int = MAX_VALUE_BYTES) -> None:
        _check_url(url)
        self._secret = _secret_bytes(secret)
        if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"timeout_s={timeout_s!r}: must be a finite number of seconds > 0")
        try:
            import redis  # the optional `fleet` extra
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError as e:
            raise ImportError(f"a remote cache needs the redis client: pip install 'layerpass[fleet]' ({e})") from e
        self._errors = redis.exceptions
        self.url = _redacted(url)
        self.timeout_s = float(timeout_s)
        self.max_value_bytes = max_value_bytes
        self.available = True
        self._warned: set[str] = set()
        self._lock = threading.Lock()
        # from_url builds a pool; nothing connects until the first call
        self._client = redis.Redis.from_url(url, socket_timeout=self.timeout_s,
                                            socket_connect_timeout=self.timeout_s, retry=Retry(NoBackoff(), 0))

    def __repr__(self) -> str:
        return f"RemoteStore({self.url!r}, available={self.available})"

    def get(self, name: str) -> bytes | None:
        """The verified data stored under ``name``; None when missing, refused or on any fault."""
        _check_name(name)
        blob = self._call("get", name, lambda: self._client.get(KEY_PREFIX + name))
        if blob is None:
            return None
        try:
            return unseal(self._secret, name, blob)
        except EntryRefused as why:
            self._warn_once(f"refused:{name}", f"refused remote entry {name}: {why}; compiling it locally")
            return None

    def put(self, name: str, data: bytes) -> bool:
        """Stores ``data`` under ``name``; False on any fault (nothing raised)."""
        blob = seal(self._secret, name, data)
        if len(blob) > self.max_value_bytes:
            self._warn_once(f"too-large:{name}", f"remote cache {self.url}: entry {name} is {len(blob)} bytes, "
                            f"over the {self.max_value_bytes}-byte limit of one value; not stored remotely")
            return False
        return self._call("put", name, lambda: self._client.set(KEY_PREFIX + name, blob)) is True

    def names(self, prefix: str) -> list[str]:
        """Entry names starting with ``prefix`` (sorted; at most ``MAX_NAMES``, found within ``timeout_s``)."""
        return self._call("names", prefix, lambda: self._scan(prefix)) or []

    def _scan(self, prefix: str) -> list[str]:
        pattern = _glob_escape(KEY_PREFIX + prefix) + "*"
        deadline = time.monotonic() + self.timeout_s
        found: set[str] = set()
        cursor = None
        while cursor != 0 and len(found) <= MAX_NAMES and time.monotonic() < deadline:
            cursor, keys = self._client.scan(cursor or 0, match=pattern, count=1000)
            found.update(k[len(KEY_PREFIX):] for k in map(_decoded, keys) if k is not None)
        if cursor != 0 or len(found) > MAX_NAMES:
            self._warn_once("names-cut", f"remote cache {self.url}: listing {prefix!r} stopped after "
                            f"{min(len(found), MAX_NAMES)} names (bounded to {MAX_NAMES} names and "
                            f"{self.timeout_s:g} s)")
        return sorted(found)[:MAX_NAMES]

    def _call(self, what: str, name: str, fn):
        """``fn()``, or None on a fault: a connection-level one turns the store off (one warning)."""
        if not self.available:
            return None
        try:
            return fn()
        except (self._errors.ConnectionError, self._errors.TimeoutError, self._errors.InvalidResponse,
                OSError) as e:
            self.available = False
            self._warn_once("unavailable", f"remote cache {self.url} is unavailable ({type(e).__name__}: {e}); "
                            "the compile goes on locally and this process stops using the remote cache")
        except self._errors.RedisError as e:  # the server answered but refused: full, read-only, wrong type
            once = "" if what == "get" else f"; later refused {what}s are not logged"
            self._warn_once("refused:" + name if what == "get" else what + "-refused",
                            f"remote cache {self.url}: {what} {name!r} failed ({type(e).__name__}: {e}); "
                            f"the compile goes on locally{once}")
        except Exception as e:  # noqa: BLE001 (a client bug must not fail the compile either)
            self.available = False
            self._warn_once("unavailable", f"remote cache {self.url}: {what} failed unexpectedly "
                            f"({type(e).__name__}: {e}); the compile goes on locally and this process stops "
                            "using the remote cache")
        return None

    def _warn_once(self, key: str, message: str) -> None:
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        logger.warning(message)


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _decoded(key: bytes) -> str | None:
    try:
        return key.decode()
    except UnicodeDecodeError:  # not a name layerpass wrote
        return None
