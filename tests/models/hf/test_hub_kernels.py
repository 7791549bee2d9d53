"""``bypass_kernel_routing`` (``models/hf/hub_kernels.py``): with the ``kernels`` package, transformers
routes e.g. ``apply_rotary_pos_emb`` through per-model wrappers whose class is defined in local
scope, which ``aot_compile`` cannot save. A converted model's modules run the forward the routing
wraps instead: bitwise the same logits as the routed HF model, on an instance attribute only
(transformers' classes and module globals untouched), and never where a wrapper is kernelized.
``from_transformers`` is to call it on the converted base model (see ``models/hf/hub_kernels.py``).
"""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("kernels")

from layerpass.models.hf.hub_kernels import bypass_kernel_routing, routed_forward  # noqa: E402
from layerpass.models.hf.zoo import build_hf_model  # noqa: E402
from tests.models.hf.common import hf_config, hf_logits, matches_hf, pair  # noqa: E402


def _routed(model: torch.nn.Module) -> list[str]:
    return [p for p, m in model.named_modules() if routed_forward(m) is not None]


def test_bypass_is_bitwise_identical_and_local() -> None:
    hf = build_hf_model(hf_config("hf-llama", 2), seed=0)
    ref = copy.deepcopy(hf)
    attn_cls = type(hf.model.layers[0].self_attn)
    class_forward = attn_cls.forward
    module = sys.modules[attn_cls.__module__]
    module_globals = dict(vars(module))
    routed = _routed(hf.model)
    if not routed:
        pytest.skip("this transformers routes no function through kernels")
    assert bypass_kernel_routing(hf.model) == routed == ["layers.0.self_attn", "layers.1.self_attn"]
    for path in routed:
        m = hf.model.get_submodule(path)
        assert m.forward.__func__ is class_forward.__wrapped__ and m.forward.__self__ is m
    assert _routed(hf.model) == []  # done once
    assert bypass_kernel_routing(hf.model) == []
    # the class, the module's globals and the other model are as they were
    assert attn_cls.forward is class_forward
    assert all(vars(module)[k] is v for k, v in module_globals.items())
    assert "forward" not in vars(ref.model.layers[0].self_attn)
    tokens = [5, 17, 3, 99, 42, 7, 1]
    assert torch.equal(hf_logits(hf, tokens), hf_logits(ref, tokens))


def test_kernelized_wrapper_keeps_routing() -> None:
    hf = build_hf_model(hf_config("hf-llama", 2), seed=0)
    attn = hf.model.layers[0].self_attn
    if routed_forward(attn) is None:
        pytest.skip("this transformers routes no function through kernels")
    for wrapper in vars(attn)["_kernel_funcs"].values():  # what kernels.kernelize does with a hub kernel
        wrapper.forward = types.MethodType(type(wrapper).forward, wrapper)
    assert bypass_kernel_routing(hf.model) == ["layers.1.self_attn"]
    assert "forward" not in vars(attn)


def test_kernelized_global_wrapper_keeps_routing() -> None:
    hf = build_hf_model(hf_config("hf-llama", 2), seed=0)
    attn = hf.model.layers[0].self_attn
    if routed_forward(attn) is None:
        pytest.skip("this transformers routes no function through kernels")
    shared = sys.modules[type(attn).__module__].apply_rotary_pos_emb  # transformers' own: restored below
    shared.forward = types.MethodType(type(shared).forward, shared)
    try:
        assert bypass_kernel_routing(hf.model) == []
    finally:
        vars(shared).pop("forward", None)
    assert bypass_kernel_routing(hf.model) == ["layers.0.self_attn", "layers.1.self_attn"]


def test_converted_model_unrouted_matches_hf() -> None:
    """On a converted model (what ``from_transformers`` is to call it on): the HF attention modules
    inside ``TransformersAttention`` run unrouted and the model still gives HF's logits."""
    ref, converted = pair("hf-llama")
    model = copy.deepcopy(converted)
    routed = _routed(model)
    if not routed:
        pytest.skip("this transformers routes no function through kernels")
    assert bypass_kernel_routing(model) == routed
    assert all(p.endswith("self_attn.hf_attn") for p in routed) and len(routed) == 2
    assert _routed(model) == []
    matches_hf(ref, model, "converted hf-llama, kernels routing bypassed")
