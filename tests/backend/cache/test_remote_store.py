"""``backend/cache/remote_store.py``: sealed entries on a real ``redis-server`` (``redis_server`` fixture).

Every fault is driven for real (a closed port, a server stopped mid-run, a value rewritten with the
raw client, ``maxmemory`` too small, a server blocked in ``DEBUG SLEEP``, a socket that never answers)
and must give None / False, within a bounded time, with exactly one warning per store (one per name
for a refused entry), never an exception."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layerpass import envs
from layerpass.backend.cache import remote_store as rs
from layerpass.backend.cache.remote_store import MAGIC, EntryRefused, RemoteStore, seal, unseal
from layerpass.bench.redis_server import free_port
from tests.helpers import redis_server as rh

SECRET = b"fleet-secret-for-tests"
NAME = "artifacts/ab/abcdef0123/artifact.bin"
FAST = 0.3  # timeout_s for the fault cases
BOUND = 2.0  # what a call on a faulty store may take at most, with FAST (the rest is scheduling noise)
names_st = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=40)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "layerpass" and r.levelno == logging.WARNING]


@pytest.fixture
def caplog(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger="layerpass")
    return caplog


def timed(fn, *args):
    start = time.monotonic()
    out = fn(*args)
    return out, time.monotonic() - start


# --- sealing ---------------------------------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(secret=st.binary(min_size=1, max_size=64), name=names_st, data=st.binary(max_size=2000))
def test_seal_unseal_round_trip(secret: bytes, name: str, data: bytes) -> None:
    blob = seal(secret, name, data)
    assert blob[:4] == MAGIC and int.from_bytes(blob[4:12], "big") == len(data) and len(blob) == 44 + len(data)
    assert unseal(secret, name, blob) == data


@settings(max_examples=150, deadline=None)
@given(name=names_st, data=st.binary(max_size=300), where=st.floats(0, 1, exclude_max=True),
       bit=st.integers(0, 7))
def test_any_flipped_bit_is_refused(name: str, data: bytes, where: float, bit: int) -> None:
    """Magic, length, tag or data: one flipped bit anywhere and the entry is refused."""
    blob = bytearray(seal(SECRET, name, data))
    blob[int(where * len(blob))] ^= 1 << bit
    with pytest.raises(EntryRefused):
        unseal(SECRET, name, bytes(blob))


@settings(max_examples=60, deadline=None)
@given(name=names_st, other=names_st, data=st.binary(max_size=100))
def test_an_entry_under_another_name_or_secret_is_refused(name: str, other: str, data: bytes) -> None:
    blob = seal(SECRET, name, data)
    if other != name:
        with pytest.raises(EntryRefused, match="tag does not verify"):
            unseal(SECRET, other, blob)
    with pytest.raises(EntryRefused, match="tag does not verify"):
        unseal(SECRET + b"x", name, blob)


BLOB = seal(SECRET, NAME, b"compiled code " * 8)


@pytest.mark.parametrize("case,blob,why", [
    ("data byte flipped", BLOB[:-1] + bytes([BLOB[-1] ^ 0x80]), "tag does not verify"),
    ("tag byte flipped", BLOB[:20] + bytes([BLOB[20] ^ 1]) + BLOB[21:], "tag does not verify"),
    ("truncated", BLOB[:-5], "truncated: the header says 112 data bytes, the value holds 107"),
    ("extended", BLOB + b"!", "extended: the header says 112 data bytes, the value holds 113"),
    ("wrong magic", b"LPR2" + BLOB[4:], "not a layerpass entry"),
    ("shorter than the header", BLOB[:30], "not a layerpass entry"),
    ("empty", b"", "not a layerpass entry"),
    ("length rewritten to match a truncation", BLOB[:4] + (107).to_bytes(8, "big") + BLOB[12:-5],
     "tag does not verify"),
])
def test_each_refusal_says_why(case: str, blob: bytes, why: str) -> None:
    with pytest.raises(EntryRefused) as info:
        unseal(SECRET, NAME, blob)
    assert why in str(info.value), case


def test_names_with_nul_are_rejected() -> None:
    """name + NUL + data must read back one way only: ("a\\0b", "c") and ("a", "b\\0c") would share a tag."""
    with pytest.raises(ValueError, match="NUL"):
        seal(SECRET, "a\0b", b"c")
    with pytest.raises(EntryRefused, match="NUL"):
        unseal(SECRET, "a\0b", seal(SECRET, "a", b"b\0c"))
    with pytest.raises(ValueError, match="UTF-8"):
        seal(SECRET, "lone \ud800 surrogate", b"c")


# --- construction ----------------------------------------------------------------------------------

@pytest.mark.parametrize("secret", [None, "", b""])
def test_no_secret_is_refused_at_construction(secret) -> None:
    with pytest.raises(ValueError, match="a remote cache needs a shared secret: set LAYERPASS_CACHE_SECRET"):
        RemoteStore("redis://127.0.0.1:6379/0", secret)


@pytest.mark.parametrize("url,what", [
    ("http://127.0.0.1:6379/0", "has scheme 'http'"),
    ("127.0.0.1:6379", "has no scheme"),
    ("localhost:6379", "has scheme 'localhost'"),
    ("redis://", "names no host"),
    ("redis://127.0.0.1:port/0", "malformed"),
    ("redis://127.0.0.1:6379/zero", "database 'zero' is not a number"),
    ("unix://", "names no socket path"),
    ("redis://127.0.0.1:6379/0?socket_timeout=600", "sets socket_timeout"),
    (6379, "is not a string"),
])
def test_a_bad_url_is_refused_naming_it_and_the_allowed_form(url, what: str) -> None:
    with pytest.raises(ValueError) as info:
        RemoteStore(url, SECRET)
    message = str(info.value)
    assert what in message and str(url) in message, message
    assert "allowed: redis://HOST:PORT/DB" in message or "remove them from the URL" in message, message


@pytest.mark.parametrize("timeout_s", [0, -1, float("inf"), float("nan"), "2"])
def test_a_bad_timeout_is_refused(timeout_s) -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        RemoteStore("redis://127.0.0.1:6379/0", SECRET, timeout_s=timeout_s)


def test_construction_does_not_connect(caplog: pytest.LogCaptureFixture) -> None:
    (store, took) = timed(RemoteStore, rh.closed_port_url(), SECRET)
    assert store.available and took < 0.5 and warnings_of(caplog) == []


@pytest.mark.parametrize("url", ["rediss://127.0.0.1:1/0", "unix:///nonexistent/layerpass-redis.sock?db=1"])
def test_tls_and_unix_socket_urls(url: str, caplog: pytest.LogCaptureFixture) -> None:
    store = RemoteStore(url, SECRET, timeout_s=FAST)
    assert store.url == url and store.get(NAME) is None and not store.available
    (message,) = warnings_of(caplog)
    assert url in message and "goes on locally" in message


def test_passwords_never_reach_messages(caplog: pytest.LogCaptureFixture) -> None:
    store = RemoteStore(f"redis://fleet:hunter2@127.0.0.1:{free_port()}/0?password=hunter3", SECRET,
                        timeout_s=FAST)
    assert "hunter" not in store.url and "fleet:***@127.0.0.1" in store.url and "password=***" in store.url
    assert store.get(NAME) is None
    (message,) = warnings_of(caplog)
    assert store.url in message and "hunter" not in message and SECRET.decode() not in message


# --- a real server ---------------------------------------------------------------------------------

def test_round_trip_through_a_real_server(redis_server: rh.RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    store = RemoteStore(redis_server.url, SECRET)
    big = bytes(range(256)) * 4096  # 1 MiB
    assert store.get(NAME) is None  # a plain miss: no warning
    assert store.put(NAME, big) and store.put("programs/m/empty", b"")
    assert store.get(NAME) == big and store.get("programs/m/empty") == b""
    raw = redis_server.client().get("layerpass:" + NAME)
    assert raw == seal(SECRET, NAME, big)
    other = RemoteStore(redis_server.url, SECRET.decode())  # another process: str secret, same bytes
    assert other.get(NAME) == big
    assert store.available and warnings_of(caplog) == []


def test_names_by_prefix(redis_server: rh.RedisServer) -> None:
    store = RemoteStore(redis_server.url, SECRET)
    written = ["artifacts/ab/ab1/artifact.bin", "artifacts/ab/ab1/meta.json", "artifacts/cd/cd2/artifact.bin",
               "programs/m1/region0", "glob*/a", "glob?/b", "glob[x]/c", "glob\\/d"]
    for name in written:
        assert store.put(name, name.encode())
    redis_server.client().set("someone-else:artifacts/ab/zz", b"x")  # not layerpass's
    assert store.names("artifacts/") == sorted(written[:3])
    assert store.names("artifacts/ab/") == written[:2]
    assert store.names("programs/") == ["programs/m1/region0"]
    assert store.names("glob*") == ["glob*/a"] and store.names("glob?") == ["glob?/b"]
    assert store.names("glob[x]") == ["glob[x]/c"] and store.names("glob\\") == ["glob\\/d"]
    assert store.names("") == sorted(written) and store.names("nothing/") == []


def test_names_is_bounded(redis_server: rh.RedisServer, monkeypatch: pytest.MonkeyPatch,
                          caplog: pytest.LogCaptureFixture) -> None:
    client = redis_server.client()
    with client.pipeline(transaction=False) as pipe:
        for i in range(3000):
            pipe.set(f"layerpass:artifacts/{i:05d}", b"x")
        pipe.execute()
    monkeypatch.setattr(rs, "MAX_NAMES", 50)
    names = RemoteStore(redis_server.url, SECRET).names("artifacts/")
    assert len(names) == 50 and len(set(names)) == 50
    (message,) = warnings_of(caplog)
    assert "stopped after 50 names" in message


def test_a_corrupted_value_is_refused_once_per_name(redis_server: rh.RedisServer,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    store = RemoteStore(redis_server.url, SECRET)
    client = redis_server.client()
    assert store.put(NAME, b"good code") and store.put("other", b"fine")
    client.set("layerpass:" + NAME, b"garbage from somewhere")
    client.rpush("layerpass:a-list", b"not a string")
    for _ in range(3):
        assert store.get(NAME) is None and store.get("a-list") is None
    assert store.get("other") == b"fine" and store.available  # a bad entry is not a bad server
    first, second = warnings_of(caplog)
    assert first.startswith(f"refused remote entry {NAME}: not a layerpass entry") and "compiling it locally" in first
    assert "get 'a-list' failed" in second and "WRONGTYPE" in second


@pytest.mark.parametrize("tamper,why", [
    (lambda blob: blob[:-3], "truncated"),
    (lambda blob: blob + b"\0" * 3, "extended"),
    (lambda blob: blob[:-1] + bytes([blob[-1] ^ 1]), "its tag does not verify"),
])
def test_a_wrong_sized_or_edited_value_is_refused(redis_server: rh.RedisServer, caplog: pytest.LogCaptureFixture,
                                                  tamper, why: str) -> None:
    store = RemoteStore(redis_server.url, SECRET)
    assert store.put(NAME, b"x" * 100)
    client = redis_server.client()
    client.set("layerpass:" + NAME, tamper(client.get("layerpass:" + NAME)))
    assert store.get(NAME) is None
    (message,) = warnings_of(caplog)
    assert f"refused remote entry {NAME}: {why}" in message


def test_wrong_secret_and_a_moved_entry_are_refused(redis_server: rh.RedisServer,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    writer = RemoteStore(redis_server.url, SECRET)
    assert writer.put(NAME, b"the code for NAME") and writer.put("programs/m/a", b"the code for a")
    assert RemoteStore(redis_server.url, b"another fleet's secret").get(NAME) is None
    client = redis_server.client()
    client.copy("layerpass:" + NAME, "layerpass:programs/m/a", replace=True)  # a valid entry, wrong place
    assert writer.get("programs/m/a") is None and writer.get(NAME) == b"the code for NAME"
    assert [m.split(":")[0] for m in warnings_of(caplog)] == [f"refused remote entry {NAME}",
                                                              "refused remote entry programs/m/a"]
    assert all("tag does not verify" in m for m in warnings_of(caplog))


def test_nothing_listening(caplog: pytest.LogCaptureFixture) -> None:
    store = RemoteStore(rh.closed_port_url(), SECRET, timeout_s=FAST)
    start = time.monotonic()
    assert store.get(NAME) is None and store.put(NAME, b"x") is False and store.names("") == []
    assert time.monotonic() - start < BOUND and not store.available
    (message,) = warnings_of(caplog)
    assert store.url in message and "ConnectionError" in message and "goes on locally" in message


def test_server_stopped_mid_run(redis_server: rh.RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    store = RemoteStore(redis_server.url, SECRET, timeout_s=FAST)
    assert store.put(NAME, b"code") and store.get(NAME) == b"code"
    redis_server.stop()
    start = time.monotonic()
    assert store.get(NAME) is None and store.put(NAME, b"code") is False and store.names("") == []
    assert time.monotonic() - start < BOUND and not store.available
    (message,) = warnings_of(caplog)
    assert store.url in message and "goes on locally" in message
    redis_server.start()  # the same port, empty again; the store object stays off, a new one works
    assert store.get(NAME) is None and len(warnings_of(caplog)) == 1
    fresh = RemoteStore(redis_server.url, SECRET)
    assert fresh.get(NAME) is None and fresh.put(NAME, b"again") and fresh.get(NAME) == b"again"


def test_concurrent_callers_warn_once(caplog: pytest.LogCaptureFixture) -> None:
    store = RemoteStore(rh.closed_port_url(), SECRET, timeout_s=FAST)
    threads = [threading.Thread(target=store.get, args=(f"n{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(warnings_of(caplog)) == 1 and not store.available


def test_an_unexpected_client_error_turns_the_store_off(redis_server: rh.RedisServer,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    store = RemoteStore(redis_server.url, SECRET)

    def broken(*args, **kwargs):
        raise RuntimeError("client bug")

    store._client.get = broken
    assert store.get(NAME) is None and store.put(NAME, b"x") is False and not store.available
    (message,) = warnings_of(caplog)
    assert "RuntimeError: client bug" in message and "goes on locally" in message


def test_full_server(redis_server: rh.RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    store = RemoteStore(redis_server.url, SECRET)
    assert store.put(NAME, b"before it filled up")
    redis_server.client().config_set("maxmemory", 1)  # noeviction: every write is refused with OOM
    assert store.put("programs/m/a", b"x" * 1000) is False and store.put("programs/m/b", b"y") is False
    assert store.get(NAME) == b"before it filled up" and store.available  # reads still served
    (message,) = warnings_of(caplog)
    assert "OutOfMemoryError" in message and "later refused puts are not logged" in message and store.url in message and "goes on locally" in message


def test_a_value_over_the_limit_is_not_sent(redis_server: rh.RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    store = RemoteStore(redis_server.url, SECRET, max_value_bytes=1000)
    assert store.put(NAME, b"x" * (1000 - 44)) and store.put("big", b"x" * (1000 - 43)) is False
    assert redis_server.client().exists("layerpass:big") == 0
    (message,) = warnings_of(caplog)
    assert "entry big is 1001 bytes, over the 1000-byte limit" in message
    assert rs.MAX_VALUE_BYTES == 512 * 1024 * 1024 == RemoteStore(redis_server.url, SECRET).max_value_bytes


def test_a_slow_server_times_out(redis_server: rh.RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """A real Redis blocked for 1.5 s (DEBUG SLEEP on another connection): the call gives up after ~timeout_s."""
    store = RemoteStore(redis_server.url, SECRET, timeout_s=FAST)
    assert store.put(NAME, b"code")
    sleeper = threading.Thread(target=redis_server.client().execute_command, args=("DEBUG", "SLEEP", "1.5"))
    sleeper.start()
    try:
        time.sleep(0.3)  # the server is inside the sleep now
        (got, took) = timed(store.get, NAME)
        assert got is None and FAST * 0.9 < took < BOUND, took
        (got, took) = timed(store.put, NAME, b"code")
        assert got is False and took < 0.05 and not store.available  # off: no second wait
    finally:
        sleeper.join()
    (message,) = warnings_of(caplog)
    assert "TimeoutError" in message and store.url in message


def test_a_socket_that_never_answers(caplog: pytest.LogCaptureFixture) -> None:
    with rh.silent_server() as url:
        store = RemoteStore(url, SECRET, timeout_s=FAST)
        (got, took) = timed(store.get, NAME)
        assert got is None and took < BOUND and store.put(NAME, b"x") is False
    (message,) = warnings_of(caplog)
    assert "Timeout" in message and "goes on locally" in message


# --- the harness ---------------------------------------------------------------------------------

@pytest.mark.parametrize("ci,outcome,text", [
    ("true", pytest.fail.Exception, ".ci/run must install it"),
    (None, pytest.skip.Exception, "apt-get install -y redis-server"),
])
def test_harness_without_redis_server(monkeypatch: pytest.MonkeyPatch, ci, outcome, text: str) -> None:
    monkeypatch.setattr(rh.server, "redis_server_path", lambda: None)
    if ci:
        monkeypatch.setenv("CI", ci)
    else:
        monkeypatch.delenv("CI", raising=False)
    with pytest.raises(outcome, match=text.replace(".", r"\.")):
        with rh.running_redis():
            pass


def test_harness_stops_its_server() -> None:
    with rh.running_redis() as server:
        proc = server.proc
        assert server.client().ping() and server.url == f"redis://127.0.0.1:{server.port}/0"
    assert proc.poll() is not None
