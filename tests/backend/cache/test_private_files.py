"""The cache dir is code: a dir others can write is never loaded from, and layerpass writes it private."""

from __future__ import annotations

import logging
import os
import stat

import pytest

from layerpass.backend.cache.private_files import atomic_write, atomic_write_dir, make_private_dirs, untrusted_reason
from tests.helpers import backend as bh

NOBODY = 65534


def modes(root: str) -> set[tuple[str, int]]:
    """(kind, mode) of everything under ``root`` (locks included)."""
    out = set()
    for dirpath, dirs, files in os.walk(root):
        out |= {("dir", stat.S_IMODE(os.stat(os.path.join(dirpath, d)).st_mode)) for d in dirs}
        out |= {("file", stat.S_IMODE(os.stat(os.path.join(dirpath, f)).st_mode)) for f in files}
    return out


def test_untrusted_reason_names_the_fix(tmp_path):
    d = tmp_path / "c"
    d.mkdir(mode=0o700)
    assert untrusted_reason(str(d)) is None
    assert untrusted_reason(str(tmp_path / "absent")) is None
    os.chmod(d, 0o777)
    assert "chmod -R go-w" in untrusted_reason(str(d)) and "others" in untrusted_reason(str(d))
    os.chmod(d, 0o770)
    assert "its group" in untrusted_reason(str(d))
    if os.geteuid() == 0:
        os.chmod(d, 0o700)
        os.chown(d, NOBODY, NOBODY)
        assert f"owned by uid {NOBODY}" in untrusted_reason(str(d)) and "chown" in untrusted_reason(str(d))


def test_private_writes_ignore_the_umask(tmp_path):
    old = os.umask(0)
    try:
        make_private_dirs(str(tmp_path / "a" / "b"))
        atomic_write(str(tmp_path / "a" / "b" / "f"), b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "a" / "b").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "a" / "b" / "f").st_mode) == 0o600


def test_atomic_write_takes_a_writer_and_leaves_nothing_on_failure(tmp_path):
    """A writer function (a bundle's tar stream) writes the file; one that fails leaves the old file
    and no temporary behind."""
    path = str(tmp_path / "f")
    atomic_write(path, lambda f: f.write(b"streamed"))
    assert open(path, "rb").read() == b"streamed" and stat.S_IMODE(os.stat(path).st_mode) == 0o600

    def broken(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert open(path, "rb").read() == b"streamed" and os.listdir(tmp_path) == ["f"]


def _write_files(**files: bytes):
    def fill(tmp: str) -> None:
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as f:  # plain open: the umask's modes
                f.write(data)
    return fill


def test_atomic_write_dir_appears_whole_private_and_keeps_or_replaces_a_clash(tmp_path):
    """A directory entry appears in one rename, 0700 with 0600 files whatever the umask; a clash with
    an existing entry keeps it or replaces it as ``keep_existing`` says; a failing fill leaves
    nothing, not even its temporary."""
    entry = str(tmp_path / "cache" / "entry")
    old = os.umask(0)
    try:
        assert atomic_write_dir(entry, _write_files(a=b"1", b=b"2"))
    finally:
        os.umask(old)
    assert sorted(os.listdir(entry)) == ["a", "b"] and stat.S_IMODE(os.stat(entry).st_mode) == 0o700
    assert all(stat.S_IMODE(os.stat(os.path.join(entry, n)).st_mode) == 0o600 for n in "ab")

    seen = []
    assert not atomic_write_dir(entry, _write_files(c=b"3"), keep_existing=lambda p: seen.append(p) or True)
    assert seen == [entry] and sorted(os.listdir(entry)) == ["a", "b"]  # theirs kept
    assert atomic_write_dir(entry, _write_files(c=b"3"), keep_existing=lambda p: False)
    assert os.listdir(entry) == ["c"]  # theirs was broken: replaced

    def broken(tmp: str) -> None:
        _write_files(half=b"x")(tmp)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_dir(str(tmp_path / "cache" / "other"), broken)
    assert os.listdir(tmp_path / "cache") == ["entry"]


def test_a_compile_writes_only_private_files():
    c = bh.compile_zoo("llama", 2)
    assert c.report.num_compiled > 0
    assert modes(c.cache_dir) <= {("dir", 0o700), ("file", 0o600)}, modes(c.cache_dir)
    assert stat.S_IMODE(os.stat(c.cache_dir).st_mode) == 0o700


@pytest.mark.parametrize("how", ["chmod 777", "owned by another user"])
def test_an_untrusted_cache_dir_is_not_loaded_from(how, caplog):
    if how == "owned by another user" and os.geteuid() != 0:
        pytest.skip("chown to another user needs root (CI runs as root)")
    warm = bh.compile_zoo("llama", 2)
    assert warm.report.num_compiled > 0
    again = bh.compile_zoo("llama", 2, cache_dir=warm.cache_dir)
    assert again.report.num_compiled == 0 and again.report.warm_start == "loaded"  # a trusted dir serves
    if how == "chmod 777":
        os.chmod(warm.cache_dir, 0o777)
        fix = "chmod -R go-w"
    else:
        os.chown(warm.cache_dir, NOBODY, NOBODY)
        fix = "chown -R"
    with caplog.at_level(logging.WARNING, logger="layerpass"):
        c = bh.compile_zoo("llama", 2, cache_dir=warm.cache_dir)
    assert c.report.num_compiled == c.report.num_unique_pieces > 0 and c.report.num_cache_hits == 0
    assert c.report.warm_start.startswith("fallback: the cache dir")
    bh.assert_matches(c.out, c.ref)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warm.cache_dir in warnings[0] and fix in warnings[0], warnings
