"""``from_transformers``: run a Hugging Face decoder on layerpass layers, keeping its weights.

The HF model keeps its own module tree and the forwards of its decoder layers (residual adds,
rotary cos/sin); the converter swaps, in place, what layerpass runs:

- ``q/k/v_proj`` -> one ``QKVParallelLinear`` and ``o_proj`` -> ``RowParallelLinear``, inside a
  ``TransformersAttention`` whose attention is the ``"layerpass"`` AttentionInterface function
  (a layerpass ``Attention`` at ``model.layers.{i}.self_attn.attn`` with its paged KV cache);
- a SiLU MLP's ``gate/up_proj`` -> ``MergedColumnParallelLinear`` + ``SiluAndMul``, ``down_proj``
  -> ``RowParallelLinear`` (other activations: column/row-parallel linears in the HF module);
- sparse MoE blocks -> router ``ReplicatedLinear`` + ``TransformersFusedMoE`` (+ shared expert);
- RMS norms -> ``RMSNorm``; the embedding and LM head -> ``VocabParallelEmbedding`` / ``ParallelLMHead``.

Every layer is built inside one layer registry, under the HF module path as prefix.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from layerpass.layers import (
    Attention,
    CacheConfig,
    ColumnParallelLinear,
    Fp8Config,
    LogitsProcessor,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    ReplicatedLinear,
    RMSNorm,
    RowParallelLinear,
    SiluAndMul,
    VocabParallelEmbedding,
)
from layerpass.ops import LayerRegistry, layer_registry_scope

from ..allocator import IdAllocator
from ..config import ModelConfig
from .attention import ATTN_IMPLEMENTATION, TransformersAttention, register_attention_function
from .families import Family, UnsupportedModuleError, family_of
from .loading import copy_param, load_linear, load_vocab
from .mlp import SILU_ACTIVATIONS, TransformersMLP
from .moe import TransformersFusedMoE, TransformersSharedExpert, TransformersSparseMoeBlock


class TransformersForCausalLM(nn.Module):
    """``forward(input_ids [T], positions [T]) -> logits [T, vocab]``, like the zoo models.

    The step's tokens (all requests, decode-first) run as one sequence of batch 1; attention
    separates the requests by the step's metadata. The HF base model's own forward is not used:
    it only adds a mask (not needed: the attention op masks per request) and output capturing
    whose global registry Dynamo guards on, so every new HF model class seen in the process
    would invalidate the compiled code of every converted model. This loop calls the same
    modules: embedding, rotary cos/sin, each HF decoder layer (its own forward), final norm."""

    packed_modules_mapping: dict[str, list[str]] = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
        "experts": ["gate_proj", "up_proj"],  # FusedMoEWithLoRA: separate gate and up adapters
    }

    def __init__(self, model: nn.Module, lm_head: ParallelLMHead, logits_processor: LogitsProcessor,
                 hf_config: Any, architecture: str) -> None:
        super().__init__()
        self.model = model
        self.lm_head = lm_head
        self.logits_processor = logits_processor
        self.hf_config = hf_config
        self.architecture = architecture

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # checked in eager only: under torch.compile the token count may be an unbacked symbol
        if not torch.compiler.is_compiling() and (input_ids.dim() != 1 or positions.shape != input_ids.shape):
            raise ValueError(f"model forward takes input_ids [T] and positions [T], got {tuple(input_ids.shape)} "
                             f"and {tuple(positions.shape)}")
        base = self.model
        hidden_states = base.embed_tokens(input_ids).unsqueeze(0)
        position_ids = positions.unsqueeze(0)
        position_embeddings = base.rotary_emb(hidden_states, position_ids)
        for layer in base.layers:
            hidden_states = layer(hidden_states, attention_mask=None, position_ids=position_ids,
                                  position_embeddings=position_embeddings, use_cache=False)
        hidden_states = base.norm(hidden_states)
        return self.logits_processor(self.lm_head, hidden_states[0])


@dataclass
class _Converter:
    family: Family
    config: Any  # the HF config
    dtype: torch.dtype
    cache_config: CacheConfig
    quant_config: Fp8Config | None

    def __post_init__(self) -> None:
        self._handlers = self._build_handlers()

    # -- the walk ---------------------------------------------------------------------------
    def _build_handlers(self) -> dict[type, Callable[[nn.Module, str], nn.Module | None]]:
        """Exact class -> handler(module, path); a handler returns the replacement, or None to
        keep the module (after converting its children)."""
        f = self.family
        keep = self._keep_container
        table: dict[type, Callable[[nn.Module, str], nn.Module | None]] = {
            f.cls("Model"): keep,
            f.cls("DecoderLayer"): keep,
            nn.ModuleList: keep,
            f.cls("RotaryEmbedding"): self._keep_leaf,
            f.cls("Attention"): self.attention,
            f.cls("RMSNorm"): self.rms_norm,
            nn.Embedding: self.embedding,
        }
        if f.has_mlp:
            table[f.cls("MLP")] = lambda m, p: self.mlp(m, p, reduce_results=True)
        if f.moe:
            table[f.cls("SparseMoeBlock")] = self.moe_block
        return table

    def supported(self) -> list[str]:
        return sorted(c.__name__ for c in self._handlers)

    def convert(self, module: nn.Module, path: str) -> nn.Module | None:
        handler = self._handlers.get(type(module))
        if handler is None:
            raise UnsupportedModuleError(
                f"from_transformers: module {path!r} ({type(module).__module__}.{type(module).__qualname__}) is not "
                f"supported in a {self.family.architecture}; supported modules: {', '.join(self.supported())}"
            )
        return handler(module, path)

    def _keep_container(self, module: nn.Module, path: str) -> None:
        for name, child in list(module.named_children()):
            new = self.convert(child, f"{path}.{name}")
            if new is not None:
                setattr(module, name, new)
        return None

    def _keep_leaf(self, module: nn.Module, path: str) -> None:
        if any(True for _ in module.parameters()):
            raise UnsupportedModuleError(f"from_transformers: {path!r} ({type(module).__name__}) has trainable parameters; "
                                         f"only parameter-free modules (rotary cos/sin) are kept as they are")
        return None

    def _only_children(self, module: nn.Module, path: str, allowed: set[str]) -> None:
        extra = sorted(set(dict(module.named_children())) - allowed)
        if extra:
            raise UnsupportedModuleError(f"from_transformers: {path!r} ({type(module).__name__}) has submodules {extra} the "
                                         f"converter does not know; expected only {sorted(allowed)}")

    # -- leaves -----------------------------------------------------------------------------
    def _linear(self, module: nn.Module, path: str) -> nn.Linear:
        if type(module) is not nn.Linear:
            raise UnsupportedModuleError(f"from_transformers: {path!r} is a {type(module).__name__}; expected torch.nn.Linear")
        return module

    def rms_norm(self, module: nn.Module, path: str) -> RMSNorm:
        norm = RMSNorm(module.weight.shape[0], module.variance_epsilon, self.dtype, prefix=path)
        copy_param(f"{path}.weight", norm.weight, module.weight)
        return norm

    def embedding(self, module: nn.Embedding, path: str) -> VocabParallelEmbedding:
        emb = VocabParallelEmbedding(module.num_embeddings, module.embedding_dim, params_dtype=self.dtype, prefix=path)
        load_vocab(emb, module.weight)
        return emb

    # -- attention --------------------------------------------------------------------------
    def attention(self, module: nn.Module, path: str) -> TransformersAttention:
        c = self.config
        window = self.family.sliding_window(module, c)
        if window:
            raise UnsupportedModuleError(f"from_transformers: {path!r} uses sliding-window attention (window {window}); "
                                         f"the layerpass attention is full causal attention only")
        names = {"q_proj", "k_proj", "v_proj", "o_proj"} | ({"q_norm", "k_norm"} if hasattr(module, "q_norm") else set())
        self._only_children(module, path, names)
        q, k, v, o = (self._linear(getattr(module, n), f"{path}.{n}") for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        head_dim = module.head_dim
        heads, kv_heads = c.num_attention_heads, c.num_key_value_heads
        qkv = QKVParallelLinear(c.hidden_size, head_dim, heads, kv_heads, bias=q.bias is not None,
                                quant_config=self.quant_config, prefix=f"{path}.qkv_proj", params_dtype=self.dtype)
        load_linear(qkv, [q.weight, k.weight, v.weight], [q.bias, k.bias, v.bias])
        o_proj = RowParallelLinear(heads * head_dim, c.hidden_size, bias=o.bias is not None, quant_config=self.quant_config,
                                   prefix=f"{path}.o_proj", params_dtype=self.dtype)
        load_linear(o_proj, [o.weight], [o.bias])
        attn = Attention(qkv.num_heads, head_dim, module.scaling, qkv.num_kv_heads, prefix=f"{path}.attn",
                         cache=self.cache_config, dtype=self.dtype)
        norms = {}
        if hasattr(module, "q_norm"):
            norms = {n: self.convert(getattr(module, n), f"{path}.{n}") for n in ("q_norm", "k_norm")}
        rotary = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb")
        return TransformersAttention(qkv, o_proj, attn, rotary, module.scaling, **norms)

    # -- MLPs and MoE -----------------------------------------------------------------------
    def mlp(self, module: nn.Module, path: str, reduce_results: bool) -> nn.Module | None:
        self._only_children(module, path, {"gate_proj", "up_proj", "down_proj", "act_fn"})
        gate, up, down = (self._linear(getattr(module, n), f"{path}.{n}") for n in ("gate_proj", "up_proj", "down_proj"))
        hidden, inter = gate.in_features, gate.out_features
        has_bias = gate.bias is not None
        down_proj = RowParallelLinear(inter, hidden, bias=down.bias is not None, reduce_results=reduce_results,
                                      quant_config=self.quant_config, prefix=f"{path}.down_proj", params_dtype=self.dtype)
        load_linear(down_proj, [down.weight], [down.bias])
        if self.config.hidden_act in SILU_ACTIVATIONS:
            gate_up = MergedColumnParallelLinear(hidden, [inter, inter], bias=has_bias, quant_config=self.quant_config,
                                                 prefix=f"{path}.gate_up_proj", params_dtype=self.dtype)
            load_linear(gate_up, [gate.weight, up.weight], [gate.bias, up.bias])
            return TransformersMLP(gate_up, SiluAndMul(prefix=f"{path}.act_fn"), down_proj)
        # Not packable with silu_and_mul: keep HF's forward (act(gate(x)) * up(x)) on parallel linears.
        for name, lin in (("gate_proj", gate), ("up_proj", up)):
            col = ColumnParallelLinear(hidden, inter, bias=lin.bias is not None, quant_config=self.quant_config,
                                       prefix=f"{path}.{name}", params_dtype=self.dtype)
            load_linear(col, [lin.weight], [lin.bias])
            setattr(module, name, col)
        module.down_proj = down_proj
        return None

    def moe_block(self, module: nn.Module, path: str) -> TransformersSparseMoeBlock:
        c = self.config
        self._only_children(module, path, {"gate", "experts", "shared_expert", "shared_expert_gate"})
        if c.hidden_act not in SILU_ACTIVATIONS:
            raise UnsupportedModuleError(f"from_transformers: {path!r}: experts with activation {c.hidden_act!r} are not "
                                         f"supported; the MoE op runs SiLU-gated experts ({', '.join(SILU_ACTIVATIONS)})")
        router, experts = module.gate, module.experts
        params = {n for n, _ in experts.named_parameters()}
        if params != {"gate_up_proj", "down_proj"}:
            raise UnsupportedModuleError(f"from_transformers: {path}.experts has parameters {sorted(params)}; supported: "
                                         f"3-D gate_up_proj and down_proj without biases")
        num_experts, hidden = router.weight.shape
        gate = ReplicatedLinear(hidden, num_experts, bias=False, prefix=f"{path}.gate", params_dtype=self.dtype)
        load_linear(gate, [router.weight])
        shared = None
        if hasattr(module, "shared_expert"):
            mlp = self.mlp(module.shared_expert, f"{path}.shared_expert", reduce_results=False) or module.shared_expert
            sgate = None
            if getattr(module, "shared_expert_gate", None) is not None:
                lin = self._linear(module.shared_expert_gate, f"{path}.shared_expert_gate")
                sgate = ReplicatedLinear(hidden, lin.out_features, bias=lin.bias is not None,
                                         prefix=f"{path}.shared_expert_gate", params_dtype=self.dtype)
                load_linear(sgate, [lin.weight], [lin.bias])
            shared = TransformersSharedExpert(mlp, sgate)
        fused = TransformersFusedMoE(experts.gate_up_proj, experts.down_proj, router.top_k, self.family.renormalize(c),
                                     prefix=f"{path}.experts", shared_experts=shared, params_dtype=self.dtype)
        return TransformersSparseMoeBlock(gate, fused)


def model_config_from_hf(hf_config: Any, dtype: torch.dtype, cache_config: CacheConfig, num_state_slots: int,
                         quant_config: Fp8Config | None) -> ModelConfig:
    """The layerpass ``ModelConfig`` describing a converted model (what ``make_step`` and the bench read)."""
    c = hf_config
    heads = c.num_attention_heads
    num_experts = getattr(c, "num_experts", None) or getattr(c, "num_local_experts", None)
    moe: dict[str, Any] = {}
    if num_experts:
        moe = {"num_experts": num_experts, "top_k": c.num_experts_per_tok,
               "moe_intermediate_size": getattr(c, "moe_intermediate_size", None) or c.intermediate_size,
               "norm_topk_prob": bool(getattr(c, "norm_topk_prob", True))}
        if getattr(c, "shared_expert_intermediate_size", None):
            moe["shared_expert_intermediate_size"] = c.shared_expert_intermediate_size
    rope = getattr(c, "rope_parameters", None) or {}
    return ModelConfig(
        num_layers=c.num_hidden_layers, vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_heads=heads,
        num_kv_heads=c.num_key_value_heads, head_size=getattr(c, "head_dim", None) or c.hidden_size // heads,
        intermediate_size=c.intermediate_size, rms_norm_eps=c.rms_norm_eps,
        rope_theta=float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))),
        max_position=c.max_position_embeddings,
        qkv_bias=bool(getattr(c, "qkv_bias", False) or getattr(c, "attention_bias", False)), dtype=dtype,
        num_blocks=cache_config.num_blocks, block_size=cache_config.block_size, num_state_slots=num_state_slots,
        quant_config=quant_config, **moe,
    )


def from_transformers(hf_model: nn.Module, *, cache_config: CacheConfig | None = None,
                      quant_config: Fp8Config | None = None, num_state_slots: int = 32,
                      registry: LayerRegistry | None = None) -> TransformersForCausalLM:
    """Convert ``hf_model`` (a supported ``*ForCausalLM``) IN PLACE: its modules move into the
    returned model, which runs ``make_step`` batches eager or under ``layerpass.compile``.

    ``registry``: the layer registry to build in (default: a new one, labelled with the
    architecture). The result also carries ``config`` (a layerpass ``ModelConfig``),
    ``cache_config``, ``layer_registry``, ``block_allocator``, ``state_allocator``."""
    family = family_of(hf_model)
    register_attention_function()
    cache_config = cache_config if cache_config is not None else CacheConfig(num_blocks=128, block_size=16)
    if quant_config is not None and not isinstance(quant_config, Fp8Config):
        raise TypeError(f"quant_config must be None or an Fp8Config, got {quant_config!r}")
    hf_config = hf_model.config
    dtype = next(hf_model.parameters()).dtype
    children = set(dict(hf_model.named_children()))
    if children != {"model", "lm_head"}:
        raise UnsupportedModuleError(f"from_transformers: {family.architecture} with top-level modules {sorted(children)}; "
                                     f"expected exactly ['lm_head', 'model']")
    tied = hf_model.lm_head.weight is hf_model.model.embed_tokens.weight
    head = hf_model.lm_head
    if type(head) is not nn.Linear:
        raise UnsupportedModuleError(f"from_transformers: 'lm_head' is a {type(head).__name__}; expected torch.nn.Linear")
    converter = _Converter(family, hf_config, dtype, cache_config, quant_config)
    with layer_registry_scope(registry if registry is not None else LayerRegistry(label=family.architecture)) as reg:
        base = hf_model.model
        converter.convert(base, "model")
        lm_head = ParallelLMHead(hf_config.vocab_size, hf_config.hidden_size, bias=head.bias is not None,
                                 params_dtype=dtype, prefix="lm_head")
        if tied:
            lm_head.weight = base.embed_tokens.weight  # same padded shard: keep them one tensor
        else:
            load_vocab(lm_head, head.weight, head.bias)
        logits = LogitsProcessor(hf_config.vocab_size, prefix="logits_processor")
    hf_model.set_attn_implementation(ATTN_IMPLEMENTATION)  # also: HF builds no attention mask
    model = TransformersForCausalLM(base, lm_head, logits, hf_config, family.architecture)
    model.layer_registry = reg
    model.config = model_config_from_hf(hf_config, dtype, cache_config, num_state_slots, quant_config)
    model.cache_config = cache_config
    model.block_allocator = IdAllocator(cache_config.num_blocks, "KV cache block")
    model.state_allocator = IdAllocator(num_state_slots, "recurrent state slot")
    return model.eval()
