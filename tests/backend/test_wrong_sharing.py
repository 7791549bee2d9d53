"""Layers that differ must never share a compiled piece (issue 13, items 1 and 12).

Item 1: the piece hash described a ``get_attr`` of a non-tensor by its type only, so the bodies
of higher-order ops (``checkpoint``'s ``tag_activation_checkpoint``, ``torch.cond``'s branches,
``flex_attention``'s ``score_mod`` / ``mask_mod``) did not count: layers differing only inside
such a body shared one artifact (wrong output), and a body edited between two processes was
served stale from the on-disk cache. Now nested graphs are hashed by structure, recursively.

- ``piece_signature`` on hand-made graphs and on Dynamo graphs split per layer (no Inductor: cheap).
- End to end, both compile paths, outputs vs eager and the report's pieces:
  ``torch.compile(model, backend=LayerpassBackend(config))`` (one graph split per layer: the
  piece hash alone decides which layers share) and ``layerpass.compile`` (regions: a float
  attribute is a region input there, so those tests use int constants, which a region bakes in
  and whose regions then share pieces only through the hash).
- Across processes: a checkpointed function's constant edited between two runs on one cache dir
  is recompiled; the unedited source is served from the cache.

Item 12: nested ``ModuleList``s (layers, each with a list of heads): the whole-model split takes
the outer list, so the report names layers and identical layers share a piece.

Each test here fails with the previous ``backend/piece_hash.py`` / ``backend/split.py``, except
``test_regions_take_the_outer_list`` (``regions.find_repeated_layers`` already took the outer list).
"""

from __future__ import annotations

import operator

import pytest
import torch
from torch import fx, nn
from torch.nn.attention.flex_attention import flex_attention
from torch.utils.checkpoint import checkpoint

from tests.helpers import backend as bh
from layerpass.backend.piece_hash import piece_signature
from layerpass.backend.split import find_layer_container, split_by_layers

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

ATOL = 1e-5


# ============================================================== hand-made graphs
def _tensor_ph(g: fx.Graph, name: str, val: torch.Tensor) -> fx.Node:
    node = g.placeholder(name)
    node.meta["val"] = val
    return node


def _body(fn, *vals: torch.Tensor, root: nn.Module | None = None) -> fx.GraphModule:
    """A HOP body: placeholders with ``meta["val"]`` (as Dynamo/AOT leave them), ``fn(graph, *phs)`` the result."""
    g = fx.Graph()
    phs = [_tensor_ph(g, f"arg{i}", v) for i, v in enumerate(vals)]
    g.output((fn(g, *phs),))
    return fx.GraphModule(root if root is not None else nn.Module(), g)


def _scale_body(k, const: str = "floor") -> fx.GraphModule:
    """relu(t) * k, then a rounding with a str constant (for the masked-key test)."""
    def fn(g, t):
        r = g.call_function(torch.ops.aten.relu.default, (t,))
        m = g.call_function(torch.ops.aten.mul.Tensor, (r, k))
        return g.call_function(torch.ops.aten.div.Tensor_mode, (m, 1.0), {"rounding_mode": const})
    return _body(fn, torch.empty(4, 8))


def _with_attrs(attrs: dict[str, object], build) -> fx.GraphModule:
    root = nn.Module()
    for name, value in attrs.items():
        setattr(root, name, value)
    g = fx.Graph()
    build(g)
    return fx.GraphModule(root, g)


def checkpoint_piece(k, const: str = "floor", x_name: str = "x") -> fx.GraphModule:
    def build(g):
        x = g.placeholder(x_name)
        body = g.get_attr("wrap_body_0")
        out = g.call_function(torch.ops.higher_order.tag_activation_checkpoint, (body, x), {"use_reentrant": False})
        g.output((g.call_function(operator.getitem, (out, 0)),))
    return _with_attrs({"wrap_body_0": _scale_body(k, const)}, build)


def cond_piece(k_true, k_false) -> fx.GraphModule:
    def build(g):
        pred, x = g.placeholder("pred"), g.placeholder("x")
        t, f = g.get_attr("cond_true_0"), g.get_attr("cond_false_0")
        out = g.call_function(torch.ops.higher_order.cond, (pred, t, f, (x,)))
        g.output((g.call_function(operator.getitem, (out, 0)),))
    true = _body(lambda g, t: g.call_function(torch.ops.aten.mul.Tensor, (t, k_true)), torch.empty(4, 8))
    false = _body(lambda g, t: g.call_function(torch.ops.aten.sub.Tensor, (t, k_false)), torch.empty(4, 8))
    return _with_attrs({"cond_true_0": true, "cond_false_0": false}, build)


def flex_piece(temperature, window) -> fx.GraphModule:
    i = torch.empty((), dtype=torch.int32)

    def score(g, s, b, h, q, kv):
        return g.call_function(torch.ops.aten.div.Tensor, (s, temperature))

    def mask(g, b, h, q, kv):
        d = g.call_function(torch.ops.aten.sub.Tensor, (q, kv))
        return g.call_function(torch.ops.aten.lt.Scalar, (d, window))

    def build(g):
        q, k, v = g.placeholder("q"), g.placeholder("k"), g.placeholder("v")
        kv_num, kv_idx = g.placeholder("kv_num_blocks"), g.placeholder("kv_indices")
        score_mod, mask_mod = g.get_attr("score_mod_0"), g.get_attr("mask_fn_0")
        block_mask = (16, 16, kv_num, kv_idx, None, None, None, None, None, None, 128, 128, mask_mod)
        out = g.call_function(torch.ops.higher_order.flex_attention,
                              (q, k, v, score_mod, block_mask, 0.5, {"PRESCALE_QK": False}, (), ()))
        g.output((g.call_function(operator.getitem, (out, 0)),))
    return _with_attrs({"score_mod_0": _body(score, torch.empty(()), i, i, i, i),
                        "mask_fn_0": _body(mask, i, i, i, i)}, build)


CKPT_ARGS = [torch.zeros(4, 8)]
COND_ARGS = [torch.zeros((), dtype=torch.bool), torch.zeros(4, 8)]
FLEX_ARGS = [torch.zeros(1, 2, 16, 4)] * 3 + [torch.zeros(1, 1, 1, dtype=torch.int32), torch.zeros(1, 1, 1, 1, dtype=torch.int32)]


def key(gm: fx.GraphModule, args) -> str:
    return piece_signature(gm, args).key


def test_checkpoint_body_counts_in_the_key() -> None:
    """The issue's example as graphs: ``checkpoint(f)`` with ``f = relu(t) * k``, k per layer."""
    assert key(checkpoint_piece(2.0), CKPT_ARGS) != key(checkpoint_piece(3.0), CKPT_ARGS)
    assert key(checkpoint_piece(2), CKPT_ARGS) != key(checkpoint_piece(2.0), CKPT_ARGS)  # int vs float constant
    # identical bodies (built separately, other placeholder names): one key
    assert key(checkpoint_piece(2.0), CKPT_ARGS) == key(checkpoint_piece(2.0, x_name="hidden"), CKPT_ARGS)
    # and an ordinary piece is shareable (the disk cache serves it to other processes)
    assert getattr(piece_signature(checkpoint_piece(2.0), CKPT_ARGS), "unshareable", []) == []


def test_cond_branches_count_in_the_key() -> None:
    base = key(cond_piece(2.0, 1.0), COND_ARGS)
    assert key(cond_piece(3.0, 1.0), COND_ARGS) != base  # the true branch differs
    assert key(cond_piece(2.0, 5.0), COND_ARGS) != base  # the false branch differs
    assert key(cond_piece(2.0, 1.0), COND_ARGS) == base


def test_flex_attention_score_and_mask_mods_count_in_the_key() -> None:
    base = key(flex_piece(2.0, 4), FLEX_ARGS)
    assert key(flex_piece(3.0, 4), FLEX_ARGS) != base  # per-layer temperature in score_mod
    assert key(flex_piece(2.0, 8), FLEX_ARGS) != base  # per-layer window in mask_mod
    assert key(flex_piece(2.0, 4), FLEX_ARGS) == base


def test_nested_bodies_are_hashed_recursively() -> None:
    """A cond inside a checkpoint body: the innermost constant still counts."""
    def ckpt_around_cond(k: float) -> fx.GraphModule:
        inner = cond_piece(k, 1.0)
        g = fx.Graph()
        t = _tensor_ph(g, "t", torch.empty(4, 8))
        pred = g.call_function(torch.ops.aten.gt.Scalar, (g.call_function(torch.ops.aten.sum.default, (t,)), 0))
        tb, fb = g.get_attr("cond_true_0"), g.get_attr("cond_false_0")
        res = g.call_function(torch.ops.higher_order.cond, (pred, tb, fb, (t,)))
        g.output((g.call_function(operator.getitem, (res, 0)),))
        root = nn.Module()
        root.cond_true_0, root.cond_false_0 = inner.cond_true_0, inner.cond_false_0
        body = fx.GraphModule(root, g)
        gm = checkpoint_piece(1.0)
        gm.wrap_body_0 = body
        return gm

    assert key(ckpt_around_cond(2.0), CKPT_ARGS) != key(ckpt_around_cond(3.0), CKPT_ARGS)
    assert key(ckpt_around_cond(2.0), CKPT_ARGS) == key(ckpt_around_cond(2.0), CKPT_ARGS)


def test_body_str_constants_and_tensor_constants() -> None:
    """A str constant inside a body counts in the key but not the shape key (as at top level) and is
    reported; a tensor constant inside a body counts by content."""
    a, b = piece_signature(checkpoint_piece(2.0, "floor"), CKPT_ARGS), piece_signature(checkpoint_piece(2.0, "trunc"), CKPT_ARGS)
    assert a.key != b.key and a.shape_key == b.shape_key
    assert [c[2] for c in b.constants] == ["trunc"]

    def with_tensor(value: float) -> fx.GraphModule:
        def fn(g, t):
            return g.call_function(torch.ops.aten.mul.Tensor, (t, g.get_attr("scale")))
        root = nn.Module()
        root.register_buffer("scale", torch.full((8,), value))
        body = _body(fn, torch.empty(4, 8), root=root)
        gm = checkpoint_piece(1.0)
        gm.wrap_body_0 = body
        return gm

    assert key(with_tensor(2.0), CKPT_ARGS) != key(with_tensor(3.0), CKPT_ARGS)
    assert key(with_tensor(2.0), CKPT_ARGS) == key(with_tensor(2.0), CKPT_ARGS)


class _Opaque:
    """An object with no stable description of its content."""

    def __init__(self, k: float) -> None:
        self.k = k


def test_an_object_with_no_stable_description_is_unshareable() -> None:
    """Described by type only, two pieces holding different objects shared a key (and the disk cache):
    now each object's piece gets a key of its own, the same object the same key."""
    def piece(obj) -> fx.GraphModule:
        def build(g):
            x = g.placeholder("x")
            o = g.get_attr("obj")
            g.output((g.call_function(torch.ops.aten.mul.Tensor, (x, 2.0)), o))
        return _with_attrs({"obj": obj}, build)

    one, two = _Opaque(1.0), _Opaque(1.0)
    s1, s2 = piece_signature(piece(one), CKPT_ARGS), piece_signature(piece(two), CKPT_ARGS)
    assert s1.key != s2.key
    assert piece_signature(piece(one), CKPT_ARGS).key == s1.key
    assert getattr(s1, "unshareable", None), "the signature says why the piece is unshareable"


def test_python_call_target_counts_by_its_code_and_closure() -> None:
    """A user function in the graph (``allow_in_graph``) is traced into the compiled code: its
    closure constant counts, not just its qualified name."""
    def make(k: float):
        def scaled(t):
            return t * k
        return scaled

    def piece(fn) -> fx.GraphModule:
        g = fx.Graph()
        x = g.placeholder("x")
        g.output((g.call_function(fn, (x,)),))
        return fx.GraphModule(nn.Module(), g)

    assert key(piece(make(2.0)), CKPT_ARGS) != key(piece(make(3.0)), CKPT_ARGS)
    assert key(piece(make(2.0)), CKPT_ARGS) == key(piece(make(2.0)), CKPT_ARGS)


# ============================================================== models with per-layer bodies
class ConstantLayer(nn.Module):
    """A linear layer and the layer's own constant ``k``, which the subclasses' bodies use."""

    def __init__(self, k) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.k = k


class CheckpointLayer(ConstantLayer):
    """The issue's example: each layer multiplies by its own constant inside ``checkpoint``."""

    def f(self, t: torch.Tensor) -> torch.Tensor:
        return torch.relu(t) * self.k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.f, self.lin(x), use_reentrant=False)


class CondLayer(ConstantLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        return torch.cond(y.sum() > 0, lambda t: t * self.k, lambda t: t - self.k, (y,))


class FlexLayer(ConstantLayer):
    """Self-attention over the tokens with a per-layer temperature (``k``) in ``score_mod``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.lin(x).view(1, -1, 2, 4).transpose(1, 2)

        def score_mod(score, b, h, q_idx, kv_idx):
            return score / self.k

        return flex_attention(q, q, q, score_mod=score_mod).transpose(1, 2).reshape(x.shape) + x


class Layers(nn.Module):
    def __init__(self, cls: type, constants) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.layers = nn.ModuleList(cls(k) for k in constants)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


LAYER_CLASSES = {"checkpoint": CheckpointLayer, "cond": CondLayer, "flex": FlexLayer}
# layers 0..2 differ, 3 equals 2: distinct pieces for 0, 1, 2, one shared by 2 and 3
FLOATS = (1.0, 2.0, 3.0, 3.0)  # the constants
INTS = (2, 3, 5, 5)  # baked into a region's graph (a float attribute is a region input)


def _input(tokens: int = 16) -> torch.Tensor:
    return torch.randn(tokens, 8, generator=torch.Generator().manual_seed(1))


def _captured(model: nn.Module, x: torch.Tensor):
    captured: list = []

    def capture(gm: fx.GraphModule, example_inputs):
        captured.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture, dynamic=False)(x)
    assert len(captured) == 1, "the test model must trace to one graph"
    return captured[0]


def _layer_keys_of_split(gm: fx.GraphModule, inputs: list) -> dict[int, str]:
    result = split_by_layers(gm)
    keys: dict[int, str] = {}

    class Sig(fx.Interpreter):
        def call_module(self, target, args, kwargs):
            layer = result.piece_layers.get(target)
            if layer is not None:
                keys[layer] = piece_signature(getattr(result.graph_module, target), args).key
            return super().call_module(target, args, kwargs)

    with torch.no_grad():
        Sig(result.graph_module).run(*inputs)
    return keys


def _assert_layer_keys(keys: dict[int, str], what: str) -> None:
    assert sorted(keys) == [0, 1, 2, 3], f"{what}: pieces name layers {sorted(keys)}"
    assert len({keys[0], keys[1], keys[2]}) == 3, f"{what}: layers with different constants share a piece: {keys}"
    assert keys[2] == keys[3], f"{what}: identical layers 2 and 3 do not share a piece: {keys}"


@pytest.mark.parametrize("kind", sorted(LAYER_CLASSES))
def test_dynamo_graph_split_per_layer_keeps_bodies_apart(kind: str) -> None:
    """The whole-model graph split per layer (what the backend hashes), without Inductor."""
    gm, inputs = _captured(Layers(LAYER_CLASSES[kind], FLOATS).eval(), _input())
    _assert_layer_keys(_layer_keys_of_split(gm, inputs), kind)


def _report_layer_keys(report) -> dict[int, str]:
    return {p.layer: p.key for p in report.pieces if p.layer is not None and p.kind == "compiled"}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(LAYER_CLASSES))
def test_whole_model_backend_keeps_bodies_apart(kind: str) -> None:
    """``torch.compile(model, backend=LayerpassBackend(config))``: one graph, split per layer, so the
    piece hash alone decides which layers share an artifact. Before: 1 unique piece, wrong output."""
    import layerpass
    from layerpass import CompilationConfig
    from layerpass.backend.compiler import LayerpassBackend

    model, x = Layers(LAYER_CLASSES[kind], FLOATS).eval(), _input()
    torch._dynamo.reset()
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, backend=LayerpassBackend(CompilationConfig(cache_dir=bh.fresh_cache_dir(kind))))(x)
    report = layerpass.last_compile_report()
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=ATOL)
    _assert_layer_keys(_report_layer_keys(report), f"{kind}: {report.summary()}")
    assert report.num_compiled == report.num_unique_pieces == 3, report.summary()


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(LAYER_CLASSES))
def test_layerpass_compile_keeps_bodies_apart(kind: str) -> None:
    """``layerpass.compile`` (regions): each distinct layer is its own region, and regions of one
    model share the backend's artifacts by piece key, so the hash decides here too."""
    import layerpass
    from layerpass import CompilationConfig

    model, x = Layers(LAYER_CLASSES[kind], INTS).eval(), _input()
    # with an unbacked token count, flex_attention's lowering and cond's outputs fail to trace as a
    # region (the model then goes whole-model from its second step): trace the regions static
    config = CompilationConfig(cache_dir=bh.fresh_cache_dir(kind), dynamic_tokens=kind == "checkpoint")
    torch._dynamo.reset()
    with torch.no_grad():
        ref = model(x)
        out = layerpass.compile(model, config)(x)
    report = layerpass.last_compile_report()
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=ATOL)
    assert report.trace == "regions", (report.trace, report.notes)
    _assert_layer_keys(_report_layer_keys(report), f"{kind}: {report.summary()}")


# ============================================================== across processes
MODEL_SOURCE = '''
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def f(self, t):
        return torch.relu(t) * {k!r}

    def forward(self, x):
        return checkpoint(self.f, self.lin(x), use_reentrant=False)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(Layer() for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x
'''

STALE_BODY = """
import importlib
sys.path.insert(0, {folder!r})
mod = importlib.import_module("stale_model")  # importable by name: a region's program pickles its class
import layerpass
from layerpass import CompilationConfig
from layerpass.backend.compiler import LayerpassBackend

model = mod.Model().eval()
x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
res = {{}}
with torch.no_grad():
    ref = model(x)
    for name in ("regions", "whole"):
        config = CompilationConfig(cache_dir={cache!r} + "/" + name)  # one cache dir per path
        backend = LayerpassBackend(config)
        compiled = layerpass.compile(model, config) if name == "regions" else torch.compile(model, backend=backend)
        out = compiled(x)
        r = layerpass.last_compile_report()
        res[name] = {{"err": (out - ref).abs().max().item(), "compiled": r.num_compiled, "hits": r.num_cache_hits,
                      "summary": r.summary()}}
emit(res)
"""


@pytest.mark.slow
def test_edited_body_is_not_served_stale_from_the_cache(tmp_path) -> None:
    """Change a constant inside a checkpointed function between two processes on one cache dir: the
    second must recompile (before: ``compiled=0, cache_hits=2``, error 24.85); the unedited source
    in a third process is served from the cache (the key is not made unshareable)."""
    path, cache = str(tmp_path / "stale_model.py"), bh.fresh_cache_dir("stale")

    def run(k: float, what: str) -> dict:
        with open(path, "w") as f:
            f.write(MODEL_SOURCE.format(k=k))
        return bh.run_python(STALE_BODY.format(folder=str(tmp_path), cache=cache), what=what).result

    first = run(2.0, "first process (k=2.0)")
    second = run(5.0, "second process (k=5.0, same cache dir)")
    third = run(2.0, "third process (k=2.0 again)")
    for name in ("regions", "whole"):
        for label, res in (("first", first), ("second", second), ("third", third)):
            assert res[name]["err"] < ATOL, f"{name}, {label} process differs from eager: {res[name]}"
        assert first[name]["compiled"] > 0, first[name]
        assert second[name]["compiled"] > 0, f"{name}: the edited body was served from the cache: {second[name]}"
        assert third[name]["compiled"] == 0, f"{name}: the unedited body was not served from the cache: {third[name]}"


# ============================================================== item 12: nested ModuleLists
class HeadsLayer(nn.Module):
    """A layer holding a ``ModuleList`` of 4 heads."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(8, 2) for _ in range(4))
        self.out = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.cat([h(x) for h in self.heads], -1)) + x


class HeadsModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.inp = nn.Linear(8, 8)
            self.layers = nn.ModuleList(HeadsLayer() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for layer in self.layers:
            x = layer(x)
        return x


def test_nested_module_lists_split_on_the_outer_list() -> None:
    """Before: the split took a layer's list of heads (4 indices beat 3 layers): pieces named heads."""
    model, x = HeadsModel().eval(), _input(5)
    gm, inputs = _captured(model, x)
    container = find_layer_container(gm)
    assert container is not None and container.endswith("layers"), container
    result = split_by_layers(gm)
    assert sorted(v for v in result.piece_layers.values() if v is not None) == [0, 1, 2]
    with torch.no_grad():
        torch.testing.assert_close(result.graph_module(*inputs)[0], model(x))
    keys = _layer_keys_of_split(gm, inputs)
    assert sorted(keys) == [0, 1, 2] and len(set(keys.values())) == 1, keys


def test_regions_take_the_outer_list() -> None:
    from layerpass.backend.regions import find_repeated_layers

    model = HeadsModel()
    assert find_repeated_layers(model) == list(model.layers)


@pytest.mark.slow
def test_nested_module_lists_whole_model_backend() -> None:
    import layerpass
    from layerpass import CompilationConfig
    from layerpass.backend.compiler import LayerpassBackend

    model, x = HeadsModel().eval(), _input(5)
    torch._dynamo.reset()
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, backend=LayerpassBackend(CompilationConfig(cache_dir=bh.fresh_cache_dir("heads"))))(x)
    report = layerpass.last_compile_report()
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=ATOL)
    keys = _report_layer_keys(report)
    assert sorted(keys) == [0, 1, 2], [(p.name, p.layer) for p in report.pieces]
    assert len(set(keys.values())) == 1, f"identical layers do not share a piece: {report.summary()}"


@pytest.mark.slow
def test_nested_module_lists_layerpass_compile() -> None:
    """One piece per layer (a region is one layer: its list of heads is not split into pieces)."""
    import layerpass
    from layerpass import CompilationConfig

    model, x = HeadsModel().eval(), _input(5)
    torch._dynamo.reset()
    compiled = layerpass.compile(model, CompilationConfig(cache_dir=bh.fresh_cache_dir("heads-regions")))
    with torch.no_grad():
        ref = model(x)
        out = compiled(x)
    report = layerpass.last_compile_report()
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=ATOL)
    assert report.num_pieces == 3, [(p.name, p.layer) for p in report.pieces]
    assert sorted(p.layer for p in report.pieces) == [0, 1, 2]
    assert report.num_unique_pieces == 1, report.summary()
