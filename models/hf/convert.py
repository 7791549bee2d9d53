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
"""

from __future__ import annotations

import copy
import inspect
import re
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from layerpass.layers import (
    Attention,
    CacheConfig,
    ColumnParallelLinear,
    Fp8Config,
    LogitsProcessor,
    MergedColumnParallelLinear,
    ParallelLMHead,
    PluggableLayer,
    QKVParallelLinear,
    ReplicatedLinear,
    RMSNorm,
    RowParallelLinear,
    SiluAndMul,
    VocabParallelEmbedding,
    get_tp_rank,
    get_tp_world_size,
)
from layerpass.layers.layernorm import GemmaRMSNorm
from layerpass.layers.weights import shard
from layerpass.ops import LayerRegistry, layer_registry_scope, set_forward_context

from ..allocator import IdAllocator
from ..config import ModelConfig
from .attention import (
    ATTN_IMPLEMENTATION,
    PROBE_IMPLEMENTATION,
    AttentionCall,
    GatheredPacked,
    PackedSlice,
    TransformersAttention,
    packed_slices,
    recording_attention_calls,
    register_attention_function,
)
from .families import (
    MOE_FAMILIES,
    MoeFamily,
    UnsupportedArchitectureError,
    UnsupportedModuleError,
    check_convertible,
    supported_architectures,
)
from .hub_kernels import bypass_kernel_routing
from .layers import TransformersLMHead, TransformersScaledEmbedding
from .loading import copy_param, load_linear, load_vocab
from .mlp import TransformersMLP, TransformersPackedMLP
from .moe import TransformersSparseMoeBlock, convert_moe_block

# base_model_tp_plan styles (transformers/distributed/tensor_parallel.py), by what they mean here
COLWISE = {"colwise", "packed_colwise", "local_colwise"}
COLWISE_GATHER = {"colwise_gather_output", "colwise_rep"}
ROWWISE = {"rowwise", "packed_rowwise", "local_rowwise"}
ROWWISE_SPLIT = {"rowwise_split_input", "rowwise_rep"}
# keyword arguments an attention module may pass the attention function that change nothing here
# modules the converter builds (their children are layerpass layers already)
CONVERTED = (TransformersAttention, TransformersMLP, TransformersPackedMLP, TransformersSparseMoeBlock, GatheredPacked,
             PackedSlice, TransformersLMHead, TransformersScaledEmbedding)
HARMLESS_ATTENTION_KWARGS = {"position_ids", "use_cache", "output_attentions", "cache_position", "layer_idx"}
OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "dense")  # an attention module's output projection, by family


class TransformersForCausalLM(nn.Module):
    """``forward(input_ids [T], positions [T]) -> logits [T, vocab]``, like the zoo models.

    The step's tokens (all requests, decode-first) run as one sequence of batch 1 through the HF
    ``*ForCausalLM``'s own forward (``hf``), undecorated: its base model's forward is its own too,
    minus transformers' output-capturing wrappers (``capture_outputs`` reads a process-wide
    registry Dynamo would guard on, so every new HF class would invalidate compiled code).
    Attention separates the requests by the step's metadata; transformers builds no mask for it."""

    packed_modules_mapping: dict[str, list[str]] = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
        "experts": ["gate_proj", "up_proj"],  # FusedMoEWithLoRA: separate gate and up adapters
    }

    def __init__(self, hf_model: nn.Module, head_name: str, architecture: str) -> None:
        super().__init__()
        self.hf = hf_model
        self.hf_config = hf_model.config
        self.architecture = architecture
        self._head_name = head_name
        self._hf_forward = inspect.unwrap(type(hf_model).forward)

    @property
    def model(self) -> nn.Module:
        """The HF base model (``model.layers``, ``model.embed_tokens``, ...)."""
        return self.hf.base_model

    @property
    def lm_head(self) -> ParallelLMHead:
        return getattr(self.hf, self._head_name).lm_head

    @property
    def logits_processor(self) -> LogitsProcessor:
        return getattr(self.hf, self._head_name).logits_processor

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # checked in eager only: under torch.compile the token count may be an unbacked symbol
        if not torch.compiler.is_compiling():
            from layerpass.backend.inputs import check_step_inputs, max_position  # ValueError; no import cycle

            check_step_inputs(input_ids, positions, max_position=max_position(self))
        out = self._hf_forward(self.hf, input_ids=input_ids.unsqueeze(0), position_ids=positions.unsqueeze(0),
                               use_cache=False)
        return out.logits[0]


class TPPlan:
    """A model's ``base_model_tp_plan``: the style of a module path (``*`` matches one path part)."""

    def __init__(self, plan: dict[str, str] | None, base_prefix: str) -> None:
        self.plan = dict(plan or {})
        self.base_prefix = base_prefix
        self._patterns = [(re.compile(re.escape(k).replace(r"\*", r"[^.]+")), v) for k, v in self.plan.items()]

    def style(self, path: str) -> str | None:
        rel = path[len(self.base_prefix) + 1:] if path.startswith(self.base_prefix + ".") else path
        for pattern, style in self._patterns:
            if pattern.fullmatch(rel):
                return style
        return None


def _rel_close(out: torch.Tensor, ref: torch.Tensor, tol: float) -> bool:
    if out.shape != ref.shape or not torch.isfinite(ref).all():
        return False
    scale = float(ref.float().abs().max())
    return float((out.float() - ref.float()).abs().max()) <= tol * max(scale, 1e-30)


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2


class _Converter:
    def __init__(self, hf_model: nn.Module, dtype: torch.dtype, cache_config: CacheConfig,
                 quant_config: Fp8Config | None) -> None:
        self.hf_model = hf_model
        self.config = hf_model.config
        self.dtype = dtype
        self.cache_config = cache_config
        self.quant_config = quant_config
        self.base_prefix = hf_model.base_model_prefix
        self.plan = TPPlan(getattr(self.config, "base_model_tp_plan", None), self.base_prefix)
        self.input_embedding = hf_model.get_input_embeddings()
        self.moe_blocks: dict[type, MoeFamily] = {}
        for fam in MOE_FAMILIES:
            try:
                self.moe_blocks[fam.cls()] = fam
            except (ImportError, AttributeError):  # pragma: no cover - an older/newer transformers
                pass
        self.paths: dict[int, str] = {}  # id(HF module) -> its path in the HF model
        self._probes: dict[tuple[str, type], Any] = {}  # (probe, module class) -> result
        self.converted_embedding: nn.Module | None = None

    # -- the walk ---------------------------------------------------------------------------
    def convert_children(self, module: nn.Module, path: str) -> None:
        for name, child in list(module.named_children()):
            new = self.convert(child, f"{path}.{name}")
            if new is not None and new is not child:
                setattr(module, name, new)

    def convert(self, module: nn.Module, path: str) -> nn.Module | None:
        """The replacement of ``module`` (None: keep it; its children are converted)."""
        if isinstance(module, (PluggableLayer, *CONVERTED)):
            return None  # already a layerpass layer (or made of them)
        first = self.paths.get(id(module))
        if first is not None and any(True for _ in module.parameters()):
            raise UnsupportedModuleError(f"from_transformers: {path!r} is the same {type(module).__name__} as {first!r}; "
                                         f"layerpass gives every layer its own name and state (KV cache), so a module "
                                         f"with weights cannot be used at two places")
        self.paths[id(module)] = path
        fam = self.moe_blocks.get(type(module))
        if fam is not None:
            return convert_moe_block(self, module, path, fam)
        if module is self.input_embedding:
            return self.embedding(module, path)
        if type(module) is nn.Linear:
            return self.linear(module, path)
        if self._has_linears(module, "q_proj", "k_proj", "v_proj"):
            return self.attention_qkv(module, path)
        if self._has_linears(module, "down_proj") and (self._has_linears(module, "gate_proj", "up_proj")
                                                       or self._has_linears(module, "gate_up_proj")):
            return self.mlp(module, path)
        if self._has_linears(module, "qkv_proj") and isinstance(getattr(module, "head_dim", None), int):
            module.qkv_proj = self.packed_qkv(module, path)
        norm = self.rms_norm(module, path)
        if norm is not None:
            return norm
        self.convert_children(module, path)
        return None

    @staticmethod
    def _has_linears(module: nn.Module, *names: str) -> bool:
        return all(type(module._modules.get(n)) is nn.Linear for n in names)

    # -- linears ----------------------------------------------------------------------------
    def _check_divisible(self, n: int, what: str) -> None:
        tp = get_tp_world_size()
        if n % tp:
            raise UnsupportedModuleError(f"from_transformers: {what} ({n}) is not divisible by the tensor-parallel size {tp}")

    def linear(self, lin: nn.Linear, path: str, style: str | None = None, reduce_results: bool = True) -> nn.Module:
        """``lin`` as the layerpass linear its tensor-parallel style asks for (default: the plan's)."""
        style = self.plan.style(path) if style is None else style
        bias = lin.bias is not None
        common = dict(quant_config=self.quant_config, prefix=path, params_dtype=self.dtype)
        if style in COLWISE or style in COLWISE_GATHER:
            layer: nn.Module = ColumnParallelLinear(lin.in_features, lin.out_features, bias=bias,
                                                    gather_output=style in COLWISE_GATHER, **common)
        elif style in ROWWISE or style in ROWWISE_SPLIT:
            layer = RowParallelLinear(lin.in_features, lin.out_features, bias=bias, input_is_parallel=style in ROWWISE,
                                      reduce_results=reduce_results, **common)
        else:
            layer = ReplicatedLinear(lin.in_features, lin.out_features, bias=bias, **common)
        load_linear(layer, [lin.weight], [lin.bias])
        return layer

    def _packed_gather(self, path: str, names: list[str]) -> bool | None:
        """For linears ``names`` of module ``path`` packed into one column-parallel layer: whether
        each slice must be gathered (their plan style replicates the output, or they have none),
        or None when their styles disagree or are not column styles (not packable)."""
        styles = {self.plan.style(f"{path}.{n}") for n in names}
        if len(styles) != 1:
            return None
        style = styles.pop()
        if style in COLWISE:
            return False
        if style in COLWISE_GATHER or style is None:  # no plan entry: the output is replicated
            return True
        return None

    # -- attention --------------------------------------------------------------------------
    def attention_qkv(self, module: nn.Module, path: str) -> nn.Module | None:
        names = ["q_proj", "k_proj", "v_proj"]
        q, k, v = (module._modules[n] for n in names)
        head_dim = getattr(module, "head_dim", None)
        gather = self._packed_gather(path, names)
        biases = [x.bias is not None for x in (q, k, v)]
        if (gather is None or not isinstance(head_dim, int) or len({q.in_features, k.in_features, v.in_features}) != 1
                or len(set(biases)) != 1 or q.out_features % head_dim or k.out_features % head_dim
                or k.out_features != v.out_features or (q.out_features // head_dim) % (k.out_features // head_dim)):
            self.convert_children(module, path)  # not a layout we pack: one linear each
            return None
        heads, kv_heads = q.out_features // head_dim, k.out_features // head_dim
        self._check_divisible(kv_heads, f"{path}: number of KV heads")
        qkv = QKVParallelLinear(q.in_features, head_dim, heads, kv_heads, bias=biases[0], quant_config=self.quant_config,
                                prefix=f"{path}.qkv_proj", params_dtype=self.dtype)
        load_linear(qkv, [q.weight, k.weight, v.weight], [q.bias, k.bias, v.bias])
        for name, piece in zip(names, packed_slices(qkv, gather)):
            setattr(module, name, piece)
        self.convert_children(module, path)  # o_proj, q/k norms, ...
        return TransformersAttention(qkv, module)

    def packed_qkv(self, module: nn.Module, path: str) -> nn.Module:
        """An already packed ``qkv_proj`` (Phi-3): rows ``[q | k | v]`` -> ``QKVParallelLinear``."""
        lin, head_dim, c = module.qkv_proj, module.head_dim, self.config
        heads = getattr(c, "num_attention_heads", None)
        kv_heads = getattr(module, "num_key_value_heads", None) or getattr(c, "num_key_value_heads", None) or heads
        gather = self._packed_gather(path, ["qkv_proj"])
        if (gather is None or not heads or lin.out_features != (heads + 2 * kv_heads) * head_dim
                or heads % kv_heads):
            return self.linear(lin, f"{path}.qkv_proj")
        self._check_divisible(kv_heads, f"{path}: number of KV heads")
        qkv = QKVParallelLinear(lin.in_features, head_dim, heads, kv_heads, bias=lin.bias is not None,
                                quant_config=self.quant_config, prefix=f"{path}.qkv_proj", params_dtype=self.dtype)
        sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
        load_linear(qkv, list(lin.weight.split(sizes)), list(lin.bias.split(sizes)) if lin.bias is not None else None)
        return GatheredPacked(qkv) if gather and qkv.tp_size > 1 else qkv

    def attach_attention(self, calls: list[AttentionCall]) -> None:
        """Give every attention module the dry run saw its layerpass ``Attention``."""
        if not calls:
            raise UnsupportedModuleError(f"from_transformers: no module of {type(self.hf_model).__name__} called the "
                                         f"attention function in a dry run; nothing to run layerpass attention on")
        seen: set[int] = set()
        for call in calls:
            module = call.module
            path = self.paths.get(id(module))
            what = f"{path or type(module).__name__!r} ({type(module).__name__})"
            if path is None:
                raise UnsupportedModuleError(f"from_transformers: attention module {what} is not part of the base model")
            if id(module) in seen:
                raise UnsupportedModuleError(f"from_transformers: attention module {what} is called more than once per "
                                             f"forward; layerpass gives each attention layer one KV cache")
            seen.add(id(module))
            if getattr(module, "is_causal", True) is False:
                raise UnsupportedModuleError(f"from_transformers: {what} uses bidirectional attention (is_causal=False); "
                                             f"the layerpass attention is causal")
            if call.head_size != call.value_head_size:
                raise UnsupportedModuleError(f"from_transformers: {what} has key head size {call.head_size} and value head "
                                             f"size {call.value_head_size}; the layerpass attention needs them equal")
            kwargs = dict(call.kwargs)
            scaling = kwargs.pop("scaling", None)
            dropout = kwargs.pop("dropout", 0.0)
            sliding_window = kwargs.pop("sliding_window", None) or None
            softcap = kwargs.pop("softcap", None) or None
            sinks = kwargs.pop("s_aux", None)
            unknown = sorted(k for k, val in kwargs.items() if k not in HARMLESS_ATTENTION_KWARGS and val is not None
                             and val is not False)
            if unknown:
                raise UnsupportedModuleError(f"from_transformers: {what} passes the attention function {unknown}, which "
                                             f"the layerpass attention does not implement")
            if dropout:
                raise UnsupportedModuleError(f"from_transformers: {what} uses attention dropout {dropout}")
            features: dict[str, Any] = {}
            if sliding_window is not None:
                features["sliding_window"] = int(sliding_window)
            if softcap is not None:
                features["logits_soft_cap"] = float(softcap)
            if sinks is not None:
                features["use_sinks"] = True
            scale = float(scaling) if scaling is not None else call.head_size ** -0.5
            try:
                attn = Attention(call.num_heads, call.head_size, scale, call.num_kv_heads, prefix=f"{path}.attn",
                                 cache=self.cache_config, dtype=self.dtype, **features)
            except TypeError as e:
                raise UnsupportedModuleError(f"from_transformers: {what} needs attention features {sorted(features)} "
                                             f"this layerpass Attention does not take ({e})") from e
            if sinks is not None:
                self._load_sinks(attn, sinks, what)
            module.attn = attn

    def _load_sinks(self, attn: Attention, sinks: torch.Tensor, what: str) -> None:
        full = sinks.detach().float().reshape(-1)
        tp = get_tp_world_size()
        if full.numel() == attn.num_heads:
            local = full
        elif full.numel() == attn.num_heads * tp:
            local = shard(full, 0, get_tp_rank(), tp)
        else:
            raise UnsupportedModuleError(f"from_transformers: {what} passes {full.numel()} attention sinks for "
                                         f"{attn.num_heads} heads per rank")
        copy_param(f"{attn.prefix}.sinks", attn.sinks, local.to(attn.sinks.dtype))

    # -- MLPs -------------------------------------------------------------------------------
    def _probe_input(self, width: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(width)
        return torch.randn(2, 3, width, generator=g).to(self.dtype)

    def _param_free_others(self, module: nn.Module, names: set[str]) -> bool:
        others = [m for n, m in module.named_children() if n not in names]
        return not any(True for m in others for _ in m.parameters()) and not any(True for _ in module.parameters(recurse=False))

    def mlp(self, module: nn.Module, path: str, reduce_results: bool = True) -> nn.Module | None:
        """A gated MLP: ``TransformersMLP`` where it is SiLU-gated, else its own forward on a packed
        ``gate_up_proj`` (or, for a layout we cannot pack, one parallel linear per projection)."""
        separate = self._has_linears(module, "gate_proj", "up_proj")
        names = {"gate_proj", "up_proj", "down_proj"} if separate else {"gate_up_proj", "down_proj"}
        down = module.down_proj
        if separate:
            gate, up = module.gate_proj, module.up_proj
            ok = (gate.in_features == up.in_features and gate.out_features == up.out_features
                  and (gate.bias is None) == (up.bias is None))
            weights, biases = [gate.weight, up.weight], [gate.bias, up.bias]
        else:
            gu = module.gate_up_proj
            ok = gu.out_features % 2 == 0
            weights = list(gu.weight.chunk(2))
            biases = list(gu.bias.chunk(2)) if gu.bias is not None else [None, None]
        hidden, inter = weights[0].shape[1], weights[0].shape[0]
        ok = ok and down.in_features == inter and down.out_features == hidden and self._param_free_others(module, names)
        if ok and self._probe(("silu_mlp", type(module)), lambda: self._is_silu_mlp(module, weights, biases)):
            self._check_divisible(inter, f"{path}: intermediate size")
            gate_up = MergedColumnParallelLinear(hidden, [inter, inter], bias=biases[0] is not None,
                                                 quant_config=self.quant_config, prefix=f"{path}.gate_up_proj",
                                                 params_dtype=self.dtype)
            load_linear(gate_up, weights, biases)
            down_proj = RowParallelLinear(inter, hidden, bias=down.bias is not None, reduce_results=reduce_results,
                                          quant_config=self.quant_config, prefix=f"{path}.down_proj", params_dtype=self.dtype)
            load_linear(down_proj, [down.weight], [down.bias])
            return TransformersMLP(gate_up, SiluAndMul(prefix=f"{path}.act_fn"), down_proj)
        down_style = None if reduce_results else "rowwise"
        if not reduce_results and get_tp_world_size() > 1:
            raise UnsupportedModuleError(f"from_transformers: {path!r} ({type(module).__name__}) is a shared expert that is "
                                         f"not a SiLU-gated MLP; under tensor parallelism its partial sums cannot be reduced "
                                         f"with the experts'")
        gather = self._packed_gather(path, sorted(names - {"down_proj"}))
        if separate and ok and gather is not None and self._probe(("packed_mlp", type(module)),
                                                                  lambda: self._runs_on_packed(module)):
            gate_up = MergedColumnParallelLinear(hidden, [inter, inter], bias=biases[0] is not None,
                                                 quant_config=self.quant_config, prefix=f"{path}.gate_up_proj",
                                                 params_dtype=self.dtype)
            load_linear(gate_up, weights, biases)
            module.gate_proj, module.up_proj = packed_slices(gate_up, gather=gather)
            module.down_proj = self.linear(down, f"{path}.down_proj", style=down_style, reduce_results=reduce_results)
            self.convert_children(module, path)
            return TransformersPackedMLP(gate_up, module)
        if not separate and ok and gather is not None:  # packed in the checkpoint already: load as is
            gate_up = MergedColumnParallelLinear(hidden, [inter, inter], bias=biases[0] is not None,
                                                 quant_config=self.quant_config, prefix=f"{path}.gate_up_proj",
                                                 params_dtype=self.dtype)
            load_linear(gate_up, weights, biases)
            module.gate_up_proj = GatheredPacked(gate_up) if gather and gate_up.tp_size > 1 else gate_up
            module.down_proj = self.linear(down, f"{path}.down_proj", style=down_style, reduce_results=reduce_results)
            self.convert_children(module, path)
            return None
        self.convert_children(module, path)
        return None

    def _probe(self, key: tuple[str, type], run: Any) -> Any:
        """``run()``'s result (False if it raises), once per (probe, module class) and conversion."""
        if key not in self._probes:
            with torch.no_grad():
                try:
                    self._probes[key] = run()
                except Exception:  # a module that cannot even run the probe does not compute the same
                    self._probes[key] = False
        return self._probes[key]

    def _is_silu_mlp(self, module: nn.Module, weights: list[torch.Tensor], biases: list[torch.Tensor | None]) -> bool:
        """Does ``module(x)`` equal ``down(silu_and_mul([gate(x) | up(x)]))`` (the op layerpass runs)?"""
        x = self._probe_input(weights[0].shape[1])
        ref = module(x)
        gate_up = torch.cat([F.linear(x, w, b) for w, b in zip(weights, biases)], dim=-1)
        out = F.linear(torch.ops.layerpass.silu_and_mul(gate_up), module.down_proj.weight, module.down_proj.bias)
        return isinstance(ref, torch.Tensor) and _rel_close(out, ref, _tolerance(self.dtype))

    def _runs_on_packed(self, module: nn.Module) -> bool:
        """Does the module's forward give the same result when handed ``[gate(x) | up(x)]`` and
        slices of it as its projections (it uses ``x`` for nothing else)?"""
        gate, up = module.gate_proj, module.up_proj
        x = self._probe_input(gate.in_features)
        ref = module(x)
        packed = torch.cat([gate(x), up(x)], dim=-1)
        inter = gate.out_features
        module.gate_proj, module.up_proj = PackedSlice(0, inter), PackedSlice(inter, inter)
        try:
            out = module(packed)
        finally:
            module.gate_proj, module.up_proj = gate, up
        return isinstance(ref, torch.Tensor) and _rel_close(out, ref, 1e-6)

    # -- norms and embeddings ---------------------------------------------------------------
    def rms_norm(self, module: nn.Module, path: str) -> nn.Module | None:
        """``RMSNorm`` / ``GemmaRMSNorm`` where a float32 probe shows it computes what ``module`` does."""
        params = dict(module.named_parameters())
        eps = next((getattr(module, a) for a in ("variance_epsilon", "eps") if isinstance(getattr(module, a, None), float)),
                   None)
        if (set(params) != {"weight"} or params["weight"].dim() != 1 or eps is None or any(True for _ in module.buffers())
                or any(True for _ in module.children())):
            return None
        kind = self._probe(("rms_norm", type(module)), lambda: self._norm_kind(module, eps))
        if not kind:
            return None
        weight = params["weight"]
        if kind == "gemma":
            norm = GemmaRMSNorm(weight.shape[0], eps, prefix=path)
            norm.load_offset_weight(weight)
            return norm
        norm = RMSNorm(weight.shape[0], eps, self.dtype, prefix=path)
        copy_param(f"{path}.weight", norm.weight, weight)
        return norm

    @staticmethod
    def _norm_kind(module: nn.Module, eps: float) -> str | bool:
        probe = copy.deepcopy(module).float()
        d = probe.weight.shape[0]
        g = torch.Generator().manual_seed(d)
        probe.weight.data = torch.randn(d, generator=g)
        x = torch.randn(2, 3, d, generator=g)
        for kind, w in (("rms", probe.weight), ("gemma", 1.0 + probe.weight)):
            # unit-scale inputs, and inputs small enough for eps to matter
            if all(_rel_close(torch.ops.layerpass.rms_norm(xs, w.detach(), eps), probe(xs), 1e-6) for xs in (x, x * 1e-3)):
                return kind
        return False

    def embedding(self, module: nn.Module, path: str) -> nn.Module | None:
        """The input embedding, vocabulary-parallel (kept as an HF module when it does more than a
        lookup, times Gemma's ``embed_scale``)."""
        if not isinstance(module, nn.Embedding) or module.max_norm is not None:
            self.convert_children(module, path)
            return None
        scale = getattr(module, "embed_scale", None)
        if type(module) is not nn.Embedding:
            if scale is None:
                return None
            scale = scale if isinstance(scale, torch.Tensor) else torch.tensor(float(scale))

            def same() -> bool:
                ids = torch.randint(0, module.num_embeddings, (2, 5), generator=torch.Generator().manual_seed(0))
                ref = module(ids)
                return torch.equal(F.embedding(ids, module.weight) * scale.to(module.weight.dtype), ref)

            if not self._probe(("scaled_embedding", type(module)), same):
                return None
        emb = VocabParallelEmbedding(module.num_embeddings, module.embedding_dim, params_dtype=self.dtype, prefix=path)
        load_vocab(emb, module.weight)
        out: nn.Module = emb if type(module) is nn.Embedding else TransformersScaledEmbedding(emb, scale)
        self.converted_embedding = emb
        return out


def _count(config: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


def model_config_from_hf(hf_config: Any, dtype: torch.dtype, cache_config: CacheConfig, num_state_slots: int,
                         quant_config: Fp8Config | None, attention: Attention | None = None) -> ModelConfig:
    """The layerpass ``ModelConfig`` describing a converted model (what ``make_step`` and the bench
    read); ``attention``: one of its layers (head geometry, when the config does not say)."""
    c = getattr(hf_config, "get_text_config", lambda: hf_config)()
    hidden = c.hidden_size
    heads = _count(c, "num_attention_heads", default=attention.num_heads if attention is not None else 1)
    kv_heads = _count(c, "num_key_value_heads", default=heads)
    head_size = _count(c, "head_dim", default=attention.head_size if attention is not None else hidden // heads)
    num_experts = _count(c, "num_experts", "num_local_experts")
    moe: dict[str, Any] = {}
    if num_experts:
        moe = {"num_experts": num_experts, "top_k": c.num_experts_per_tok,
               "moe_intermediate_size": _count(c, "moe_intermediate_size", "intermediate_size"),
               "norm_topk_prob": bool(getattr(c, "norm_topk_prob", True))}
        if getattr(c, "shared_expert_intermediate_size", None):
            moe["shared_expert_intermediate_size"] = c.shared_expert_intermediate_size
    rope = getattr(c, "rope_parameters", None) or {}
    if not isinstance(rope, dict) or "rope_theta" not in rope:  # per-layer-type parameters (Gemma 3)
        rope = next((v for v in (rope.values() if isinstance(rope, dict) else []) if isinstance(v, dict)), {})
    return ModelConfig(
        num_layers=c.num_hidden_layers, vocab_size=c.vocab_size, hidden_size=hidden, num_heads=heads,
        num_kv_heads=kv_heads, head_size=head_size, intermediate_size=_count(c, "intermediate_size", default=4 * hidden),
        rms_norm_eps=float(_count(c, "rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps", default=1e-6)),
        rope_theta=float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))),
        max_position=_count(c, "max_position_embeddings", default=4096),
        qkv_bias=bool(getattr(c, "qkv_bias", False) or getattr(c, "attention_bias", False)), dtype=dtype,
        num_blocks=cache_config.num_blocks, block_size=cache_config.block_size, num_state_slots=num_state_slots,
        quant_config=quant_config, **moe,
    )


def _output_width_error(call: AttentionCall, path: str | None, hf_config: Any) -> ValueError | None:
    """The clear error for an attention module whose output projection does not take what the
    attention returns (heads * head_dim features): the dry run fails on it with a shape error, and
    so would the Hugging Face model (Helium builds ``o_proj`` as hidden_size -> hidden_size)."""
    width = call.num_heads * call.value_head_size
    for name in OUTPUT_PROJECTIONS:
        proj = call.module._modules.get(name)
        takes = {getattr(proj, a, None) for a in ("in_features", "input_size", "input_size_per_partition")} - {None}
        if takes and width not in takes:
            c = getattr(hf_config, "get_text_config", lambda: hf_config)()
            return ValueError(
                f"from_transformers: {path or type(call.module).__name__!r} ({type(call.module).__name__}) returns "
                f"{call.num_heads} heads x head_dim {call.value_head_size} = {width} attention features, but its {name} "
                f"takes {max(takes)} (config: head_dim={getattr(c, 'head_dim', None)}, num_attention_heads="
                f"{getattr(c, 'num_attention_heads', None)}, hidden_size={getattr(c, 'hidden_size', None)}); the "
                f"Hugging Face model cannot run this config either: use a head_dim with num_attention_heads * head_dim "
                f"= {max(takes)}")
    return None


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
    converter = _Converter(hf_model, dtype, cache_config, quant_config)
    hf_model.eval()
    with layer_registry_scope(registry if registry is not None else LayerRegistry(label=architecture)) as reg:
        converter.convert_children(base, hf_model.base_model_prefix)
        lm_head = ParallelLMHead(hf_config.vocab_size, head.in_features, bias=head.bias is not None, params_dtype=dtype,
                                 prefix=head_name)
        if tied and converter.converted_embedding is not None:
            lm_head.weight = converter.converted_embedding.weight  # same padded shard: keep them one tensor
        else:
            load_vocab(lm_head, head.weight, head.bias)
        setattr(hf_model, head_name, TransformersLMHead(lm_head, LogitsProcessor(hf_config.vocab_size, prefix="logits_processor")))
        _run_base_model_undecorated(base)
        bypass_kernel_routing(base)  # kernels' per-instance routing: its local-class wrappers cannot be saved
        model = TransformersForCausalLM(hf_model, head_name, architecture)
        # the dry run: one token, to see what every attention module passes the attention function
        hf_model.set_attn_implementation(PROBE_IMPLEMENTATION)
        zero = torch.zeros(1, dtype=torch.long)
        with recording_attention_calls() as calls, torch.no_grad(), set_forward_context(None, reg):
            try:
                model(zero, zero)
            except RuntimeError as e:  # a shape error: say which module and why, where we can
                error = _output_width_error(calls[-1], converter.paths.get(id(calls[-1].module)), hf_config) if calls else None
                if error is not None:
                    raise error from e
                raise
        converter.attach_attention(calls)
    hf_model.set_attn_implementation(ATTN_IMPLEMENTATION)
    model.layer_registry = reg
    model.config = model_config_from_hf(hf_config, dtype, cache_config, num_state_slots, quant_config,
                                        attention=calls[0].module.attn)
    model.cache_config = cache_config
    model.block_allocator = IdAllocator(cache_config.num_blocks, "KV cache block")
    model.state_allocator = IdAllocator(num_state_slots, "recurrent state slot")
    return model.eval()
