"""Every ``*ForCausalLM`` transformers ships, as a tiny random model: what ``from_transformers`` and
``layerpass.compile`` make of it (``test_family_sweep.py``).

One generic recipe per family, no per-family code: the family's default config with tiny widths
set on whichever of the usual field names it has; a family whose model stays big after that (or
whose config or model cannot be built without downloads or extra packages) is skipped, with why.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

# tiny widths, set on each of these config fields that the family's config has
TINY = {
    "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "intermediate_size": 128, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64,
    "ffn_hidden_size": 128, "vocab_size": 128, "num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4,
    "num_experts_per_tok": 2, "max_position_embeddings": 256, "kv_channels": 16, "n_inner": 128,
    "first_k_dense_replace": 1, "sliding_window": 8, "tie_word_embeddings": False, "rotary_dim": 8,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}
MAX_PARAMS = 5_000_000  # still bigger than this after TINY: the config is not tiny generically
NEW_TOKENS = 3
PROMPT_LENS = (5, 3)
ADMIT_AT = (0, 0)  # both prompts at once: every step has 2+ tokens, so one region trace per distinct layer


@dataclass
class Outcome:
    model_type: str
    kind: str  # "equal", "refused", "skipped", "crash", "differs", "not regions"
    why: str = ""
    seconds: float = 0.0


def causal_lm_families() -> dict[str, str]:
    """model_type -> the ``*ForCausalLM`` class name transformers maps it to."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def tiny_config(model_type: str):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    for cfg in {id(c): c for c in (config, getattr(config, "get_text_config", lambda: config)())}.values():
        for name, value in TINY.items():
            if hasattr(cfg, name) and getattr(cfg, name) is not None:
                setattr(cfg, name, value)
    return config


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"


def build_reference(model_type: str):
    """(HF model, None) or (None, why it is skipped)."""
    from transformers import AutoModelForCausalLM

    from layerpass.models.hf import build_hf_model

    try:
        config = tiny_config(model_type)
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # a family whose config or class needs downloads / extra packages / more fields
        return None, f"cannot build it from its default config: {_first_line(e)}"
    params = sum(p.numel() for p in meta.parameters())
    if params > MAX_PARAMS:
        return None, f"not tiny with the generic overrides ({params / 1e6:.1f}M parameters)"
    try:
        hf = build_hf_model(config, seed=0)
    except Exception as e:
        return None, f"cannot build it: {_first_line(e)}"
    try:  # the generic overrides may leave a config HF's own forward cannot run
        with torch.no_grad():
            hf(input_ids=torch.tensor([[3, 4, 5]]), use_cache=False)
    except Exception as e:
        return None, f"HF's own forward fails on the tiny config: {_first_line(e)}"
    return hf, ""


def sweep_family(model_type: str, cache_dir: str) -> Outcome:
    """Convert, compile (regions) and generate greedily; compare with HF ``generate()``."""
    import layerpass
    from layerpass.backend.config import CompilationConfig
    from layerpass.models.hf import UnsupportedArchitectureError, UnsupportedModuleError, from_transformers
    from tests.models.hf import common as hc

    t0 = time.perf_counter()
    hf, why = build_reference(model_type)
    if hf is None:
        return Outcome(model_type, "skipped", why)
    try:
        model = from_transformers(copy.deepcopy(hf))
    except (UnsupportedArchitectureError, UnsupportedModuleError) as e:
        return Outcome(model_type, "refused", _first_line(e), time.perf_counter() - t0)
    except Exception as e:
        return Outcome(model_type, "crash", f"conversion: {_first_line(e)}", time.perf_counter() - t0)
    ps = hc.prompts(model.config.vocab_size, PROMPT_LENS, seed=1)
    try:
        want = [hc.hf_generate(hf, p, NEW_TOKENS) for p in ps]
    except Exception as e:
        return Outcome(model_type, "skipped", f"HF generate() fails on the tiny config: {_first_line(e)}")
    try:
        compiled = layerpass.compile(model, CompilationConfig(cache_dir=cache_dir))
        got = hc.generate_cb(model, ps, ADMIT_AT, NEW_TOKENS, fn=compiled)
        report = layerpass.last_compile_report()
    except Exception as e:
        return Outcome(model_type, "crash", f"layerpass.compile: {_first_line(e)}", time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    if report.trace != "regions":
        why = "; ".join(n for n in report.notes if "traced" in n or "cannot" in n)[:300]
        return Outcome(model_type, "not regions", f"compiled as {report.trace!r} ({why})", seconds)
    if got != want:
        return Outcome(model_type, "differs", f"greedy tokens {got} != HF generate() {want}", seconds)
    return Outcome(model_type, "equal", "", seconds)
