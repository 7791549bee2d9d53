"""Sparse MoE blocks of the families in ``MOE_FAMILIES`` -> ``TransformersSparseMoeBlock`` (``moe.py``)."""

from __future__ import annotations

from typing import Any

from torch import nn

from layerpass.layers import ReplicatedLinear

from .conversion import Conversion
from .convert_mlp import convert_mlp
from .families import MOE_FAMILIES, MoeFamily, UnsupportedModuleError
from .loading import load_linear
from .moe import TransformersFusedMoE, TransformersSharedExpert, TransformersSparseMoeBlock

SILU_ACTIVATIONS = ("silu", "swish")


def moe_block_classes() -> dict[type, MoeFamily]:
    """The sparse block class of every MoE family this transformers release has."""
    blocks: dict[type, MoeFamily] = {}
    for fam in MOE_FAMILIES:
        try:
            blocks[fam.cls()] = fam
        except (ImportError, AttributeError):  # pragma: no cover - an older/newer transformers
            pass
    return blocks


def convert_moe_block(conv: Conversion, module: nn.Module, path: str, family: MoeFamily) -> TransformersSparseMoeBlock:
    """The per-family handler of a sparse block (``MOE_FAMILIES``): router (``gate``: a ``weight``
    ``[E, H]`` and ``top_k``), 3-D experts, optional shared expert and its sigmoid gate."""
    c: Any = conv.config
    allowed = {"gate", "experts", "shared_expert", "shared_expert_gate"}
    extra = sorted(set(dict(module.named_children())) - allowed)
    if extra:
        raise UnsupportedModuleError(f"from_transformers: {path!r} ({type(module).__name__}) has submodules {extra} the "
                                     f"MoE handler does not know; expected only {sorted(allowed)}")
    if getattr(c, "hidden_act", "silu") not in SILU_ACTIVATIONS:
        raise UnsupportedModuleError(f"from_transformers: {path!r}: experts with activation {c.hidden_act!r} are not "
                                     f"supported; the MoE op runs SiLU-gated experts ({', '.join(SILU_ACTIVATIONS)})")
    router, experts = module.gate, module.experts
    params = {n for n, _ in experts.named_parameters()}
    if params != {"gate_up_proj", "down_proj"}:
        raise UnsupportedModuleError(f"from_transformers: {path}.experts has parameters {sorted(params)}; supported: "
                                     f"3-D gate_up_proj and down_proj without biases")
    num_experts, hidden = router.weight.shape
    gate = ReplicatedLinear(hidden, num_experts, bias=False, prefix=f"{path}.gate", params_dtype=conv.dtype)
    load_linear(gate, [router.weight])
    shared = None
    if getattr(module, "shared_expert", None) is not None:
        mlp = convert_mlp(conv, module.shared_expert, f"{path}.shared_expert", reduce_results=False) or module.shared_expert
        sgate = None
        if getattr(module, "shared_expert_gate", None) is not None:
            lin = module.shared_expert_gate
            if type(lin) is not nn.Linear:
                raise UnsupportedModuleError(f"from_transformers: {path}.shared_expert_gate is a {type(lin).__name__}; "
                                             f"expected torch.nn.Linear")
            sgate = ReplicatedLinear(hidden, lin.out_features, bias=lin.bias is not None,
                                     prefix=f"{path}.shared_expert_gate", params_dtype=conv.dtype)
            load_linear(sgate, [lin.weight], [lin.bias])
        shared = TransformersSharedExpert(mlp, sgate)
    fused = TransformersFusedMoE(experts.gate_up_proj, experts.down_proj, router.top_k, family.renormalize(c),
                                 prefix=f"{path}.experts", shared_experts=shared, params_dtype=conv.dtype)
    return TransformersSparseMoeBlock(gate, fused)
