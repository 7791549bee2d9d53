"""Piecewise split and identical-pieces-compile-once.

- Compiled llama (2 and 8 layers) and moe (8 layers) match eager.
- ``layerpass.compile`` compiles per decoder layer (regions; the embedding and LM head run as the
  model's eager code): one piece per layer. With the switch on, unique compiled pieces do not
  grow with layers (2 for llama: the first layer, which has no residual yet, and the rest); with
  ``VLLM_USE_LAYERNAME=0`` (a subprocess, the switch is read at import) every layer's piece is unique.
- ``split="ops"`` runs the attention ops eagerly between compiled pieces.
- The splitter and the structural hash on their own (Dynamo graphs, no Inductor: cheap).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

from tests.helpers import backend as bh
from layerpass.backend.piece_hash import piece_signature
from layerpass.backend.split import find_layer_container, split_by_layers, split_by_ops


@pytest.fixture(scope="module")
def llama2() -> bh.Compiled:
    return bh.compiled_zoo("llama", 2)


@pytest.fixture(scope="module")
def llama8() -> bh.Compiled:
    return bh.compiled_zoo("llama", 8)


def _layer_keys(report) -> dict[int, str]:
    return {p.layer: p.key for p in report.pieces if p.layer is not None}


@pytest.mark.parametrize("layers", [2, 8])
def test_llama_matches_eager(layers: int, request) -> None:
    c = request.getfixturevalue(f"llama{layers}")
    bh.assert_matches(c.out, c.ref, f"llama-{layers}")
    assert c.compiled.recompiles == 0


@pytest.mark.parametrize("layers", [2, 8])
def test_one_piece_per_layer(layers: int, request) -> None:
    r = request.getfixturevalue(f"llama{layers}").report
    assert r.split == "layers" and r.trace == "regions"
    assert r.num_pieces == layers, r.summary()
    assert sorted(_layer_keys(r)) == list(range(layers)), [(p.name, p.layer) for p in r.pieces]
    assert r.num_eager_pieces == 0
    # a fresh cache dir: every unique piece was compiled exactly once, nothing came from the cache
    assert r.num_compiled == r.num_unique_pieces and r.num_cache_hits == 0
    assert r.num_unique_pieces == len({p.key for p in r.pieces})


def test_unique_pieces_do_not_grow_with_layers(llama2: bh.Compiled, llama8: bh.Compiled) -> None:
    import layerpass

    if not layerpass.USE_LAYERNAME:
        pytest.skip("this process runs with the layer-name switch off")
    assert llama8.report.num_unique_pieces <= 2, llama8.report.summary()
    assert llama8.report.num_unique_pieces == llama2.report.num_unique_pieces
    keys = _layer_keys(llama8.report)
    assert len({keys[i] for i in range(1, 8)}) == 1, "middle layers must share one artifact"
    # a shared piece carries no layer name as a constant: the name is a graph input
    assert not any("layers." in str(c[2]) for p in llama8.report.pieces for c in p.constants)
    sources = [p.source for p in llama8.report.pieces if p.layer is not None and p.layer >= 2]
    assert sources == ["shared"] * 6


@pytest.mark.slow
def test_moe_matches_eager_and_shares_pieces() -> None:
    c = bh.compiled_zoo("moe", 8)
    bh.assert_matches(c.out, c.ref, "moe-8")
    assert c.report.num_pieces == 8
    assert c.report.num_unique_pieces <= 2, c.report.summary()


@pytest.mark.slow
def test_switch_off_every_layer_is_unique() -> None:
    """``VLLM_USE_LAYERNAME=0``: the layer name is a str constant, so no two layers share a piece."""
    dirs = [bh.fresh_cache_dir("off2"), bh.fresh_cache_dir("off3")]
    body = f"""
    from tests.helpers import backend as bh
    import layerpass
    out = {{"use_layername": layerpass.USE_LAYERNAME}}
    for layers, d in ((2, {dirs[0]!r}), (3, {dirs[1]!r})):
        c = bh.compile_zoo("llama", layers, cache_dir=d)
        bh.assert_matches(c.out, c.ref, f"llama-{{layers}} with the switch off")
        out[str(layers)] = bh.report_dict(c.report)
    emit(out)
    """
    res = bh.run_python(body, env=bh.subprocess_env(VLLM_USE_LAYERNAME="0"), what="VLLM_USE_LAYERNAME=0 compile").result
    assert res["use_layername"] is False
    r2, r3 = res["2"], res["3"]
    assert r2["num_unique_pieces"] == 2 and r3["num_unique_pieces"] == 3, (r2["num_unique_pieces"], r3["num_unique_pieces"])
    assert r2["num_regions"] == 2 and r3["num_regions"] == 3, "each layer's name is a constant: one trace per layer"
    for r, layers in ((r2, 2), (r3, 3)):
        layer_pieces = [p for p in r["pieces"] if p["layer"] is not None]
        assert len({p["key"] for p in layer_pieces}) == layers
        for p in layer_pieces:  # each layer's piece holds its own name as a str constant
            assert any(f"layers.{p['layer']}." in c for c in p["constants"]), p


def test_split_ops_runs_attention_eagerly() -> None:
    c = bh.compiled_zoo("llama", 2, "ops")
    bh.assert_matches(c.out, c.ref, "llama-2 split='ops'")
    r = c.report
    assert r.split == "ops"
    eager = [p for p in r.pieces if p.kind == "eager"]
    assert r.num_eager_pieces == len(eager) == 2  # one attention op per layer
    assert all(p.source == "eager" and p.key is None for p in eager)
    assert r.num_pieces == 4  # compiled, per layer: before its attention and after it
    assert any("fusion" in n for n in r.notes), r.notes


# ---------------------------------------------------------------- the splitter without Inductor
def dynamo_graph(model: nn.Module, *args: torch.Tensor) -> tuple[fx.GraphModule, list]:
    """The Dynamo graph and example inputs, captured by a backend that compiles nothing."""
    captured: list = []

    def capture(gm: fx.GraphModule, example_inputs):
        captured.append((gm, list(example_inputs)))
        return gm.forward

    torch.compile(model, backend=capture, dynamic=False)(*args)
    assert len(captured) == 1, "the toy model must trace to one graph"
    return captured[0]


@settings(max_examples=5, deadline=None)
@given(layers=st.integers(2, 5), tokens=st.integers(2, 6))
def test_split_by_layers_on_a_toy_stack(layers: int, tokens: int) -> None:
    model = bh.Stack(layers, seed=layers).eval()
    x = torch.randn(tokens, 8)
    gm, inputs = dynamo_graph(model, x)
    assert find_layer_container(gm).endswith("layers")
    result = split_by_layers(gm)
    assert sorted(v for v in result.piece_layers.values() if v is not None) == list(range(layers))
    assert len(result.piece_layers) == layers + 2  # prologue (inp) and epilogue (out) too
    with torch.no_grad():
        torch.testing.assert_close(result.graph_module(*inputs)[0], model(x))
    # every layer piece is structurally identical: one key for all of them
    keys = set()

    class Sig(fx.Interpreter):
        def call_module(self, target, args, kwargs):
            if result.piece_layers.get(target) is not None:
                keys.add(piece_signature(getattr(result.graph_module, target), args).key)
            return super().call_module(target, args, kwargs)

    with torch.no_grad():
        Sig(result.graph_module).run(*inputs)
    assert len(keys) == 1


def test_split_by_ops_isolates_the_splitting_op() -> None:
    model = bh.Stack(3).eval()
    x = torch.randn(4, 8)
    gm, inputs = dynamo_graph(model, x)
    result = split_by_ops(gm, ("aten.relu",))
    assert len(result.eager_pieces) == 3
    for name in result.eager_pieces:
        nodes = [n for n in getattr(result.graph_module, name).graph.nodes if n.op == "call_function"]
        assert len(nodes) == 1 and "relu" in str(nodes[0].target)
    with torch.no_grad():
        torch.testing.assert_close(result.graph_module(*inputs)[0], model(x))


# ---------------------------------------------------------------- the structural hash
def _graph(const: str, scale: float, names: tuple[str, str]) -> fx.GraphModule:
    g = fx.Graph()
    a, b = g.placeholder(names[0]), g.placeholder(names[1])
    s = g.call_function(torch.add, (a, b), {"alpha": scale})
    t = g.call_function(torch.ops.aten.div.Tensor_mode, (s, a), {"rounding_mode": const})  # a str constant
    g.output((t,))
    return fx.GraphModule(nn.Module(), g)


@settings(max_examples=20, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    other=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_piece_hash_is_structural(shape, other, dtype) -> None:
    args = [torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)]
    base = piece_signature(_graph("floor", 1.0, ("x", "y")), args)
    # placeholder names never count
    assert piece_signature(_graph("floor", 1.0, ("p", "q")), args).key == base.key
    # a str constant counts in the key but not in the shape key, and is reported
    renamed = piece_signature(_graph("trunc", 1.0, ("x", "y")), args)
    assert renamed.key != base.key and renamed.shape_key == base.shape_key
    assert [c[2] for c in renamed.constants] == ["trunc"]
    # numeric constants, input shapes and dtypes count
    assert piece_signature(_graph("floor", 2.0, ("x", "y")), args).key != base.key
    other_args = [torch.empty(other, dtype=dtype), torch.empty(other, dtype=dtype)]
    assert (piece_signature(_graph("floor", 1.0, ("x", "y")), other_args).key == base.key) == (other == shape)
    f64 = [a.double() for a in args]
    assert piece_signature(_graph("floor", 1.0, ("x", "y")), f64).key != base.key


def test_piece_hash_rejects_wrong_arity() -> None:
    with pytest.raises(ValueError, match="2 inputs but 1 example"):
        piece_signature(_graph("floor", 1.0, ("x", "y")), [torch.empty(2)])
