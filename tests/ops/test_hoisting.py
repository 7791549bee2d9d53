"""Layer names hoisted to graph inputs: N identical blocks compile to ONE Dynamo graph.

Each block's ``forward`` builds ``encode_layer_name(prefix)`` itself (the design choice in
``ops/layer_name.py``: a name built in forward is hoisted without a per-layer guard). With
the switch on, every layer-name argument of an op is a graph placeholder and no ``str``
constant reaches an op; with ``VLLM_USE_LAYERNAME=0`` (a subprocess: the switch is read at
import) the names are ``str`` constants baked into the graph. ``summarize`` is shared by
both: the subprocess imports this module and prints its result as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import fx, nn

from tests.helpers import reference as ref
from layerpass.envs import USE_LAYERNAME
from layerpass.ops import (
    LayerName,
    LayerRegistry,
    build_batch_metadata,
    current_registry,
    encode_layer_name,
    layer_registry_scope,
    set_forward_context,
)
from layerpass.ops.library import op_name

ops = torch.ops.layerpass
HIDDEN, HQ, HKV, HEAD, EXPERTS, INTER, BLOCK = 16, 4, 2, 4, 4, 8, 4
LAYER_NAME_ARG = {"layerpass.unified_attention_with_output": 4, "layerpass.moe_forward_shared": 2}


class Block(nn.Module):
    """norm -> attention (paged KV) -> add+norm -> MoE with a shared expert."""

    def __init__(self, prefix: str, num_blocks: int) -> None:
        super().__init__()
        self.prefix = prefix
        self.input_norm = nn.Parameter(1 + 0.1 * torch.randn(HIDDEN))
        self.post_norm = nn.Parameter(1 + 0.1 * torch.randn(HIDDEN))
        self.qkv = nn.Linear(HIDDEN, (HQ + 2 * HKV) * HEAD)
        self.o_proj = nn.Linear(HQ * HEAD, HIDDEN)
        self.router = nn.Linear(HIDDEN, EXPERTS)
        self.attn = ref.AttnLayer(f"{prefix}.self_attn.attn", num_blocks, BLOCK, HKV, HEAD)
        self.attn.kv_cache.normal_()
        self.experts = ref.MoELayer(f"{prefix}.mlp.experts", EXPERTS, HIDDEN, INTER, top_k=2, renormalize=True,
                                    shared_inter=INTER)
        registry = current_registry()  # the model's, opened by build()
        registry.register(self.attn.prefix, self.attn)
        registry.register(self.experts.prefix, self.experts)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = ops.fused_add_rms_norm(x, residual, self.input_norm, 1e-6)
        q, k, v = self.qkv(h).split([HQ * HEAD, HKV * HEAD, HKV * HEAD], dim=-1)
        t = h.shape[0]
        out = torch.empty(t, HQ, HEAD, dtype=h.dtype)
        ops.unified_attention_with_output(q.reshape(t, HQ, HEAD), k.reshape(t, HKV, HEAD), v.reshape(t, HKV, HEAD),
                                          out, encode_layer_name(self.attn.prefix))
        h, residual = ops.fused_add_rms_norm(self.o_proj(out.reshape(t, HQ * HEAD)), residual, self.post_norm, 1e-6)
        routed, shared = ops.moe_forward_shared(h, self.router(h), encode_layer_name(self.experts.prefix))
        return routed + shared, residual


class Stack(nn.Module):
    def __init__(self, num_layers: int, num_blocks: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(f"model.layers.{i}", num_blocks) for i in range(num_layers))
        self.norm = nn.Parameter(torch.ones(HIDDEN))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = torch.zeros_like(x)
        for layer in self.layers:
            x, residual = layer(x, residual)
        return ops.fused_add_rms_norm(x, residual, self.norm, 1e-6)[0]


def build(num_layers: int, seed: int = 0) -> tuple[Stack, LayerRegistry]:
    torch.manual_seed(seed)
    with layer_registry_scope(LayerRegistry(f"stack-{num_layers}")) as registry:
        model = Stack(num_layers, num_blocks=8)
    return model, registry


# Two decode-first batches with the same token count (8) but different requests.
BATCHES = [
    ([1, 1, 4, 2], [3, 6, 0, 5], [[0], [1, 2], [3], [4, 5]]),
    ([1, 3, 4], [9, 0, 2], [[6, 7, 0], [1], [2, 3]]),
]


def summarize(num_layers: int) -> dict[str, Any]:
    """Compile ``Stack(num_layers)`` with a recording backend, run both batches; describe the graphs."""
    torch.compiler.reset()
    model, registry = build(num_layers)
    graphs: list[tuple[fx.GraphModule, list[Any]]] = []

    def record(gm: fx.GraphModule, example_inputs: list[Any]):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    compiled = torch.compile(model, backend=record)
    max_diff = 0.0
    for q_lens, c_lens, tables in BATCHES:
        x = torch.randn(sum(q_lens), HIDDEN)
        with set_forward_context(build_batch_metadata(q_lens, c_lens, tables, BLOCK), registry):
            got = compiled(x)
            want = model(x)
        max_diff = max(max_diff, (got - want).abs().max().item())

    layer_name_args: list[list[str]] = []  # [kind, name] per op call, in graph order
    str_constants: list[str] = []
    for gm, example_inputs in graphs:
        placeholder_value = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], example_inputs))
        for node in gm.graph.nodes:
            name = op_name(node.target) if node.op == "call_function" else None  # Dynamo records the packet
            if name is None or not name.startswith("layerpass."):
                continue
            fx.node.map_aggregate((node.args, node.kwargs),
                                  lambda a: str_constants.append(a) if isinstance(a, str) else None)
            if name in LAYER_NAME_ARG:
                arg = node.args[LAYER_NAME_ARG[name]]
                if isinstance(arg, fx.Node):
                    value = placeholder_value.get(arg)
                    kind = "placeholder" if arg.op == "placeholder" and isinstance(value, LayerName) else f"node:{arg.op}"
                    layer_name_args.append([kind, value.value if isinstance(value, LayerName) else repr(value)])
                else:
                    layer_name_args.append([f"const:{type(arg).__name__}", str(arg)])
    return {
        "use_layername": USE_LAYERNAME,
        "num_graphs": len(graphs),
        "layer_name_args": layer_name_args,
        "str_constants": str_constants,
        "max_diff": max_diff,
    }


def expected_names(num_layers: int) -> list[str]:
    return [n for i in range(num_layers) for n in (f"model.layers.{i}.self_attn.attn", f"model.layers.{i}.mlp.experts")]


@pytest.mark.skipif(not USE_LAYERNAME, reason="needs the LayerName switch on (torch 2.11+)")
@pytest.mark.parametrize("num_layers", [1, 4])
def test_switch_on_one_graph_names_are_placeholders(num_layers: int) -> None:
    s = summarize(num_layers)
    assert s["num_graphs"] == 1  # no graph break, and the second batch did not recompile
    assert s["layer_name_args"] == [["placeholder", n] for n in expected_names(num_layers)]
    assert s["str_constants"] == []
    assert s["max_diff"] == 0.0


@pytest.mark.slow
def test_switch_off_names_are_str_constants(tmp_path: Path) -> None:
    script = tmp_path / "switch_off.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(Path(__file__).parents[2])!r})
        from tests.ops import test_hoisting
        print("SUMMARY", json.dumps(test_hoisting.summarize(3)))
    """))
    env = {**os.environ, "VLLM_USE_LAYERNAME": "0"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("SUMMARY ")]
    s = json.loads(line.removeprefix("SUMMARY "))
    assert s["use_layername"] is False
    assert s["num_graphs"] == 1
    assert s["layer_name_args"] == [["const:str", n] for n in expected_names(3)]
    assert s["str_constants"] == expected_names(3)
    assert s["max_diff"] == 0.0


def test_inductor_matches_eager() -> None:
    torch.compiler.reset()
    model, registry = build(2, seed=1)
    compiled = torch.compile(model, backend="inductor")
    for q_lens, c_lens, tables in BATCHES:
        x = torch.randn(sum(q_lens), HIDDEN)
        with set_forward_context(build_batch_metadata(q_lens, c_lens, tables, BLOCK), registry), torch.no_grad():
            got = compiled(x)
            want = model(x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
