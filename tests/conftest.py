"""Shared test setup (session-wide state lives here, not in the helpers' imports).

- One intra-op thread per test process: the machine's 2 cores are shared (and ``pytest -n 2``
  runs two workers); with more threads tiny matmuls slow down by ~100x from oversubscription.
- One Inductor cache dir per session (``tests.helpers.backend.session_inductor_dir``), also
  handed to the tests' subprocesses.
- ``redis_server``: a real ``redis-server`` of the test's own on a free loopback port
  (``tests.helpers.redis_server``; fails under CI, skips elsewhere, when it is not installed).
- Dynamo's recompile limits, raised once: one test process compiles many models whose forward
  is the same code object, and every ``layerpass.compile`` is a new backend that Dynamo counts
  against the per-code-object limit (8); past it Dynamo would silently fall back to eager.
"""

from __future__ import annotations

import os
import shutil
from unittest import mock

import pytest
import torch

from tests.helpers import backend as bh
from tests.helpers.redis_server import running_redis

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def inductor_cache_dir():
    """Points Inductor (``TORCHINDUCTOR_CACHE_DIR``, read on every cache access) and the tests'
    subprocesses (``bh.SESSION_ENV``) at the session's cache dir; removed at the end if owned."""
    path, owned = bh.session_inductor_dir()
    with mock.patch.dict(os.environ, {bh.SESSION_ENV: path, "TORCHINDUCTOR_CACHE_DIR": path}):
        yield path
    if owned:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def recompile_limits():
    with torch._dynamo.config.patch(recompile_limit=256, accumulated_recompile_limit=1024):
        yield


@pytest.fixture
def clean_oot():
    """Restore the out-of-tree and in-tree layer registries after a test that registers classes."""
    from layerpass.layers import pluggable

    in_tree, oot = dict(pluggable._IN_TREE), dict(pluggable._OOT)
    yield pluggable
    for name in set(pluggable._IN_TREE) - set(in_tree):
        pluggable.unregister_in_tree(name)
    pluggable._OOT.clear()
    pluggable._OOT.update(oot)


@pytest.fixture
def redis_server():
    """A started ``RedisServer`` (``.url``, ``.port``, ``.client()``, ``.stop()``, ``.start()``), stopped after the test."""
    with running_redis() as server:
        yield server
