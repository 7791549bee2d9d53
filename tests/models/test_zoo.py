"""Model zoo: build_model / make_step, numerics against an independent dense reference, mixed batches.

The reference recomputes each request's whole sequence (history + new tokens) in float64
straight from the weights: contiguous causal attention (no paged cache), rotary from its
formula, MoE token by token. It shares nothing with the layers except the weight tensors.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerpass.layers import Attention, FusedMoE, ParallelLMHead, QKVParallelLinear, RMSNorm, VocabParallelEmbedding
from layerpass.models import build_model, make_step, register_model, registered_models
from layerpass.envs import USE_LAYERNAME
from layerpass.ops import FP8_DTYPE, op_overload

ZOO = ["llama", "llama-fp8", "moe"]
from tests.helpers.fp8 import FP8_MAX  # noqa: E402


# ---------------------------------------------------------------- independent float64 reference
def ref_linear(layer, x: torch.Tensor) -> torch.Tensor:
    if layer.weight.dtype == FP8_DTYPE:
        s_in = layer.input_scale.double()
        x = (x / s_in).clamp(-FP8_MAX, FP8_MAX).float().to(FP8_DTYPE).double() * s_in
        w = layer.weight.double() * layer.weight_scale.double()
    else:
        w = layer.weight.double()
    out = x @ w.t()
    return out if layer.bias is None else out + layer.bias.double()


def ref_rms(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight.double()


def ref_rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Neox rotary as a complex rotation of (x_i, x_{i + d/2}) pairs by angle pos * base^(-2i/d)."""
    d = x.shape[-1]
    angle = positions.double()[:, None] * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    z = torch.complex(x[..., : d // 2], x[..., d // 2 :]) * torch.polar(torch.ones_like(angle), angle)[:, None, :]
    return torch.cat((z.real, z.imag), dim=-1)


def ref_attention(attn_mod, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    qkv = ref_linear(attn_mod.qkv_proj, x)
    a: Attention = attn_mod.attn
    d = a.head_size
    q, k, v = qkv.split([a.num_heads * d, a.num_kv_heads * d, a.num_kv_heads * d], dim=-1)
    n = x.shape[0]
    q = ref_rope(q.reshape(n, a.num_heads, d), positions, attn_mod.rotary_emb.base)
    k = ref_rope(k.reshape(n, a.num_kv_heads, d), positions, attn_mod.rotary_emb.base)
    v = v.reshape(n, a.num_kv_heads, d)
    group = a.num_heads // a.num_kv_heads
    out = torch.empty(n, a.num_heads, d, dtype=torch.float64)
    for h in range(a.num_heads):
        scores = (q[:, h] @ k[:, h // group].t()) * a.scale
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
        out[:, h] = torch.softmax(scores, -1) @ v[:, h // group]
    return ref_linear(attn_mod.o_proj, out.reshape(n, -1))


def ref_dense_mlp(mlp, x: torch.Tensor) -> torch.Tensor:
    gu = ref_linear(mlp.gate_up_proj, x)
    g, u = gu.chunk(2, dim=-1)
    act = torch.nn.functional.silu(g) * u
    return ref_linear(mlp.down_proj, act)


def ref_moe_block(block, x: torch.Tensor) -> torch.Tensor:
    experts: FusedMoE = block.experts
    probs = torch.softmax(ref_linear(block.gate, x), -1)
    inter = experts.intermediate_size_per_partition
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        w, ids = probs[t].topk(experts.top_k)
        if experts.renormalize:
            w = w / w.sum()
        for wi, e in zip(w, ids.tolist()):
            w13 = experts.w13_weight[e].double()
            h = w13 @ x[t]
            out[t] += wi * (experts.w2_weight[e].double() @ (torch.nn.functional.silu(h[:inter]) * h[inter:]))
    shared = experts.shared_experts
    gate = torch.sigmoid(ref_linear(shared.shared_expert_gate, x))
    return out + gate * ref_dense_mlp(shared.mlp, x)


def ref_logits(model, tokens: list[int]) -> torch.Tensor:
    """Logits of every position of one whole sequence."""
    ids = torch.tensor(tokens)
    positions = torch.arange(len(tokens))
    h = model.model.embed_tokens.weight.double()[ids]
    for layer in model.model.layers:
        x = ref_rms(layer.input_layernorm, h)
        h = h + ref_attention(layer.self_attn, x, positions)
        x = ref_rms(layer.post_attention_layernorm, h)
        mlp = layer.mlp
        h = h + (ref_moe_block(mlp, x) if hasattr(mlp, "experts") else ref_dense_mlp(mlp, x))
    h = ref_rms(model.model.norm, h)
    return (h @ model.lm_head.weight.double().t())[:, : model.config.vocab_size]


# ---------------------------------------------------------------- fixtures
_MODELS: dict[str, torch.nn.Module] = {}


def zoo_model(name: str) -> torch.nn.Module:
    if name not in _MODELS:
        _MODELS[name] = build_model(name, num_layers=2, seed=3)
    return _MODELS[name]


# ---------------------------------------------------------------- build_model
def test_registry_lists_zoo_and_rejects_unknown():
    assert set(ZOO) <= set(registered_models())
    with pytest.raises(KeyError, match="unknown model 'gpt9'; known models: .*'llama'"):
        build_model("gpt9", num_layers=1)
    with pytest.raises(TypeError, match=r"unknown overrides \['hiden_size'\]; allowed: .*'hidden_size'"):
        build_model("llama", num_layers=1, hiden_size=8)
    with pytest.raises(ValueError, match="positive ints: num_layers=0"):
        build_model("llama", num_layers=0)
    with pytest.raises(ValueError, match="positive ints: num_layers=True"):  # before: a bool built a model
        build_model("llama", num_layers=True)
    with pytest.raises(ValueError, match="positive ints: layer_group_size=True"):
        build_model("bailing-hybrid", num_layers=2, layer_group_size=True)
    with pytest.raises(ValueError, match="already registered"):
        register_model("llama")(lambda config: None)


@pytest.mark.parametrize("name", ZOO)
def test_structure_and_prefixes(name):
    model = zoo_model(name)
    reg = model.layer_registry
    assert isinstance(model.model.layers, torch.nn.ModuleList) and len(model.model.layers) == 2
    assert isinstance(reg.get("model.layers.1.self_attn.attn"), Attention)
    assert isinstance(reg.get("model.layers.0.self_attn.qkv_proj"), QKVParallelLinear)
    assert isinstance(reg.get("model.embed_tokens"), VocabParallelEmbedding)
    assert isinstance(reg.get("lm_head"), ParallelLMHead)
    for prefix in reg.names():  # every registered layer is the module found at that path
        assert getattr(reg.get(prefix), "prefix") == prefix
    attn = reg.get("model.layers.0.self_attn.attn")
    assert "kv_cache" not in dict(attn.named_buffers()) and "kv_cache" not in dict(attn.named_parameters())
    assert attn.kv_cache.shape == (2, model.cache_config.num_blocks, model.cache_config.block_size, 2, 16)
    if name == "moe":
        moe = reg.get("model.layers.0.mlp.experts")
        assert moe.w13_weight.shape == (8, 64, 64) and moe.w2_weight.shape == (8, 64, 32)
        assert moe.shared_experts is not None
    fp8 = reg.get("model.layers.0.self_attn.o_proj").weight.dtype == FP8_DTYPE
    assert fp8 == (name == "llama-fp8")
    assert model.lm_head.weight.dtype == torch.float32  # the LM head stays unquantised


def test_seed_determinism_and_dtype_override():
    a, b, c = (build_model("llama", num_layers=1, seed=s) for s in (5, 5, 6))
    outs = []
    for m in (a, b, c):
        step = make_step(m, num_decodes=0, prefill_lens=[3], seed=0)
        outs.append(step.run())
    assert torch.equal(outs[0], outs[1])
    assert not torch.allclose(outs[0], outs[2])
    bf = build_model("moe", num_layers=1, dtype=torch.bfloat16)
    assert bf.model.layers[0].mlp.experts.w13_weight.dtype == torch.bfloat16
    assert make_step(bf, num_decodes=1, prefill_lens=[2]).run().dtype == torch.bfloat16


def test_eighty_layer_llama_builds_and_runs():
    model = build_model("llama", num_layers=80)
    assert len(model.model.layers) == 80 and len(model.layer_registry) > 80 * 8
    step = make_step(model, num_decodes=2, prefill_lens=[4], seed=0, history_lens=[3, 5])
    logits = step.run()
    assert logits.shape == (6, 256) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ZOO)
def test_step_matches_dense_reference_and_is_repeatable(name):
    model = zoo_model(name)
    step = make_step(model, num_decodes=2, prefill_lens=[5, 1], seed=1, history_lens=[17, 3])
    logits = step.run()
    assert logits.shape == (step.input_ids.shape[0], model.config.vocab_size)
    assert torch.equal(logits, step.run())  # idempotent KV write
    for req, got in zip(step.requests, step.split(logits)):
        want = ref_logits(model, list(req.history + req.tokens))[len(req.history):]
        if name == "llama-fp8":  # fp8 rounding of float32 vs float64 inputs may differ by one step
            assert (got.double() - want).abs().max() < 0.05 * want.abs().max()
        else:
            torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    step.release()


def test_make_step_validation_and_release():
    model = build_model("llama", num_layers=1, num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="at least one request"):
        make_step(model, num_decodes=0, prefill_lens=[])
    with pytest.raises(ValueError, match=r"prefill_lens\[0\] must be an int >= 1, got 0"):
        make_step(model, num_decodes=0, prefill_lens=[0])
    with pytest.raises(ValueError, match="history_lens needs 2"):
        make_step(model, num_decodes=2, prefill_lens=[], history_lens=[3])
    with pytest.raises(RuntimeError, match="out of KV cache blocks: need 5"):
        make_step(model, num_decodes=0, prefill_lens=[20])
    step = make_step(model, num_decodes=0, prefill_lens=[16])
    assert model.block_allocator.num_free == 0
    step.release()
    assert model.block_allocator.num_free == 4 and model.state_allocator.num_free == model.config.num_state_slots
    md = make_step(model, num_decodes=1, prefill_lens=[2], history_lens=[5]).metadata
    assert md.num_decodes == 1 and md.state_indices is not None and md.state_indices.shape == (2,)


# ---------------------------------------------------------------- mixed batches
@pytest.mark.parametrize("name", registered_models())  # every zoo model, including ones added elsewhere
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    num_decodes=st.integers(0, 4),
    prefill_lens=st.lists(st.integers(1, 12), max_size=3),
    seed=st.integers(0, 2**16),
)
def test_mixed_batch_equals_requests_alone(name, num_decodes, prefill_lens, seed):
    if num_decodes + len(prefill_lens) == 0:
        prefill_lens = [3]
    model = zoo_model(name)
    step = make_step(model, num_decodes=num_decodes, prefill_lens=prefill_lens, seed=seed)
    assert step.metadata.num_decodes == num_decodes
    together = step.split(step.run())
    for sub, want in zip(step.alone(), together):
        alone = sub.run()
        if name in ("llama-fp8", "moe-fp8"):  # batch-size dependent matmul rounding may flip an fp8 step
            assert (alone - want).abs().max() <= 0.02 * want.abs().max()
        else:
            torch.testing.assert_close(alone, want, atol=2e-5, rtol=2e-5)
    step.release()


# ---------------------------------------------------------------- compiled graph shape
def _graph_of(model, step):
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compiler.reset()
    out = step.run(torch.compile(model, backend=capture, fullgraph=True))
    return graphs[0], out


def _is(node, name: str) -> bool:
    """Dynamo graphs call the op packet, post-grad graphs its overload: accept both."""
    return node.target in (getattr(torch.ops.layerpass, name), op_overload(name))


def test_fp8_graph_holds_producer_quant_fp8mm_chains():
    model = build_model("llama-fp8", num_layers=1, seed=2)
    step = make_step(model, num_decodes=1, prefill_lens=[3], seed=0)
    gm, compiled = _graph_of(model, step)
    torch.testing.assert_close(compiled, step.run(), atol=1e-5, rtol=1e-5)

    def quant_feeds_mm(value) -> bool:
        quants = [u for u in value.users if _is(u, "static_scaled_fp8_quant") and u.args[1] is value]
        return any(_is(u, "scaled_fp8_mm") for q in quants for u in q.args[0].users)

    nodes = list(gm.graph.nodes)
    attn = [n for n in nodes if _is(n, "unified_attention_with_output")]
    assert len(attn) == 1
    out_buffer = attn[0].args[3]  # attention writes `output`; its view is quantised for o_proj
    assert any(quant_feeds_mm(v) for v in out_buffer.users if v is not attn[0])
    norms = [n for n in nodes if _is(n, "rms_norm") or _is(n, "fused_add_rms_norm")]
    norm_values = norms + [u for n in norms for u in n.users]  # plain output or getitem(out, 0)
    assert sum(quant_feeds_mm(v) for v in norm_values) == 2  # qkv_proj and gate_up_proj
    act = [n for n in nodes if _is(n, "silu_and_mul")]
    assert len(act) == 1 and quant_feeds_mm(act[0])  # down_proj
    if USE_LAYERNAME:  # the layer name is a hoisted graph input, not a constant
        assert isinstance(attn[0].args[4], torch.fx.Node) and attn[0].args[4].op == "placeholder"
    torch.compiler.reset()
