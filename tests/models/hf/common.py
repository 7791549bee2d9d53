"""Shared pieces of the Hugging Face backend tests: the tiny family configs, an HF reference /
converted model pair, HF logits on full sequences, and a small continuous-batching greedy loop.

The loop is what an engine on layerpass does: requests join at different steps; every step is
one decode-first batch (the running requests' next token, then the prompts admitted this step),
each request writing its own KV blocks; the next token is the argmax of its last logits row.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from layerpass.models import ModelConfig, make_step
from layerpass.models.hf import HF_ZOO, TESTED_ARCHITECTURES, build_hf_model, from_transformers
from layerpass.ops import build_batch_metadata, set_forward_context

ATOL = RTOL = 1e-4
FAMILIES: dict[str, str] = {zoo: arch for arch, zoo in TESTED_ARCHITECTURES.items()}
DENSE = [n for n in FAMILIES if not n.endswith(("-moe", "mixtral"))]


def hf_config(name: str, num_layers: int = 2, **overrides):
    return HF_ZOO[name](ModelConfig(num_layers=num_layers, **overrides))


@functools.cache
def pair(name: str, num_layers: int = 2, seed: int = 0):
    """(HF reference model, converted model) with identical weights; the converted one consumes a copy."""
    hf = build_hf_model(hf_config(name, num_layers), seed=seed)
    return hf, from_transformers(copy.deepcopy(hf))


def hf_logits(hf, tokens: Sequence[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=torch.tensor([list(tokens)]), use_cache=False).logits[0]


def close(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ref.abs().mean() > 0.1, "reference logits near zero: the comparison would be meaningless"
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


def matches_hf(ref, model, what: str) -> None:
    """A converted ``model``'s logits for a mixed step (one decode with history, one prefill) equal
    the Hugging Face model ``ref``'s on each request's whole token sequence."""
    step = make_step(model, num_decodes=1, prefill_lens=[6], seed=2, max_history=12)
    try:
        for req, rows in zip(step.requests, step.split(step.run())):
            close(rows, hf_logits(ref, list(req.history) + list(req.tokens))[len(req.history):], what)
    finally:
        step.release()


def prompts(vocab: int, lens: Sequence[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]


def hf_generate(hf, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
    """``hf.generate(do_sample=False)``: exactly ``max_new_tokens`` new tokens (no EOS: the loop
    below has none either; ``min_new_tokens`` would instead mask the EOS logit)."""
    ids = torch.tensor([list(prompt)])
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=max_new_tokens, pad_token_id=0, use_cache=True)
    assert out.shape[1] == len(prompt) + max_new_tokens
    return out[0, len(prompt):].tolist()


@dataclass
class _Req:
    index: int
    prompt: list[int]
    blocks: list[int]
    generated: list[int] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.generated


@dataclass
class LoopStats:
    steps: int = 0
    mixed_steps: int = 0  # steps with decodes and prefills together
    max_batch: int = 0


def generate_cb(model, prompts_: Sequence[Sequence[int]], admit_at: Sequence[int], max_new_tokens: int,
                fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                stats: LoopStats | None = None) -> list[list[int]]:
    """Greedy continuous batching over ``model`` (or ``fn``, e.g. its compiled form): request ``i``
    (``prompts_[i]``) is admitted at step ``admit_at[i]`` and runs until ``max_new_tokens``."""
    fn = model if fn is None else fn
    bs = model.cache_config.block_size
    pending = sorted(range(len(prompts_)), key=lambda i: admit_at[i])
    running: list[_Req] = []
    done: dict[int, list[int]] = {}
    step = 0
    stats = stats if stats is not None else LoopStats()
    try:
        while pending or running:
            admitted = [i for i in pending if admit_at[i] <= step]
            pending = [i for i in pending if admit_at[i] > step]
            prefills = []
            for i in admitted:
                need = -(-(len(prompts_[i]) + max_new_tokens) // bs)
                prefills.append(_Req(i, list(prompts_[i]), model.block_allocator.allocate(need)))
            batch = running + prefills  # decode-first
            if not batch:
                step += 1
                continue
            ids, pos, qlens, ctx = [], [], [], []
            for r in running:
                ids.append(r.tokens[-1])
                pos.append(len(r.tokens) - 1)
                qlens.append(1)
                ctx.append(len(r.tokens) - 1)
            for r in prefills:
                ids.extend(r.prompt)
                pos.extend(range(len(r.prompt)))
                qlens.append(len(r.prompt))
                ctx.append(0)
            md = build_batch_metadata(qlens, ctx, [r.blocks for r in batch], bs)
            with torch.no_grad(), set_forward_context(md, model.layer_registry):
                logits = fn(torch.tensor(ids), torch.tensor(pos))
            last = (torch.cumsum(torch.tensor(qlens), 0) - 1).tolist()
            for r, row in zip(batch, last):
                r.generated.append(int(logits[row].argmax()))
            stats.steps += 1
            stats.mixed_steps += bool(running and prefills)
            stats.max_batch = max(stats.max_batch, len(batch))
            running = []
            for r in batch:
                if len(r.generated) == max_new_tokens:
                    done[r.index] = r.generated
                    model.block_allocator.free(r.blocks)
                    r.blocks = []
                else:
                    running.append(r)
            step += 1
    finally:
        for r in running:
            if r.blocks:
                model.block_allocator.free(r.blocks)
    return [done[i] for i in range(len(prompts_))]


# the standard generation workload: three requests joining at steps 0, 1 and 3
GEN_PROMPT_LENS = (5, 9, 3)
GEN_ADMIT_AT = (0, 1, 3)
GEN_NEW_TOKENS = 6
