"""The attention dry run's recorder: each conversion records its own calls, one at a time, and the
probe implementation refuses to run outside a dry run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layerpass.models.hf.attention_dry_run import AttentionRecorder, probe_attention

QUERY, KEY = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)  # [1, heads, tokens, head_size]


def test_the_probe_runs_only_inside_a_dry_run() -> None:
    with pytest.raises(RuntimeError, match="only runs inside from_transformers' dry run"):
        probe_attention(nn.Identity(), QUERY, KEY, KEY, None)


def test_each_recorder_keeps_its_own_calls() -> None:
    module, first, second = nn.Identity(), AttentionRecorder(), AttentionRecorder()
    with first.recording() as calls:
        out, weights = probe_attention(module, QUERY, KEY, KEY, None, scaling=0.5)
        with pytest.raises(RuntimeError, match="not re-entrant"), second.recording():
            pass
    assert out.shape == (1, 3, 4, 8) and weights is None and not out.any()
    assert calls is first.calls and second.calls == []
    (call,) = calls
    assert (call.module, call.num_heads, call.num_kv_heads, call.head_size, call.value_head_size) == (module, 4, 2, 8, 8)
    assert call.kwargs == {"scaling": 0.5}
    with pytest.raises(RuntimeError, match="only runs inside"):  # the block is over: nothing records
        probe_attention(module, QUERY, KEY, KEY, None)
