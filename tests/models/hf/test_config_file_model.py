"""``build_model("hf-config:PATH", num_layers=n)``: a Hugging Face config file (or a checkpoint
directory holding one) as a zoo model, random weights at its widths, ``n`` decoder layers; the name
the bench's ``--hf-config`` and ``layerpass step-time --hf-config`` use."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from layerpass.bench.config import check_models  # noqa: E402
from layerpass.models import build_model, make_step  # noqa: E402

CONFIG = {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 96, "num_hidden_layers": 24, "max_position_embeddings": 128,
          "layer_types": ["full_attention"] * 24}


@pytest.mark.parametrize("as_directory", [False, True])
def test_a_config_file_builds_with_the_layer_count_asked_for(tmp_path, as_directory: bool) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(CONFIG))
    model = build_model(f"hf-config:{tmp_path if as_directory else path}", num_layers=3)
    assert len(model.model.layers) == 3 and model.hf_config.num_hidden_layers == 3
    assert len(model.hf_config.layer_types) == 3  # per-layer lists follow the count
    step = make_step(model, num_decodes=1, prefill_lens=[4])
    try:
        out = step.run()
    finally:
        step.release()
    assert out.shape == (5, 96) and torch.isfinite(out).all()


def test_a_missing_config_is_named(tmp_path) -> None:
    with pytest.raises(ValueError, match="no such file or directory"):
        check_models([f"hf-config:{tmp_path / 'nope.json'}"])
    with pytest.raises(ValueError, match=r"unknown model\(s\) \['hf-nope'\].*or a name starting with hf-config:"):
        check_models(["hf-nope"])
