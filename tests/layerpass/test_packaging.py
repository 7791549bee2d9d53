"""The wheel works on its own: built from a clean copy of the tree, installed with
``--no-deps`` into a target dir, and imported from there (not from the editable checkout)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# what a fresh clone would not have (and what the build must not pick up)
IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis",
                                ".pytest_cache", "bench-results", ".whl")
PACKAGES = ["ops", "layers", "models", "passes", "patterns", "backend", "bench"]


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("build", reason="install the `build` package (.venv/bin/pip install build)")
    src = tmp_path_factory.mktemp("src") / "layerpass"
    shutil.copytree(ROOT, src, ignore=IGNORE)  # build outside the shared checkout
    out = tmp_path_factory.mktemp("dist")
    # --skip-dependency-check: pyproject still lists `wheel` in build-system.requires, which
    # setuptools >= 70.1 no longer needs and the venv does not have (offline: no isolation).
    run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--skip-dependency-check", "--outdir", str(out), str(src)])
    (whl,) = out.glob("layerpass-*.whl")
    return whl


def test_wheel_contains_every_mapped_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "layerpass/__init__.py" in names and "layerpass/envs.py" in names
    for pkg in PACKAGES:
        assert f"layerpass/{pkg}/__init__.py" in names, f"layerpass.{pkg} ({pkg}/) missing from the wheel"
    assert "layerpass/ops/attention.py" in names and "layerpass/ops/library.py" in names
    assert not any(n.startswith(("tests/", "ops/")) for n in names)  # only the mapped namespace


def test_installed_wheel_imports_and_runs(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)])
    code = textwrap.dedent("""
        import torch, layerpass, layerpass.ops as ops
        print(ops.__file__)
        print(layerpass.__version__)
        x, w = torch.randn(3, 8), torch.rand(8)
        out = torch.ops.layerpass.rms_norm(x, w, 1e-6)
        expected = x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * w
        print(torch.allclose(out, expected, atol=1e-6))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}
    proc = run([sys.executable, "-c", code], env=env, cwd=tmp_path)
    ops_file, version, ok = proc.stdout.split()
    assert Path(ops_file).resolve().is_relative_to(target.resolve()), ops_file
    assert version == "0.1.0" and ok == "True"
