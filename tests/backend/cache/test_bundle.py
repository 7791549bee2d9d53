"""Bundles: a model's programs and pieces in one tar, every member sealed; importing refuses what
does not verify (altered, renamed, another secret, not a plain cache file) and writes the rest.

The cache here is laid out by hand (the files' bytes do not matter to a bundle); a real model's
bundle carried to another machine is in ``test_shared_cache.py``."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from types import SimpleNamespace

import pytest

from layerpass.backend.cache.bundle import BundleError, all_names, bundle_names, export_bundle, import_bundle
from layerpass.backend.cache.location import CacheLocation, iter_files
from layerpass.backend.cache.private_files import atomic_write
from layerpass.backend.cache.remote_store import seal

SECRET = b"bundle-secret"
PIECES = ["aa" + "1" * 62, "bb" + "2" * 62]
PROGRAM = "programs/fam-model/classkey"


def fake_store(root: str) -> SimpleNamespace:
    """A cache with one model: two saved regions calling two pieces, and one unrelated piece."""
    for key in [*PIECES, "cc" + "3" * 62]:
        atomic_write(os.path.join(root, "artifacts", key[:2], key, "artifact.bin"), os.urandom(64))
        atomic_write(os.path.join(root, "artifacts", key[:2], key, "meta.json"), json.dumps({"key": key}).encode())
    atomic_write(os.path.join(root, "programs", "fam-model", "parts.json"), b"{}")
    for i, pieces in enumerate([PIECES[:1], PIECES]):
        atomic_write(os.path.join(root, PROGRAM, f"r{i}.bin"), os.urandom(32))
        atomic_write(os.path.join(root, PROGRAM, f"r{i}.json"), json.dumps({"pieces": pieces}).encode())
    return SimpleNamespace(location=CacheLocation(root), name="programs/fam-model")


def contents(root: str) -> dict[str, bytes]:
    out = {}
    for name in [*iter_files(root, "artifacts"), *iter_files(root, "programs")]:
        with open(os.path.join(root, name), "rb") as f:
            out[name] = f.read()
    return out


def test_export_then_import_copies_exactly_the_models_files(tmp_path):
    store = fake_store(str(tmp_path / "a"))
    names = bundle_names(store)
    assert not any(n.startswith("artifacts/cc") for n in names)  # not called by the model's programs
    assert names.index(f"{PROGRAM}/r0.bin") < names.index(f"{PROGRAM}/r0.json")  # a header after its payload
    assert all(n.startswith("artifacts/") for n in names[:4])  # pieces before the programs calling them
    report = export_bundle(store.location, names, str(tmp_path / "b.tar"), SECRET)
    assert report.files == len(names) == 9
    imported = import_bundle(str(tmp_path / "b.tar"), CacheLocation(str(tmp_path / "b")), SECRET)
    assert imported.files == 9 and not imported.refused
    a, b = contents(str(tmp_path / "a")), contents(str(tmp_path / "b"))
    assert b == {n: a[n] for n in names}
    for dirpath, dirs, files in os.walk(tmp_path / "b"):
        assert all(os.stat(os.path.join(dirpath, f)).st_mode & 0o777 == 0o600 for f in files)
        assert all(os.stat(os.path.join(dirpath, d)).st_mode & 0o777 == 0o700 for d in dirs)


def test_without_a_secret_nothing_is_exported_or_imported(tmp_path):
    store = fake_store(str(tmp_path / "a"))
    with pytest.raises(BundleError, match="LAYERPASS_CACHE_SECRET"):
        export_bundle(store.location, bundle_names(store), str(tmp_path / "b.tar"), None)
    export_bundle(store.location, bundle_names(store), str(tmp_path / "b.tar"), SECRET)
    with pytest.raises(BundleError, match="LAYERPASS_CACHE_SECRET"):
        import_bundle(str(tmp_path / "b.tar"), CacheLocation(str(tmp_path / "b")), b"")


def test_a_model_without_saved_programs_or_with_a_missing_piece_is_named(tmp_path):
    store = fake_store(str(tmp_path / "a"))
    os.remove(os.path.join(str(tmp_path / "a"), "artifacts", "bb", PIECES[1], "artifact.bin"))
    with pytest.raises(BundleError, match=f"compiled piece {PIECES[1][:12]}"):
        bundle_names(store)
    empty = SimpleNamespace(location=CacheLocation(str(tmp_path / "none")), name="programs/fam-model")
    with pytest.raises(BundleError, match="no saved program"):
        bundle_names(empty)


def _rewrite(src: str, dst: str, edit) -> None:
    """Copy the tar ``src`` to ``dst`` with ``edit(name, data) -> (name, data) | None`` on each member."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin:
            got = edit(m.name, tin.extractfile(m).read())
            if got is not None:
                info = tarfile.TarInfo(got[0])
                info.size = len(got[1])
                tout.addfile(info, io.BytesIO(got[1]))


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "rename", "another secret"])
def test_a_damaged_member_is_refused_and_never_written(tmp_path, damage, caplog):
    store = fake_store(str(tmp_path / "a"))
    export_bundle(store.location, bundle_names(store), str(tmp_path / "b.tar"), SECRET)
    target = f"{PROGRAM}/r1.bin"

    def edit(name, data):
        if name != target:
            return name, data
        if damage == "flip a byte":
            return name, data[:-1] + bytes([data[-1] ^ 1])
        if damage == "truncate":
            return name, data[:-5]
        if damage == "rename":
            return f"{PROGRAM}/r9.bin", data
        return name, seal(b"another", name, os.urandom(32))

    _rewrite(str(tmp_path / "b.tar"), str(tmp_path / "bad.tar"), edit)
    with caplog.at_level(logging.WARNING, logger="layerpass"):
        report = import_bundle(str(tmp_path / "bad.tar"), CacheLocation(str(tmp_path / "b")), SECRET)
    assert len(report.refused) == 1 and report.files == 8
    assert not os.path.exists(tmp_path / "b" / PROGRAM / "r1.bin") and not os.path.exists(tmp_path / "b" / PROGRAM / "r9.bin")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "refused" in warnings[0]


@pytest.mark.parametrize("name", ["../evil", "/etc/evil", "artifacts/../../evil", "other/x/y", "artifacts/x"])
def test_members_outside_the_cache_layout_are_refused(tmp_path, name):
    with tarfile.open(tmp_path / "evil.tar", "w") as tar:
        sealed = seal(SECRET, name, b"code")
        info = tarfile.TarInfo(name)
        info.size = len(sealed)
        tar.addfile(info, io.BytesIO(sealed))
        link = tarfile.TarInfo("programs/fam/x/link.json")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    report = import_bundle(str(tmp_path / "evil.tar"), CacheLocation(str(tmp_path / "c")), SECRET)
    assert len(report.refused) == 2 and report.files == 0
    assert not os.path.exists(tmp_path / "evil") and not os.path.exists(tmp_path / "c" / "programs")


def test_not_a_tar_is_a_clear_error(tmp_path):
    (tmp_path / "x.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(BundleError, match="not a layerpass bundle"):
        import_bundle(str(tmp_path / "x.tar"), CacheLocation(str(tmp_path / "c")), SECRET)


def test_all_exports_every_complete_entry(tmp_path):
    store = fake_store(str(tmp_path / "a"))
    os.makedirs(tmp_path / "a" / "artifacts" / "dd" / ("dd" * 32))  # an entry without meta.json: incomplete
    atomic_write(str(tmp_path / "a" / "artifacts" / "dd" / ("dd" * 32) / "artifact.bin"), b"half")
    names = all_names(store.location)
    assert any(n.startswith("artifacts/cc") for n in names) and not any(n.startswith("artifacts/dd") for n in names)
    assert len(names) == len(bundle_names(store)) + 2
    with pytest.raises(BundleError, match="no saved program"):
        all_names(CacheLocation(str(tmp_path / "none")))
