"""Shared test setup.

One intra-op thread per test process: the machine's 2 cores are shared (and ``pytest -n 2``
runs two workers); with more threads tiny matmuls slow down by ~100x from oversubscription.
"""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)
# One test process compiles many models whose forward is the same code object; Dynamo's
# default limit (8 per code object) would silently fall back to eager after the 8th.
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 1024)


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
