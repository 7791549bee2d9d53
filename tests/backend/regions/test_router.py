"""Regions: ``layerpass.compile`` traces each distinct decoder layer once and never shares wrongly.

- Dynamo traces (counted at ``fullgraph_capture``) do not grow with depth.
- Layers that differ in shape, dtype, structure, a graph-changing Python constant, a callable or
  a ``str`` get their own region, and every output equals eager.
- The hybrid model and a converted HF model dedup; a layer class torch cannot save is a region in
  memory; the eager model is left as it was; routing (a layer's own forward, layers replaced after
  compile, two threads at once). When ``layerpass.compile`` leaves regions for the whole model:
  ``test_compiled_model.py``.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch import nn

import layerpass
from layerpass.backend.config import CompilationConfig
from tests.helpers import backend as bh


class CountTraces:
    """Counts Dynamo's whole-frame traces (every region trace goes through ``fullgraph_capture``)."""

    def __init__(self) -> None:
        self.count = 0
        self._orig = torch._dynamo.convert_frame.fullgraph_capture

    def __enter__(self) -> CountTraces:
        def counted(*args, **kwargs):
            self.count += 1
            return self._orig(*args, **kwargs)

        self._patch = mock.patch.object(torch._dynamo.convert_frame, "fullgraph_capture", counted)
        self._patch.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._patch.__exit__(*exc)


def compile_and_run(model: nn.Module, *inputs: torch.Tensor, **config) -> tuple[torch.Tensor, layerpass.CompileReport, int]:
    """Eager output, then ``layerpass.compile``'s output (asserted equal), its report and the trace count."""
    with torch.no_grad():
        ref = model(*inputs)
        compiled = layerpass.compile(model, CompilationConfig(cache_dir=bh.fresh_cache_dir("regions"), **config))
        with CountTraces() as traces:
            out = compiled(*inputs)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    return out, layerpass.last_compile_report(), traces.count


@pytest.mark.parametrize("layers", [3, 9])
def test_region_traces_do_not_grow_with_depth(layers: int) -> None:
    _, report, traces = compile_and_run(bh.Stack(layers, seed=layers).eval(), torch.randn(5, 8))
    assert report.trace == "regions" and report.num_regions == 1 and traces == 1, (report.num_regions, traces)
    assert report.num_pieces == layers and report.num_unique_pieces == 1 and report.num_compiled == 1
    assert [p.layer for p in report.pieces] == list(range(layers))
    assert [p.source for p in report.pieces] == ["compiled"] + ["shared"] * (layers - 1)


@bh.shared_regions
def test_zoo_region_count_is_independent_of_depth() -> None:
    two, eight = bh.compiled_zoo("llama", 2), bh.compiled_zoo("llama", 8)
    for c in (two, eight):
        bh.assert_matches(c.out, c.ref, "llama regions")
        assert c.report.trace == "regions"
    if layerpass.USE_LAYERNAME:  # the first layer gets a zero residual: every layer takes one region
        assert two.report.num_regions == eight.report.num_regions == 1



def test_a_first_layer_given_no_residual_is_a_region_of_its_own() -> None:
    """vLLM's convention (the first layer gets ``residual=None``) computes the same thing by
    another branch: ``None``-ness is a guard, so that layer gets its own region, never the others'."""
    from layerpass.models import build_model, make_step

    model = build_model("llama", num_layers=3).eval()
    inner = model.model

    def forward(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden, residual = inner.embed_tokens(input_ids), None
        for layer in inner.layers:
            hidden, residual = layer(positions, hidden, residual)
        return inner.norm(hidden, residual)[0]

    step = make_step(model, **bh.STANDARD_STEP)
    with torch.no_grad():
        ref = step.run(model)  # the zoo's zero residual
        inner.forward = forward
        none_ref = step.run(model)
        compiled = layerpass.compile(model, CompilationConfig(cache_dir=bh.fresh_cache_dir("none-residual")))
        out = step.run(compiled)
    torch.testing.assert_close(none_ref, ref, atol=0, rtol=0)  # the zero residual is exact
    bh.assert_matches(out, none_ref, "llama, first layer given None")
    report = layerpass.last_compile_report()
    if layerpass.USE_LAYERNAME:
        from layerpass.torch_compat import region_per_layer

        # where torch gives every layer its own region (2.11: region_per_layer says why), the three
        # layers are three regions; either way the first layer's piece is not the others'
        regions = 3 if region_per_layer() else 2
        assert report.num_regions == regions and report.num_unique_pieces == 2, report.summary()
        keys = [p.key for p in report.pieces]
        assert keys[0] != keys[1] == keys[2], keys


# ---------------------------------------------------------------- layers that must not share
class Scaled(nn.Module):
    """``relu(lin(x)) * scale + x`` (``repeats`` times), optionally through an activation callable
    and a mode ``str``: each of these changes the traced graph."""

    def __init__(self, width: int, repeats: int = 1, act=torch.relu, mode: str = "plain",
                 dtype: torch.dtype = torch.float32, extra: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width, dtype=dtype)
        self.repeats, self.act, self.mode = repeats, act, mode
        self.extra = nn.Linear(width, width, dtype=dtype) if extra else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(self.lin.weight.dtype)
        for _ in range(self.repeats):
            h = self.act(self.lin(h))
        if self.mode == "doubled":
            h = h * 2
        if self.extra is not None:
            h = self.extra(h)
        return (h + x.to(h.dtype)).to(x.dtype)


DIFFERING = {
    "constant": lambda: [Scaled(8), Scaled(8), Scaled(8, repeats=2)],
    "callable": lambda: [Scaled(8), Scaled(8), Scaled(8, act=torch.tanh)],
    "str": lambda: [Scaled(8), Scaled(8), Scaled(8, mode="doubled")],
    "dtype": lambda: [Scaled(8), Scaled(8), Scaled(8, dtype=torch.float64)],
    "structure": lambda: [Scaled(8), Scaled(8), Scaled(8, extra=True)],
}


@pytest.mark.parametrize("kind", sorted(DIFFERING))
def test_layers_that_differ_get_their_own_region(kind: str) -> None:
    torch.manual_seed(0)
    model = bh.Chain(DIFFERING[kind]()).eval()
    _, report, traces = compile_and_run(model, torch.randn(6, 8))
    assert report.num_regions == 2 and traces == 2, (kind, report.num_regions, traces)
    keys = [p.key for p in report.pieces]
    assert keys[0] == keys[1] and keys[2] != keys[0], kind


class Proj(nn.Module):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.lin = nn.Linear(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.lin(x))


def test_layers_of_different_shapes_get_their_own_region() -> None:
    torch.manual_seed(0)
    model = bh.Chain([Proj(8, 8), Proj(8, 8), Proj(8, 16), Proj(16, 16)]).eval()
    _, report, traces = compile_and_run(model, torch.randn(6, 8))
    assert report.num_regions == 3 and traces == 3
    assert len({p.key for p in report.pieces}) == 3


def test_regions_take_the_outer_list() -> None:
    """A layer's own list of heads (4) is never taken for the decoder layers (3)."""
    from layerpass.backend.regions.router import find_repeated_layers

    model = bh.HeadsModel()
    assert find_repeated_layers(model) == list(model.layers)


# ---------------------------------------------------------------- models of the zoo and HF
@pytest.mark.slow
def test_hybrid_model_dedups() -> None:
    four, eight = bh.compile_zoo("bailing-hybrid", 4), bh.compile_zoo("bailing-hybrid", 8)
    for c in (four, eight):
        bh.assert_matches(c.out, c.ref, "bailing-hybrid regions")
        assert c.report.trace == "regions"
    assert four.report.num_regions == eight.report.num_regions <= 4
    assert four.report.num_unique_pieces == eight.report.num_unique_pieces <= 5


@pytest.mark.slow
def test_converted_hf_model_dedups() -> None:
    transformers = pytest.importorskip("transformers")
    from layerpass.models import from_config, make_step

    reports = []
    for layers in (2, 4):
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                       num_attention_heads=4, num_key_value_heads=2)
        torch.manual_seed(0)
        model = from_config(cfg)
        step = make_step(model, num_decodes=2, prefill_lens=[5, 3])
        ref = step.run(model)
        compiled = layerpass.compile(model, CompilationConfig(cache_dir=bh.fresh_cache_dir("hf-regions")))
        with CountTraces() as traces:
            out = step.run(compiled)
        bh.assert_matches(out, ref, f"hf llama {layers} layers")
        report = layerpass.last_compile_report()
        assert report.trace == "regions" and report.num_pieces == layers
        reports.append((report.num_regions, report.num_unique_pieces, traces.count))
    assert reports[0] == reports[1], reports


# ---------------------------------------------------------------- a region in memory, the eager model untouched
def test_a_layer_torch_cannot_save_is_still_a_region_in_memory() -> None:
    """A class defined in a function: torch cannot save its guards, so its region is traced once in
    memory and reused at every layer; only the warm start is off, and the report says why."""
    local_cls = type("LocalScaled", (Scaled,), {})
    model = bh.Chain([local_cls(8) for _ in range(4)]).eval()
    x = torch.randn(5, 8)
    with torch.no_grad():
        ref = model(x)
        compiled = layerpass.compile(model, CompilationConfig(cache_dir=bh.fresh_cache_dir("in-memory")))
        with CountTraces() as traces:
            torch.testing.assert_close(compiled(x), ref)
        report = layerpass.last_compile_report()
        torch.testing.assert_close(compiled(x), ref)
    assert report.trace == "regions" and report.num_regions == 1 and traces.count == 1, (report, traces.count)
    assert report.warm_start.startswith("off: ") and "cannot save" in report.warm_start, report.warm_start
    assert compiled.compiled is None  # never the whole model


def test_compile_does_not_change_the_eager_model() -> None:
    model = bh.Stack(3).eval()
    x = torch.randn(4, 8)
    with torch.no_grad():
        compiled = layerpass.compile(model, CompilationConfig(cache_dir=bh.fresh_cache_dir("eager")))
        compiled(x)
        assert all("forward" not in vars(layer) for layer in model.layers)
        with CountTraces() as traces:
            model(x)
    assert traces.count == 0


# ---------------------------------------------------------------- routing, threads, training
def test_a_layers_own_forward_is_honoured_and_kept(caplog) -> None:
    caplog.set_level("WARNING", logger="layerpass")
    model = bh.Stack(3).eval()
    own = lambda x: x * 0.5  # noqa: E731
    model.layers[1].forward = own
    x = torch.randn(4, 8)
    with torch.no_grad():
        ref = model(x)
        compiled = layerpass.compile(model, CompilationConfig(cache_dir=bh.fresh_cache_dir("own-forward")))
        torch.testing.assert_close(compiled(x), ref)
        torch.testing.assert_close(compiled(x), ref)
    assert vars(model.layers[1])["forward"] is own
    assert all("forward" not in vars(layer) for i, layer in enumerate(model.layers) if i != 1)
    assert any("own instance forward" in m for m in caplog.messages), caplog.messages


def test_layers_added_or_replaced_after_compile_are_compiled() -> None:
    model = bh.Stack(3).eval()
    x = torch.randn(4, 8)
    with torch.no_grad():
        compiled = layerpass.compile(model, CompilationConfig(cache_dir=bh.fresh_cache_dir("replaced")))
        compiled(x)
        model.layers.append(bh.Block(8).eval())
        model.layers[0] = bh.Block(8).eval()
        ref = model(x)
        with CountTraces() as traces:
            out = compiled(x)
    torch.testing.assert_close(out, ref)
    report = layerpass.last_compile_report()
    assert any("decoder layers changed" in n for n in report.notes), report.notes
    assert traces.count == 0  # the new layers are the same kind: served by the existing region
    assert len(compiled.regions.layers) == 4 and all(id(layer) in compiled.regions.last for layer in model.layers)


def test_a_layer_list_replaced_whole_after_compile_is_followed() -> None:
    """Before: a new ``ModuleList`` in the old one's place ran eagerly, silently (report unchanged)."""
    model = bh.Stack(3).eval()
    x = torch.randn(4, 8)
    with torch.no_grad():
        compiled = layerpass.compile(model, CompilationConfig(cache_dir=bh.fresh_cache_dir("new-list")))
        compiled(x)
        model.layers = nn.ModuleList(bh.Block(8).eval() for _ in range(4))
        ref = model(x)
        with CountTraces() as traces:
            out = compiled(x)
    torch.testing.assert_close(out, ref)
    report = layerpass.last_compile_report()
    assert any("decoder layers changed" in n for n in report.notes), report.notes
    assert [p.layer for p in report.pieces] == [0, 1, 2, 3] and traces.count == 0
    assert compiled.regions.container is model.layers


def test_a_layer_list_replaced_by_one_that_is_not_repeated_is_warned_about(caplog) -> None:
    caplog.set_level("WARNING", logger="layerpass")
    model = bh.Stack(3).eval()
    x = torch.randn(4, 8)
    with torch.no_grad():
        compiled = layerpass.compile(model, CompilationConfig(cache_dir=bh.fresh_cache_dir("one-left")))
        compiled(x)
        model.layers = nn.ModuleList([bh.Block(8).eval()])
        for _ in range(2):
            torch.testing.assert_close(compiled(x), model(x))
    warned = [m for m in caplog.messages if "layer list" in m]
    assert len(warned) == 1 and "run eagerly" in warned[0], caplog.messages


def test_one_module_at_two_positions_gets_no_false_warning(caplog) -> None:
    """Before: its second position saw the first's routing and warned "has its own instance forward
    ... runs eagerly", though both calls ran compiled."""
    caplog.set_level("WARNING", logger="layerpass")
    shared = bh.Block(8).eval()
    model = bh.Chain([shared, bh.Block(8).eval(), shared]).eval()
    x = torch.randn(4, 8)
    with torch.no_grad():
        ref = model(x)
        compiled = layerpass.compile(model, CompilationConfig(cache_dir=bh.fresh_cache_dir("shared-module")))
        torch.testing.assert_close(compiled(x), ref)
    assert not any("own instance forward" in m for m in caplog.messages), caplog.messages
    assert [p.layer for p in layerpass.last_compile_report().pieces] == [0, 1, 2]
    assert "forward" not in vars(shared)


def test_two_threads_making_the_first_call_at_once() -> None:
    import threading

    model = bh.Stack(4).eval()
    x = torch.randn(4, 8)
    with torch.no_grad():
        ref = model(x)
    compiled = layerpass.compile(model, CompilationConfig(cache_dir=bh.fresh_cache_dir("threads")))
    outs, errors = [None, None], []
    barrier = threading.Barrier(2)

    def call(i: int) -> None:
        try:
            barrier.wait()
            with torch.no_grad():
                outs[i] = compiled(x)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for out in outs:
        torch.testing.assert_close(out, ref)
    assert compiled.compiled is None and compiled.regions is not None and compiled.regions.failed is None
    assert len({id(r) for r in compiled.regions.regions}) == 1


def test_a_backend_failure_while_tracing_a_region_surfaces() -> None:
    """A layerpass bug inside the backend is an error naming it, not a quiet fallback (the region
    trace catches only what torch raises for a frame it cannot save)."""
    from layerpass.backend.pieces.compiler import LayerpassBackend

    calls = []

    def broken(self, gm, example_inputs, whole_layer=False):  # noqa: ANN001, ANN202
        calls.append(1)
        raise RuntimeError("deliberate backend bug")

    model = bh.Stack(2).eval()
    compiled = layerpass.compile(model, CompilationConfig(cache_dir=bh.fresh_cache_dir("backend-bug")))
    with mock.patch.object(LayerpassBackend, "compile_graph", broken), torch.no_grad():
        with pytest.raises(Exception, match="deliberate backend bug"):
            compiled(torch.randn(4, 8))
    assert len(calls) == 1, "the failure was taken for an unsaveable frame and traced again in memory"


class Halve(nn.Module):
    """A decoder layer of another class than ``bh.Block``: a region of its own."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * 0.5


def _fail_second_region(backend) -> None:
    """Plant a backend failure in the second region traced (the first is the blocks')."""
    compile_graph, calls = backend.compile_graph, []

    def failing(gm, example_inputs, whole_layer=False):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("planted backend failure")
        return compile_graph(gm, example_inputs, whole_layer=whole_layer)

    backend.compile_graph = failing


@pytest.mark.parametrize("policy", ["eager", "raise"])
def test_on_compile_error(policy: str, caplog) -> None:
    """``on_compile_error="eager"``: the layer whose region fails runs eagerly (output equal to
    eager, one warning naming the cause, ``report.eager_layers``); the other layers stay compiled.
    ``"raise"`` (default) raises the backend's error."""
    torch.manual_seed(0)
    model = bh.Chain([bh.Block(8), bh.Block(8), Halve(8)]).eval()
    config = CompilationConfig(cache_dir=bh.fresh_cache_dir("on-error"), on_compile_error=policy)
    compiled = layerpass.compile(model, config)
    _fail_second_region(compiled.backend)
    x = torch.randn(5, 8)
    with torch.no_grad():
        if policy == "raise":
            with pytest.raises(RuntimeError, match="planted backend failure"):
                compiled(x)
            return
        for n in (5, 7):  # the second step runs it eagerly again, with no new warning or compile
            x = torch.randn(n, 8)
            torch.testing.assert_close(compiled(x), model(x))
            report = layerpass.last_compile_report()
            assert report.trace == "regions"
            assert list(report.eager_layers) == [2] and "planted backend failure" in report.eager_layers[2]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "runs eagerly" in r.getMessage()]
    assert len(warnings) == 1 and "decoder layer 2" in warnings[0] and "planted backend failure" in warnings[0], warnings
    assert compiled.regions is not None and len(compiled.regions.regions) == 1  # the blocks' region, compiled


def test_on_compile_error_is_checked() -> None:
    with pytest.raises(ValueError, match="on_compile_error='sometimes'; allowed: 'raise', 'eager'"):
        CompilationConfig(on_compile_error="sometimes")
    assert CompilationConfig().on_compile_error == "raise"
    assert CompilationConfig(on_compile_error="eager").fingerprint() == CompilationConfig().fingerprint()
