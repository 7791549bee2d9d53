"""The conversion's numeric probes: an answer once per module class, False for a module that cannot
run the probe's input, and any other error raised (not mistaken for "computes something else")."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import layerpass.ops  # noqa: F401  (registers the ops the probes compare with)
from layerpass.models.hf.probes import CANNOT_RUN, PACKED_CANNOT_RUN, Probes, is_silu_mlp, runs_on_packed


class SiluMLP(nn.Module):
    def __init__(self, hidden: int = 8, inter: int = 12, reads_weight: bool = False) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(hidden, inter), nn.Linear(hidden, inter)
        self.down_proj = nn.Linear(inter, hidden)
        self.reads_weight = reads_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reads_weight:  # as a forward calling F.linear with its projections' weights
            x = x.to(self.gate_proj.weight.dtype)
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def test_a_probe_runs_once_per_module_class() -> None:
    probes, runs = Probes(), []
    assert probes.run("kind", nn.Linear(2, 2), lambda: runs.append(1) or "rms") == "rms"
    assert probes.run("kind", nn.Linear(3, 3), lambda: runs.append(1) or "gemma") == "rms"  # same class
    assert probes.run("other", nn.Linear(2, 2), lambda: runs.append(1) or "gemma") == "gemma"
    assert len(runs) == 2 and Probes().run("kind", nn.Linear(2, 2), lambda: False) is False  # per conversion


@pytest.mark.parametrize("error", [e("cannot run this input") for e in CANNOT_RUN])
def test_a_module_that_cannot_run_the_probe_does_not_match(error: Exception) -> None:
    def probe() -> bool:
        raise error

    assert Probes().run("silu_mlp", nn.Identity(), probe) is False


def test_any_other_error_in_a_probe_is_raised() -> None:
    with pytest.raises(KeyError, match="missing"):
        Probes().run("silu_mlp", nn.Identity(), lambda: {}["missing"])


def test_the_mlp_probes_on_a_silu_mlp() -> None:
    mlp = SiluMLP()
    weights, biases = [mlp.gate_proj.weight, mlp.up_proj.weight], [mlp.gate_proj.bias, mlp.up_proj.bias]
    with torch.no_grad():
        assert is_silu_mlp(mlp, weights, biases, torch.float32) and runs_on_packed(mlp, torch.float32)


def test_a_forward_reading_a_projection_weight_does_not_run_on_packed() -> None:
    """The packed probe hands the forward ``PackedSlice``s, which have no weight: expected there only."""
    mlp = SiluMLP(reads_weight=True)
    assert Probes().run("packed_mlp", mlp, lambda: runs_on_packed(mlp, torch.float32), PACKED_CANNOT_RUN) is False
    with pytest.raises(AttributeError, match="weight"):
        Probes().run("packed_mlp", mlp, lambda: runs_on_packed(mlp, torch.float32))
    assert isinstance(mlp.gate_proj, nn.Linear)  # the probe put the projections back
