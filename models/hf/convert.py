"""``from_transformers``: run a Hugging Face decoder on layerpass layers, keeping its weights.

Generic, like vLLM's Transformers backend: no per-family code for dense layers. The HF model
keeps its module tree and the forwards of its modules (its ``*ForCausalLM``, base model, decoder
layers, attention modules...); the converter walks the tree and swaps, in place, what layerpass
runs and what it can prove computes the same:

- linears -> layerpass parallel linears, column or row as the model's ``base_model_tp_plan`` says
  (replicated where it says nothing); packed where the layout is known: ``q/k/v_proj`` -> one
  ``QKVParallelLinear`` (``TransformersAttention``), ``gate/up_proj`` -> one
  ``MergedColumnParallelLinear``; an already packed ``qkv_proj`` / ``gate_up_proj`` (Phi-3) loads
  as is into the packed layer;
- an MLP that a probe shows to be SiLU-gated -> ``TransformersMLP`` (``silu_and_mul`` op); other
  gated MLPs keep their forward on a packed ``gate_up_proj`` (``TransformersPackedMLP``);
- RMS norms -> ``RMSNorm`` or ``GemmaRMSNorm`` (``1 + w``) where a float32 probe shows the layer
  computes what the HF module computes; any other norm stays an HF module;
- the input embedding -> ``VocabParallelEmbedding`` (Gemma's scaled one -> ``TransformersScaledEmbedding``,
  again after a probe); the LM head -> ``ParallelLMHead`` + ``LogitsProcessor`` (``TransformersLMHead``);
- sparse MoE blocks of the families in ``MOE_FAMILIES`` -> ``TransformersSparseMoeBlock`` (``moe.py``);
- every attention module gets a layerpass ``Attention`` (``module.attn``), built from what the
  module passes to the attention function in a one-token dry run (head counts, scaling, sliding
  window, soft-cap, sinks), and the model's attention implementation becomes ``"layerpass"``.

Everything else (multipliers, q/k norms the probe does not match, soft-capping, rotary, ...)
stays an HF module run by its own forward. Every layer is built in one layer registry, its prefix
the HF module path (``model.layers.3.self_attn.qkv_proj``).

Where each step lives: ``walk.py`` (the walk: which step a module gets), ``conversion.py`` (the
settings every step reads; plain linears), ``tp_plan.py`` (the plan's styles), ``probes.py`` (the
numeric probes), ``convert_qkv.py`` / ``convert_mlp.py`` / ``convert_moe.py`` / ``convert_norm.py`` /
``convert_embedding.py`` (one kind of module each), ``attention_dry_run.py`` and
``attach_attention.py`` (the attention layers), ``causal_lm.py`` (the returned model) and
``model_config.py`` (its ``ModelConfig``). This module runs them in order.
"""

from __future__ import annotations

import inspect
import types

from torch import nn

from layerpass.layers import CacheConfig, Fp8Config, LogitsProcessor, ParallelLMHead
from layerpass.ops import LayerRegistry, layer_registry_scope

from ..allocator import IdAllocator
from .attach_attention import attach_attention
from .attention import ATTN_IMPLEMENTATION, register_attention_function
from .attention_dry_run import record_attention_calls
from .causal_lm import TransformersForCausalLM
from .families import UnsupportedArchitectureError, UnsupportedModuleError, check_convertible, supported_architectures
from .hub_kernels import bypass_kernel_routing
from .layers import TransformersLMHead
from .loading import load_vocab
from .model_config import model_config_from_hf
from .walk import ModuleWalker


def _run_base_model_undecorated(base: nn.Module) -> None:
    """The base model runs its own forward without transformers' output-capturing wrappers."""
    raw = inspect.unwrap(type(base).forward)
    if raw is not type(base).forward:
        base.forward = types.MethodType(raw, base)


def from_transformers(hf_model: nn.Module, *, cache_config: CacheConfig | None = None,
                      quant_config: Fp8Config | None = None, num_state_slots: int = 32,
                      registry: LayerRegistry | None = None) -> TransformersForCausalLM:
    """Convert ``hf_model`` (a decoder-only ``*ForCausalLM`` whose attention goes through
    transformers' ``AttentionInterface``) IN PLACE: the returned model wraps it and runs
    ``make_step`` batches eager or under ``torch.compile(..., backend="layerpass")``.

    ``registry``: the layer registry to build in (default: a new one, labelled with the
    architecture). The result also carries ``config`` (a layerpass ``ModelConfig``),
    ``cache_config``, ``layer_registry``, ``block_allocator``, ``state_allocator``. Raises
    ``UnsupportedArchitectureError`` naming the reason for a model it cannot run."""
    check_convertible(hf_model)
    if quant_config is not None and not isinstance(quant_config, Fp8Config):
        raise TypeError(f"quant_config must be None or an Fp8Config, got {quant_config!r}")
    register_attention_function()
    architecture = type(hf_model).__name__
    cache_config = cache_config if cache_config is not None else CacheConfig(num_blocks=128, block_size=16)
    hf_config = hf_model.config
    head = hf_model.get_output_embeddings()
    if isinstance(head, TransformersLMHead):
        raise ValueError(f"from_transformers: this {architecture} was already converted (it converts in place); "
                         f"load or copy the Hugging Face model again to convert another")
    head_name = next((n for n, m in hf_model.named_children() if m is head), None)
    if head_name is None:
        path = next((n for n, m in hf_model.named_modules() if m is head), None)
        where = f"is at {path!r}" if path else "is not a module of the model"
        raise UnsupportedArchitectureError(
            f"from_transformers: {architecture}'s language-model head (get_output_embeddings()) {where}; layerpass "
            f"converts decoder-only *ForCausalLM models whose head is a top-level torch.nn.Linear (such as lm_head), "
            f"e.g. {', '.join(supported_architectures())}")
    if type(head) is not nn.Linear:
        raise UnsupportedModuleError(f"from_transformers: {head_name!r} is a {type(head).__name__}; expected torch.nn.Linear")
    dtype = next(hf_model.parameters()).dtype  # the head has a weight: there is one
    input_embedding = hf_model.get_input_embeddings()
    tied = input_embedding is not None and head.weight is getattr(input_embedding, "weight", None)
    base = hf_model.base_model
    walker = ModuleWalker(hf_model, dtype, quant_config)
    hf_model.eval()
    with layer_registry_scope(registry if registry is not None else LayerRegistry(label=architecture)) as reg:
        walker.convert_children(base, hf_model.base_model_prefix)
        vocab_size = head.out_features  # the head's own (a composite config, as Fuyu's, keeps it in text_config)
        lm_head = ParallelLMHead(vocab_size, head.in_features, bias=head.bias is not None, params_dtype=dtype,
                                 prefix=head_name)
        if tied and walker.converted_embedding is not None:
            lm_head.weight = walker.converted_embedding.weight  # same padded shard: keep them one tensor
        else:
            load_vocab(lm_head, head.weight, head.bias)
        setattr(hf_model, head_name, TransformersLMHead(lm_head, LogitsProcessor(vocab_size, prefix="logits_processor")))
        _run_base_model_undecorated(base)
        bypass_kernel_routing(base)  # kernels' per-instance routing: its local-class wrappers cannot be saved
        model = TransformersForCausalLM(hf_model, head_name, architecture)
        # the dry run: one token, to see what every attention module passes the attention function
        calls = record_attention_calls(model, hf_model, reg, walker.paths)
        attach_attention(calls, walker.paths, cache_config, dtype, architecture)
    hf_model.set_attn_implementation(ATTN_IMPLEMENTATION)
    model.layer_registry = reg
    model.config = model_config_from_hf(hf_config, dtype, cache_config, num_state_slots, quant_config,
                                        attention=calls[0].module.attn)
    model.cache_config = cache_config
    model.block_allocator = IdAllocator(cache_config.num_blocks, "KV cache block")
    model.state_allocator = IdAllocator(num_state_slots, "recurrent state slot")
    return model.eval()
