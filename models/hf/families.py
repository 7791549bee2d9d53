"""The Hugging Face architectures ``from_transformers`` supports, and what each one's modules are.

A family names its transformers module and class prefix; the converter dispatches on the EXACT
class of every module it meets (a subclass may override ``forward``, so it is not assumed to be
the same computation). Anything else is refused by name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Family:
    architecture: str  # the ForCausalLM class name
    module: str  # transformers.models.<...>.modeling_<...>
    prefix: str  # class-name prefix: <prefix>Model, <prefix>DecoderLayer, ...
    has_mlp: bool = True  # a dense <prefix>MLP class (dense layers, shared experts)
    moe: bool = False  # <prefix>SparseMoeBlock
    # whether the top-k routing weights are renormalised to sum to one
    renormalize: Callable[[Any], bool] = lambda config: bool(getattr(config, "norm_topk_prob", False))
    # the sliding window an attention module would use (None: full causal attention)
    sliding_window: Callable[[Any, Any], Any] = lambda attn, config: getattr(attn, "sliding_window", None)

    def modeling(self) -> Any:
        return importlib.import_module(self.module)

    def cls(self, suffix: str) -> type:
        return getattr(self.modeling(), f"{self.prefix}{suffix}")


FAMILIES: dict[str, Family] = {
    f.architecture: f
    for f in (
        Family("LlamaForCausalLM", "transformers.models.llama.modeling_llama", "Llama"),
        Family("Qwen2MoeForCausalLM", "transformers.models.qwen2_moe.modeling_qwen2_moe", "Qwen2Moe", moe=True),
        Family("MixtralForCausalLM", "transformers.models.mixtral.modeling_mixtral", "Mixtral", has_mlp=False, moe=True,
               renormalize=lambda config: True,  # Mixtral always renormalises its top-k
               sliding_window=lambda attn, config: getattr(config, "sliding_window", None)),
        Family("Qwen3MoeForCausalLM", "transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3Moe", moe=True),
    )
}


def supported_architectures() -> list[str]:
    return sorted(FAMILIES)


class UnsupportedArchitectureError(NotImplementedError):
    """The Hugging Face model's class is not one ``from_transformers`` can convert."""


class UnsupportedModuleError(NotImplementedError):
    """A module inside a supported architecture that the converter does not know how to run."""


def family_of(hf_model: Any) -> Family:
    arch = type(hf_model).__name__
    family = FAMILIES.get(arch)
    if family is None or type(hf_model) is not family.cls("ForCausalLM"):
        raise UnsupportedArchitectureError(
            f"from_transformers: architecture {type(hf_model).__module__}.{arch} is not supported; "
            f"supported: {', '.join(supported_architectures())}"
        )
    return family
