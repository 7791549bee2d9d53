"""The on-disk artifact cache: warm start, corruption, concurrent writers.

The cold compile is this module's own llama-2 (not the memoised one another module might
call again); its cache dir is only read by the warm-start subprocess and copied before
anything corrupts it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import backend as bh
from layerpass.backend.cache.artifacts import ArtifactCache


# the hybrid model's two layers are two distinct pieces (linear and softmax attention): two entries
MODEL = "bailing-hybrid"


@pytest.fixture(scope="module")
def cold() -> bh.Compiled:
    c = bh.compile_zoo(MODEL, 2)
    assert c.report.num_unique_pieces >= 2
    return c


def entries(cache_dir: str) -> list[str]:
    return sorted(os.path.dirname(p) for p in glob.glob(os.path.join(cache_dir, "artifacts", "*", "*", "meta.json")))


def entry_is_valid(entry: str) -> bool:
    with open(os.path.join(entry, "meta.json")) as f:
        meta = json.load(f)
    with open(os.path.join(entry, "artifact.bin"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest() == meta["sha256"]


@pytest.mark.slow
def test_cold_compile_fills_the_cache(cold: bh.Compiled) -> None:
    found = entries(cold.cache_dir)
    assert len(found) == cold.report.num_unique_pieces
    assert {os.path.basename(e) for e in found} == {p.key for p in cold.report.pieces}
    assert all(entry_is_valid(e) for e in found)


@pytest.mark.slow
def test_warm_start_in_a_fresh_process_compiles_nothing(cold: bh.Compiled) -> None:
    res = bh.run_python(bh.compile_zoo_body(MODEL, 2, cold.cache_dir), what="warm start").result
    r = res["report"]
    keys = [p["key"] for p in r["pieces"]]
    assert keys == [p.key for p in cold.report.pieces], "a fresh process hashed the same model differently"
    assert r["num_compiled"] == 0, r
    assert r["num_cache_hits"] == cold.report.num_unique_pieces > 0
    assert [p["source"] for p in r["pieces"]].count("cache") == r["num_cache_hits"]
    bh.assert_matches(torch.tensor(res["out"]), cold.out, "warm-start output")
    bh.assert_matches(torch.tensor(res["out"]), torch.tensor(res["ref"]), "warm-start output vs its own eager")


@pytest.mark.slow
def test_corrupted_entries_are_detected_logged_and_recompiled(cold: bh.Compiled) -> None:
    broken_dir = bh.fresh_cache_dir("corrupt")
    shutil.copytree(cold.cache_dir, broken_dir, dirs_exist_ok=True)
    found = entries(broken_dir)
    assert len(found) >= 2
    truncated, garbled = found[0], found[1]
    art = os.path.join(truncated, "artifact.bin")
    with open(art, "r+b") as f:
        f.truncate(os.path.getsize(art) // 2)
    art = os.path.join(garbled, "artifact.bin")
    with open(art, "r+b") as f:
        f.seek(os.path.getsize(art) // 3)
        f.write(b"\xde\xad\xbe\xef" * 8)

    proc = bh.run_python(bh.compile_zoo_body(MODEL, 2, broken_dir), what="compile over a corrupted cache")
    r = proc.result["report"]
    for entry in (truncated, garbled):
        assert os.path.basename(entry) in proc.stderr and "unusable" in proc.stderr, proc.stderr[-3000:]
    assert r["num_compiled"] == 2 and r["num_cache_hits"] == cold.report.num_unique_pieces - 2, r
    bh.assert_matches(torch.tensor(proc.result["out"]), cold.ref, "output after recompiling corrupted entries")
    assert all(entry_is_valid(e) for e in entries(broken_dir)), "recompiled entries must be stored again, intact"
    assert len(entries(broken_dir)) == cold.report.num_unique_pieces


CORRUPTIONS = ["truncate", "flip", "meta-json", "meta-sha", "missing-artifact", "format"]


@pytest.mark.slow
@settings(max_examples=12, deadline=None)
@given(kind=st.sampled_from(CORRUPTIONS), where=st.floats(0.0, 0.999))
def test_cache_load_rejects_every_kind_of_corruption(cold: bh.Compiled, kind: str, where: float) -> None:
    root = bh.fresh_cache_dir("unit")
    shutil.copytree(cold.cache_dir, root, dirs_exist_ok=True)
    entry = entries(root)[0]
    key = os.path.basename(entry)
    art, meta_path = os.path.join(entry, "artifact.bin"), os.path.join(entry, "meta.json")
    size = os.path.getsize(art)
    if kind == "truncate":
        with open(art, "r+b") as f:
            f.truncate(int(size * where))
    elif kind == "flip":
        with open(art, "r+b") as f:
            f.seek(int(size * where))
            byte = f.read(1)
            f.seek(int(size * where))
            f.write(bytes([byte[0] ^ 0xFF]))
    elif kind == "missing-artifact":
        os.remove(art)
    else:
        with open(meta_path) as f:
            meta = json.load(f)
        text = json.dumps(dict(meta, sha256="0" * 64) if kind == "meta-sha" else dict(meta, format=-1))
        if kind == "meta-json":
            text = text[: int(len(text) * where)]
        with open(meta_path, "w") as f:
            f.write(text)

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("layerpass")
    logger.addHandler(handler)
    try:
        assert ArtifactCache(root).load(key) is None, f"{kind} at {where} was not detected"
    finally:
        logger.removeHandler(handler)
        shutil.rmtree(root, ignore_errors=True)
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and key in warnings[0] and "recompiling" in warnings[0], warnings
    assert not os.path.exists(entry), "an unusable entry must be removed"


@pytest.mark.slow
def test_cache_load_of_an_intact_entry(cold: bh.Compiled) -> None:
    """An intact entry loads with its metadata; an absent key is a plain miss (no warning needed)."""
    prologue = cold.report.pieces[0]
    entry = ArtifactCache(cold.cache_dir).load(prologue.key)
    assert entry is not None and entry.meta["piece"] == prologue.name
    assert ArtifactCache(cold.cache_dir).load("0" * 64) is None  # absent: a plain miss


CONCURRENT_BODY = """\
import os, time, glob
from tests.helpers import backend as bh
barrier = {barrier!r}
open(os.path.join(barrier, f"ready-{{os.getpid()}}"), "w").close()
deadline = time.time() + 120
while len(glob.glob(os.path.join(barrier, "ready-*"))) < 2:
    if time.time() > deadline:
        raise SystemExit("the other writer never started")
    time.sleep(0.05)
c = bh.compile_zoo("bailing-hybrid", 2, cache_dir={cache_dir!r})
emit({{"report": bh.report_dict(c.report), "out": c.out.tolist(), "ref": c.ref.tolist(), "t": time.time()}})
"""


@pytest.mark.slow  # two fresh processes at once: ~40 s on 2 cores
def test_two_processes_compile_into_one_cache_dir_at_once(cold: bh.Compiled) -> None:
    shared, barrier = bh.fresh_cache_dir("concurrent"), bh.fresh_cache_dir("barrier")
    body = CONCURRENT_BODY.format(barrier=barrier, cache_dir=shared)
    procs = [bh.start_python(body) for _ in range(2)]
    results = [bh.finish_python(p, what=f"concurrent writer {i}").result for i, p in enumerate(procs)]
    for res in results:
        r = res["report"]
        assert r["num_compiled"] + r["num_cache_hits"] == r["num_unique_pieces"] == cold.report.num_unique_pieces
        bh.assert_matches(torch.tensor(res["out"]), torch.tensor(res["ref"]), "concurrent writer output")
        bh.assert_matches(torch.tensor(res["out"]), cold.ref, "concurrent writer output vs this process's eager")
    found = entries(shared)
    assert len(found) == cold.report.num_unique_pieces and all(entry_is_valid(e) for e in found)
    leftovers = [p for p in glob.glob(os.path.join(shared, "artifacts", "*", "*")) if os.path.basename(p).startswith(".tmp")]
    assert leftovers == [], f"temporary entries left behind: {leftovers}"


# ------------------------------------------------------------------ faults: degrade, never fail
class FakeArtifact:
    """Stands in for a ``CompiledArtifact``: ``save`` writes its payload; the stub ``load`` reads it back."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def save(self, *, path: str, format: str) -> None:
        with open(path, "wb") as f:
            f.write(self.payload)


@pytest.fixture
def fake_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """``CompiledArtifact.load`` returns a ``FakeArtifact`` of the file's bytes (no Inductor involved)."""
    def load(*, path: str, format: str = "binary") -> FakeArtifact:
        with open(path, "rb") as f:
            return FakeArtifact(f.read())
    monkeypatch.setattr(torch._inductor.CompiledArtifact, "load", staticmethod(load))


@pytest.fixture
def layerpass_log():
    """The WARNING messages the ``layerpass`` logger emits during the test."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("layerpass")
    logger.addHandler(handler)
    try:
        yield lambda: [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    finally:
        logger.removeHandler(handler)


def unwritable_roots(tmp_path) -> dict[str, str]:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    return {"a file": str(a_file), "under a file": str(a_file / "sub"), "under /proc": "/proc/layerpass-cache"}


@pytest.mark.parametrize("where", ["a file", "under a file", "under /proc"])
def test_unwritable_cache_warns_once_and_never_raises(tmp_path, where: str, layerpass_log, fake_load) -> None:
    """Before: ``makedirs`` / ``mkdtemp`` sat outside the ``try`` and the OSError failed the compile."""
    root = unwritable_roots(tmp_path)[where]
    cache = ArtifactCache(root)
    for i in range(3):
        key = hashlib.sha256(f"{where}-{i}".encode()).hexdigest()
        assert cache.store(key, FakeArtifact(b"x"), {}) is False
        assert cache.load(key) is None
    warnings = layerpass_log()
    assert len(warnings) == 1, warnings
    assert "cannot write" in warnings[0] and "without" in warnings[0] and root in warnings[0], warnings
    # a second cache object on the same root (a second compile in this process) stays quiet too
    assert ArtifactCache(root).store("ab" * 32, FakeArtifact(b"x"), {}) is False
    assert len(layerpass_log()) == 1


def test_read_only_cache_dir_warns_once(tmp_path, monkeypatch: pytest.MonkeyPatch, layerpass_log, fake_load) -> None:
    """A read-only dir, simulated (the tests may run as root, which ignores mode bits)."""
    root = str(tmp_path / "ro")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", root)
    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    cache = ArtifactCache(root)
    assert cache.store("cd" * 32, FakeArtifact(b"x"), {}) is False
    assert cache.store("ef" * 32, FakeArtifact(b"x"), {}) is False
    warnings = layerpass_log()
    assert len(warnings) == 1 and "Permission denied" in warnings[0], warnings


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_cache_dir_for_real(tmp_path, layerpass_log, fake_load) -> None:
    root = tmp_path / "ro"
    (root / "artifacts").mkdir(parents=True)
    os.chmod(root / "artifacts", 0o500)
    try:
        assert ArtifactCache(str(root)).store("12" * 32, FakeArtifact(b"x"), {}) is False
    finally:
        os.chmod(root / "artifacts", 0o700)
    assert len(layerpass_log()) == 1


def test_corrupt_entry_that_cannot_be_removed_is_not_said_to_be(tmp_path, monkeypatch: pytest.MonkeyPatch,
                                                                 layerpass_log, fake_load) -> None:
    cache = ArtifactCache(str(tmp_path))
    key = "34" * 32
    assert cache.store(key, FakeArtifact(b"payload"), {})
    with open(os.path.join(cache.path(key), "artifact.bin"), "wb") as f:
        f.write(b"garbled")
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: None)  # a read-only dir: removal does nothing
    assert cache.load(key) is None
    warnings = layerpass_log()
    assert len(warnings) == 1 and key in warnings[0] and "recompiling" in warnings[0], warnings
    assert "removing it" not in warnings[0] and "could not remove" in warnings[0], warnings


def test_meta_records_its_key(tmp_path, fake_load) -> None:
    cache = ArtifactCache(str(tmp_path))
    key = "56" * 32
    assert cache.store(key, FakeArtifact(b"payload"), {"piece": "p"})
    with open(os.path.join(cache.path(key), "meta.json")) as f:
        assert json.load(f)["key"] == key
    entry = cache.load(key)
    assert entry is not None and entry.artifact.payload == b"payload" and entry.meta["piece"] == "p"


def swap_entries(cache: ArtifactCache, a: str, b: str) -> None:
    pa, pb = cache.path(a), cache.path(b)
    tmp = pa + ".swap"
    os.rename(pa, tmp)
    os.makedirs(os.path.dirname(pb), exist_ok=True)
    os.rename(pb, pa)
    os.makedirs(os.path.dirname(pa), exist_ok=True)
    os.rename(tmp, pb)


@settings(max_examples=10, deadline=None)
@given(a=st.binary(min_size=1, max_size=16), b=st.binary(min_size=1, max_size=16), same_prefix=st.booleans())
def test_swapped_entries_are_evicted_not_served(a: bytes, b: bytes, same_prefix: bool) -> None:
    """Before: both checksums stayed valid, so each key loaded the other's artifact."""
    root = bh.fresh_cache_dir("swap")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch._inductor.CompiledArtifact, "load",
                   staticmethod(lambda *, path, format="binary": FakeArtifact(open(path, "rb").read())))
        cache = ArtifactCache(root)
        ka = hashlib.sha256(a + b"a").hexdigest()
        kb = (ka[:2] if same_prefix else "") + hashlib.sha256(b + b"b").hexdigest()[(2 if same_prefix else 0):]
        assert cache.store(ka, FakeArtifact(b"A" + a), {}) and cache.store(kb, FakeArtifact(b"B" + b), {})
        swap_entries(cache, ka, kb)
        assert cache.load(ka) is None and cache.load(kb) is None
        assert not os.path.exists(cache.path(ka)) and not os.path.exists(cache.path(kb)), "mismatched entries are evicted"
        assert cache.store(ka, FakeArtifact(b"A" + a), {}) and cache.load(ka).artifact.payload == b"A" + a
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_swapped_real_entries_are_evicted(cold: bh.Compiled, layerpass_log) -> None:
    root = bh.fresh_cache_dir("swap-real")
    shutil.copytree(cold.cache_dir, root, dirs_exist_ok=True)
    keys = [os.path.basename(e) for e in entries(root)][:2]
    cache = ArtifactCache(root)
    swap_entries(cache, *keys)
    assert cache.load(keys[0]) is None and cache.load(keys[1]) is None
    warnings = layerpass_log()
    assert len(warnings) == 2 and all("belongs to key" in w for w in warnings), warnings


@pytest.mark.slow  # a real compile (~10 s)
def test_compile_with_an_unwritable_cache_dir_succeeds(tmp_path, layerpass_log) -> None:
    """The compile goes on without the cache, with one warning; the output is right."""
    cache_dir = unwritable_roots(tmp_path)["a file"]
    c = bh.compile_zoo("llama", 2, cache_dir=cache_dir)
    bh.assert_matches(c.out, c.ref)
    assert c.report.num_compiled == c.report.num_unique_pieces > 0
    warnings = [w for w in layerpass_log() if "cache" in w]
    assert len(warnings) == 1 and cache_dir in warnings[0], warnings
