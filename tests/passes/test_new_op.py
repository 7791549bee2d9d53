"""Adding an op is a one-file change: an op defined here, with ``layerpass_op(..., lowers=True)`` and
nothing else edited, is lowered by the lowering pass (its native code inlined, its check asked on
fake sizes), is a ``custom_ops`` name, and its native code is in the pass's uuid."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from layerpass.backend.config import CompilationConfig
from layerpass.ops.library import OPS, layerpass_op, lowerable_ops
from layerpass.passes.lowering import LoweringPass
from tests.helpers import fusion as fh

NAME = "test_scaled_tanh"


def check_scaled_tanh(x: torch.Tensor, factor: float) -> None:
    if factor <= 0:
        raise ValueError(f"{NAME}: factor must be > 0, got {factor}")


_registered: dict[str, object] = {}  # torch keeps a registered op for the process: define it once


@pytest.fixture
def new_op() -> Iterator[str]:
    """The op in the op table for this test only (other tests see the ops of ``ops/``)."""
    if NAME not in _registered:

        @layerpass_op(NAME, fake=lambda x, factor: torch.empty_like(x), check=check_scaled_tanh, lowers=True)
        def scaled_tanh(x: torch.Tensor, factor: float) -> torch.Tensor:
            return torch.tanh(x) * factor

        _registered[NAME] = OPS[NAME]
    OPS[NAME] = _registered[NAME]
    try:
        yield NAME
    finally:
        OPS.pop(NAME)


class UsesIt(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(torch.ops.layerpass, NAME)(x, 3.0) + 1


def test_a_new_op_lowers_with_no_other_edit(new_op: str) -> None:
    assert new_op in lowerable_ops() and new_op in CompilationConfig().lowered_ops()
    assert new_op not in CompilationConfig(custom_ops=(f"+{new_op}",)).lowered_ops()
    x = torch.randn(4, 8)
    cap = fh.capture_graph(UsesIt(), [x])
    lowered, matches = fh.apply_passes(cap.gm, [LoweringPass([new_op])])
    assert matches["lowering"] == 1
    assert not [n for n in lowered.graph.nodes if "layerpass" in str(n.target)], lowered.graph
    torch.testing.assert_close(cap.run(lowered), torch.tanh(x) * 3.0 + 1)
    assert __name__ in LoweringPass([new_op]).hashed_modules()  # its native code keys the caches


def test_a_new_op_check_refuses_the_lowering(new_op: str) -> None:
    """The op's own check decides: arguments it refuses keep the op (which raises its error)."""
    cap = fh.capture_graph(UsesIt(), [torch.randn(4, 8)])
    (node,) = [n for n in cap.gm.graph.nodes if "layerpass" in str(n.target)]
    node.args = (node.args[0], -3.0)  # what the native code would compute, but the check refuses
    _, matches = fh.apply_passes(cap.gm, [LoweringPass([new_op])])
    assert matches["lowering"] == 0
