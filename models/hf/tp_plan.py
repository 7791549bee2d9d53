"""A Hugging Face model's tensor-parallel plan (``base_model_tp_plan``), as the converter reads it."""

from __future__ import annotations

import re

from layerpass.layers import get_tp_world_size

from .families import UnsupportedModuleError

# base_model_tp_plan styles (transformers/distributed/tensor_parallel.py), by what they mean here
COLWISE = {"colwise", "packed_colwise", "local_colwise"}
COLWISE_GATHER = {"colwise_gather_output", "colwise_rep"}
ROWWISE = {"rowwise", "packed_rowwise", "local_rowwise"}
ROWWISE_SPLIT = {"rowwise_split_input", "rowwise_rep"}


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

    def packed_gather(self, path: str, names: list[str]) -> bool | None:
        """For linears ``names`` of module ``path`` packed into one column-parallel layer: whether
        each slice must be gathered (their plan style replicates the output, or they have none),
        or None when their styles disagree or are not column styles (not packable)."""
        styles = {self.style(f"{path}.{n}") for n in names}
        if len(styles) != 1:
            return None
        style = styles.pop()
        if style in COLWISE:
            return False
        if style in COLWISE_GATHER or style is None:  # no plan entry: the output is replicated
            return True
        return None


def check_divisible(n: int, what: str) -> None:
    """``n`` (heads, an intermediate size) splits evenly over the tensor-parallel ranks."""
    tp = get_tp_world_size()
    if n % tp:
        raise UnsupportedModuleError(f"from_transformers: {what} ({n}) is not divisible by the tensor-parallel size {tp}")
