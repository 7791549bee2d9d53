"""``BailingMoELinearAttention`` and the ``bailing-hybrid`` zoo model.

The layer is checked against a float64 reference written from the weights (projection,
per-head RMS norm, rotary from its formula, the closed-form linear attention of
``test_linear_attention_op``, gated group norm); the model on decode-first mixed batches,
state consistency across steps, OOT replacement, its LM head name and under torch.compile.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from tests.helpers import backend as bh
from tests.ops.test_linear_attention import closed_form

from layerpass.layers import Attention, init_seed_scope
from layerpass.layers.linear_attention import BailingMoELinearAttention, BailingRMSNormGated, linear_attention_slopes
from layerpass.models import build_model, make_step
from layerpass.ops import LayerRegistry, build_batch_metadata, layer_registry_scope, op_overload, set_forward_context

LINEAR_OP = op_overload("linear_attention")
_MODELS: dict[tuple, torch.nn.Module] = {}


def model_for(dtype=torch.float32, state_dtype=None, num_layers=2, **kw) -> torch.nn.Module:
    """A cached small model. Reduced-precision models route every token to all experts: top-k
    selection is discontinuous, so a one-ulp difference upstream may swap an expert and move the
    logits by tens of percent; these tests are about the linear attention, not about routing."""
    if dtype != torch.float32:
        kw.setdefault("top_k", 8)  # == num_experts
    key = (dtype, state_dtype, num_layers, tuple(sorted(kw.items())))
    if key not in _MODELS:
        _MODELS[key] = build_model("bailing-hybrid", num_layers=num_layers, seed=4, dtype=dtype,
                                   linear_state_dtype=state_dtype, **kw)
    return _MODELS[key]


def linear_layers(model) -> list[BailingMoELinearAttention]:
    return [m for m in model.modules() if isinstance(m, BailingMoELinearAttention)]


# ---------------------------------------------------------------- structure
@pytest.mark.parametrize("group,num_layers", [(2, 4), (3, 6)])
def test_layers_alternate_and_own_plain_state(group, num_layers):
    model = model_for(num_layers=num_layers, layer_group_size=group)
    reg = model.layer_registry
    kinds = [isinstance(layer.self_attn, BailingMoELinearAttention) for layer in model.model.layers]
    assert kinds == [(i + 1) % group != 0 for i in range(num_layers)]
    c = model.config
    for i, layer in enumerate(model.model.layers):
        if kinds[i]:
            attn = reg.get(f"model.layers.{i}.self_attn")  # what the op resolves by name
            assert attn is layer.self_attn and attn.prefix == f"model.layers.{i}.self_attn"
            assert attn.state_cache.shape == (c.num_state_slots, c.num_heads, c.head_size, c.head_size)
            assert attn.state_cache.dtype == c.dtype
            state_names = {n for n, _ in attn.named_buffers()} | {n for n, _ in attn.named_parameters()}
            assert not {"state_cache", "slopes"} & state_names
            assert not any(k.endswith(("state_cache", "slopes")) for k in model.state_dict())
            assert isinstance(reg.get(f"model.layers.{i}.self_attn.g_norm"), BailingRMSNormGated)
        else:
            assert isinstance(reg.get(f"model.layers.{i}.self_attn.attn"), Attention)
        assert layer.mlp.experts.shared_experts is not None
    slopes = torch.stack([a.slopes for a in linear_layers(model)])
    assert (slopes > 0).all() and (slopes[1:] < slopes[:-1]).all()  # deeper layers decay slower


def test_lm_head_prefix_is_exactly_lm_head():
    model = model_for()
    reg = model.layer_registry
    assert model.lm_head.prefix == "lm_head"
    assert reg.get("lm_head") is model.lm_head
    assert [n for n in reg.names() if "lm_head" in n] == ["lm_head"]
    for name in reg.names():  # every registered layer sits at its own module path
        assert reg.get(name).prefix == name


def test_config_and_layer_validation():
    with pytest.raises(ValueError, match="positive ints: layer_group_size=0"):
        build_model("bailing-hybrid", num_layers=2, layer_group_size=0)
    with pytest.raises(ValueError, match="linear_state_dtype must be None .* or a float torch.dtype"):
        build_model("bailing-hybrid", num_layers=2, linear_state_dtype=torch.int32)
    with pytest.raises(ValueError, match=r"num_heads \(4\) must be divisible by linear_norm_groups \(3\)"):
        build_model("bailing-hybrid", num_layers=2, linear_norm_groups=3)
    with pytest.raises(ValueError, match="layer_idx < num_layers"):
        linear_attention_slopes(4, 4, 4)
    with pytest.raises(ValueError, match="x and gate must both be"):
        BailingRMSNormGated(8, prefix="g")(torch.zeros(2, 8), torch.zeros(2, 4))


# ---------------------------------------------------------------- float64 reference of one layer
def _lin(layer, x):
    return x @ layer.weight.double().t()


def _rms(x, weight, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def _rope(x, positions, base):
    """Neox rotary: rotate pairs (x_i, x_{i+d/2}) by angle pos * base^(-2i/d)."""
    d = x.shape[-1]
    angle = positions.double()[:, None] * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    z = torch.complex(x[..., : d // 2], x[..., d // 2 :]) * torch.polar(torch.ones_like(angle), angle)[:, None, :]
    return torch.cat((z.real, z.imag), dim=-1)


def reference_layer(attn: BailingMoELinearAttention, x, positions, s0):
    n, h, d = x.shape[0], attn.num_heads, attn.head_size
    q, k, v = _lin(attn.query_key_value, x.double()).split([h * d] * 3, dim=-1)
    q, k, v = q.reshape(n, h, d), k.reshape(n, h, d), v.reshape(n, h, d)
    q = _rms(q, attn.query_layernorm.weight, attn.query_layernorm.variance_epsilon)
    k = _rms(k, attn.key_layernorm.weight, attn.key_layernorm.variance_epsilon)
    q = _rope(q, positions, attn.rotary_emb.base) / math.sqrt(d)
    k = _rope(k, positions, attn.rotary_emb.base)
    out, state = closed_form(q, k, v, attn.slopes, s0)
    g = attn.g_norm
    grouped = out.reshape(n, -1, g.group_size)
    normed = grouped / torch.sqrt(grouped.pow(2).mean(-1, keepdim=True) + g.variance_epsilon)
    gated = normed.reshape(n, h * d) * g.weight.double() * torch.sigmoid(_lin(attn.g_proj, x.double()))
    return _lin(attn.dense, gated), state


@settings(max_examples=8, deadline=None)
@given(
    num_decodes=st.integers(0, 3),
    # (query_len, context_len): a resumed prefill (context > 0) has >= 2 tokens, else it is a decode
    prefills=st.lists(st.tuples(st.integers(1, 20), st.integers(0, 6)).map(lambda p: (max(p[0], 2 if p[1] else 1), p[1])),
                      max_size=3),
    norm_groups=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 2**16),
)
def test_layer_matches_float64_reference(num_decodes, prefills, norm_groups, seed):
    if num_decodes + len(prefills) == 0:
        prefills = [(5, 0)]
    g = torch.Generator().manual_seed(seed)
    q_lens = [1] * num_decodes + [n for n, _ in prefills]
    ctx = torch.randint(1, 30, (num_decodes,), generator=g).tolist() + [c for _, c in prefills]
    slots = torch.randperm(8, generator=g)[: len(q_lens)].tolist()
    with layer_registry_scope(LayerRegistry("one")) as reg, init_seed_scope(seed):
        attn = BailingMoELinearAttention(32, 4, 8, layer_idx=1, num_layers=3, num_state_slots=8, block_size=4,
                                         norm_groups=norm_groups, prefix="attn")
    attn.state_cache.normal_(generator=g)
    before = attn.state_cache.clone()
    tables = [[4 * r + j for j in range(4)] for r in range(len(q_lens))]  # each request its own blocks
    md = build_batch_metadata(q_lens, ctx, tables, 16, state_indices=slots)
    x = torch.randn(sum(q_lens), 32, generator=g)
    positions = torch.cat([torch.arange(c, c + q) for q, c in zip(q_lens, ctx)])
    with torch.no_grad(), set_forward_context(md, reg):
        out = attn(positions, x)
    qsl = md.query_start_loc.tolist()
    for r, slot in enumerate(slots):
        rows = slice(qsl[r], qsl[r + 1])
        s0 = before[slot] if ctx[r] > 0 else torch.zeros_like(before[slot])
        want, state = reference_layer(attn, x[rows], positions[rows], s0)
        torch.testing.assert_close(out[rows].double(), want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(attn.state_cache[slot].double(), state, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- decode-first mixed batches
DTYPES = [  # (model dtype, state dtype, tolerance)
    (torch.float32, None, 2e-5),
    (torch.bfloat16, torch.float32, 3e-2),
    (torch.bfloat16, None, 3e-2),
]


@pytest.mark.parametrize("dtype,state_dtype,tol", DTYPES)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(num_decodes=st.integers(0, 4), prefill_lens=st.lists(st.integers(1, 12), max_size=3), seed=st.integers(0, 2**16))
def test_mixed_batch_equals_requests_alone(dtype, state_dtype, tol, num_decodes, prefill_lens, seed):
    if num_decodes + len(prefill_lens) == 0:
        prefill_lens = [3]
    model = model_for(dtype, state_dtype)
    step = make_step(model, num_decodes=num_decodes, prefill_lens=prefill_lens, seed=seed)
    together = step.split(step.run())
    for sub, want in zip(step.alone(), together):
        got = sub.run()
        assert got.dtype == dtype
        scale = max(float(want.abs().max()), 1.0)
        torch.testing.assert_close(got.float(), want.float(), atol=tol * scale, rtol=tol)
    step.release()


def _run(model, q_lens, ctx, slots, blocks, ids, positions):
    md = build_batch_metadata(q_lens, ctx, blocks, model.cache_config.block_size, state_indices=slots)
    with torch.no_grad(), set_forward_context(md, model.layer_registry):
        return model(ids, positions)


@pytest.mark.parametrize("dtype,state_dtype,tol", DTYPES)
@settings(max_examples=4, deadline=None)
@given(n=st.integers(1, 24), m=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_prefill_then_decodes_equals_longer_prefill(dtype, state_dtype, tol, n, m, seed):
    """Every layer's state after a prefill of n tokens and m decode steps (each batched with a
    fresh unrelated prefill) equals its state after one prefill of the n + m tokens, and so do
    the logits of those m tokens."""
    model = model_for(dtype, state_dtype)
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, model.config.vocab_size, (n + m,), generator=g)
    a_slot, b_slot, noise_slot = 5, 2, 9
    a_blocks, b_blocks, noise_blocks = [0, 1], [2, 3], [4]
    stepped = [_run(model, [n], [0], [a_slot], [a_blocks], toks[:n], torch.arange(n))]
    for t in range(n, n + m):
        noise = torch.randint(0, model.config.vocab_size, (3,), generator=g)
        logits = _run(model, [1, 3], [t, 0], [a_slot, noise_slot], [a_blocks, noise_blocks],
                      torch.cat([toks[t : t + 1], noise]), torch.cat([torch.tensor([t]), torch.arange(3)]))
        stepped.append(logits[:1])
    whole = _run(model, [n + m], [0], [b_slot], [b_blocks], toks, torch.arange(n + m))
    stepped = torch.cat(stepped)
    scale = max(float(whole.abs().max()), 1.0)
    torch.testing.assert_close(stepped[n:].float(), whole[n:].float(), atol=tol * scale, rtol=tol)
    for attn in linear_layers(model):
        a, b = attn.state_cache[a_slot].float(), attn.state_cache[b_slot].float()
        torch.testing.assert_close(a, b, atol=tol * max(float(b.abs().max()), 1.0), rtol=tol)


class _OpArgs(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.dtypes: list[tuple[torch.dtype, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is LINEAR_OP:
            self.dtypes.append(tuple(a.dtype for a in args[:4]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("state_dtype", [None, torch.float32])
def test_rotary_and_op_run_in_model_dtype(state_dtype):
    model = model_for(torch.bfloat16, state_dtype)
    seen = []
    hooks = [a.rotary_emb.register_forward_hook(lambda mod, inp, out: seen.extend(t.dtype for t in out))
             for a in linear_layers(model)]
    step = make_step(model, num_decodes=1, prefill_lens=[4], seed=0)
    mode = _OpArgs()
    try:
        with mode:
            step.run()
    finally:
        for h in hooks:
            h.remove()
        step.release()
    assert seen and set(seen) == {torch.bfloat16}  # rotary is not forced to float32
    assert mode.dtypes and set(mode.dtypes) == {(torch.bfloat16,) * 4}
    assert {a.state_cache.dtype for a in linear_layers(model)} == {state_dtype or torch.bfloat16}


# ---------------------------------------------------------------- out-of-tree replacement
def test_oot_subclass_replaces_the_layer_in_the_model(clean_oot):
    in_tree = build_model("bailing-hybrid", num_layers=4, seed=7)

    class MyLinearAttention(BailingMoELinearAttention):
        calls = 0

        def forward(self, positions, hidden_states):
            type(self).calls += 1
            return super().forward(positions, hidden_states)

    BailingMoELinearAttention.register_oot(MyLinearAttention)
    model = build_model("bailing-hybrid", num_layers=4, seed=7)
    linear = [layer.self_attn for layer in model.model.layers if isinstance(layer.self_attn, BailingMoELinearAttention)]
    assert len(linear) == 2 and all(type(a) is MyLinearAttention for a in linear)
    assert model.layer_registry.get("model.layers.2.self_attn") is linear[1]  # the op resolves the OOT layer
    step = make_step(model, num_decodes=2, prefill_lens=[5], seed=3)
    want = make_step(in_tree, num_decodes=2, prefill_lens=[5], seed=3).run()
    torch.testing.assert_close(step.run(), want)
    assert MyLinearAttention.calls == 2 * 2  # history prefill + the step, two linear layers each
    BailingMoELinearAttention.unregister_oot()
    assert type(build_model("bailing-hybrid", num_layers=1).model.layers[0].self_attn) is BailingMoELinearAttention


# ---------------------------------------------------------------- torch.compile
def test_traces_as_one_graph_and_matches_eager():
    """Fake impls and hoisted names: the whole model is one Dynamo graph (aot_eager: fast)."""
    model = model_for()
    step = make_step(model, num_decodes=2, prefill_lens=[6], seed=5)
    eager = step.run()
    torch.compiler.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(step.run(compiled), eager, atol=1e-5, rtol=1e-5)
    step.release()


def _piece_keys(report) -> dict[int, str]:
    return {p.layer: p.key for p in report.pieces if p.layer is not None}


@pytest.mark.slow  # ~15 s of CPU for Inductor, far more wall time on the shared box
def test_layerpass_compile_matches_eager_and_shares_pieces():
    """Default config: a piece per layer (regions; embedding and head run eagerly), 3 unique
    pieces (linear layers, softmax layers: the first layer's zero residual makes it one of them); layer names are graph inputs, not constants."""
    import layerpass

    c = bh.compiled_zoo("bailing-hybrid", 6)
    bh.assert_matches(c.out, c.ref, "bailing-hybrid-6")
    r = c.report
    assert r.num_pieces == 6 and r.num_eager_pieces == 0 and r.trace == "regions", r.summary()
    if not layerpass.USE_LAYERNAME:
        pytest.skip("this process runs with the layer-name switch off")
    keys = _piece_keys(r)
    assert keys[0] == keys[2] == keys[4] != keys[1] == keys[3] == keys[5], keys  # linear layers share, softmax layers share
    assert r.num_unique_pieces == 2 and r.num_regions == 2, r.summary()
    assert not any("layers." in str(x[2]) for p in r.pieces for x in p.constants)
    step = make_step(c.model, num_decodes=1, prefill_lens=[7, 2], seed=9)  # a new token count
    bh.assert_matches(step.run(c.compiled), step.run(c.model), "bailing-hybrid-6, second batch")
    assert c.compiled.recompiles == 0
    step.release()


@pytest.mark.slow
def test_unique_pieces_do_not_grow_with_layers():
    small, large = bh.compiled_zoo("bailing-hybrid", 4), bh.compiled_zoo("bailing-hybrid", 8)
    bh.assert_matches(large.out, large.ref, "bailing-hybrid-8")
    assert small.report.num_unique_pieces == large.report.num_unique_pieces, (small.report.summary(), large.report.summary())


@pytest.mark.slow
def test_split_ops_runs_linear_attention_eagerly():
    """``linear_attention`` is a default splitting op: with ``split="ops"`` it runs between pieces."""
    from layerpass.backend.config import CompilationConfig

    assert "layerpass.linear_attention" in CompilationConfig().splitting_ops
    c = bh.compiled_zoo("bailing-hybrid", 4, split="ops")
    bh.assert_matches(c.out, c.ref, "bailing-hybrid-4 split=ops")
    assert c.report.num_eager_pieces == 4  # two linear-attention ops, two softmax-attention ops
