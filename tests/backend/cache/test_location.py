"""A cache location: the local dir first, then the remote store (a real Redis); a remote hit is
written to the local dir, a stored entry goes to both, an untrusted local dir is not used."""

from __future__ import annotations

import os

import pytest

from layerpass.backend.cache.artifacts import ArtifactCache
from layerpass.backend.cache.location import CacheLocation
from layerpass.backend.cache.remote_store import RemoteStore
from tests.backend.cache.test_artifacts import FakeArtifact, fake_load  # noqa: F401  (fixture)

SECRET = b"location-secret"
KEY = "ab" * 32


def two_machines(tmp_path, url: str) -> tuple[ArtifactCache, ArtifactCache]:
    return tuple(ArtifactCache(CacheLocation(str(tmp_path / m), RemoteStore(url, SECRET))) for m in "ab")


def test_a_stored_entry_reaches_the_other_machine_and_its_local_dir(tmp_path, redis_server, fake_load):
    a, b = two_machines(tmp_path, redis_server.url)
    assert b.load(KEY) is None  # nowhere yet
    assert a.store(KEY, FakeArtifact(b"compiled"), {"stats": {}})
    entry = b.load(KEY)
    assert entry is not None and entry.artifact.payload == b"compiled" and entry.meta["source"] == "remote"
    assert os.path.isfile(os.path.join(b.path(KEY), "artifact.bin"))  # written to B's own dir
    redis_server.stop()
    again = b.load(KEY)  # served locally now: the store is not needed
    assert again is not None and again.meta["source"] == "cache"


def test_an_untrusted_local_dir_is_not_used_even_with_a_remote(tmp_path, redis_server, fake_load, caplog):
    a, b = two_machines(tmp_path, redis_server.url)
    a.store(KEY, FakeArtifact(b"compiled"), {})
    os.makedirs(b.location.root)
    os.chmod(b.location.root, 0o777)
    assert b.load(KEY) is None and not os.path.exists(b.path(KEY))
    assert b.store(KEY, FakeArtifact(b"x"), {}) is False
    assert any("chmod -R go-w" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("names", [["x/y.json"], ["p/a.bin", "p/a.json"]])
def test_fetch_is_all_or_nothing(tmp_path, redis_server, names):
    store = RemoteStore(redis_server.url, SECRET)
    location = CacheLocation(str(tmp_path / "c"), store)
    for n in names[:-1]:
        store.put(n, b"part")
    assert location.fetch(names) is False and not any(os.path.exists(location.local(n)) for n in names)
    store.put(names[-1], b"last")
    assert location.fetch(names) is True and all(os.path.exists(location.local(n)) for n in names)
