"""``CompilationConfig``: everything the ``layerpass`` backend can be told."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

SPLIT_MODES = ("layers", "ops")
# Ops that hold per-layer state behind a name; in "ops" mode they run eagerly between pieces.
DEFAULT_SPLITTING_OPS = ("layerpass.unified_attention_with_output", "layerpass.linear_attention")
from layerpass.envs import CACHE_DIR_ENV  # noqa: F401  (re-exported: the variable's name)
from layerpass.envs import cache_dir as default_cache_dir


@dataclass
class CompilationConfig:
    """How ``layerpass`` compiles a model.

    - ``split``: ``"layers"`` (default) cuts at decoder-layer boundaries, so the attention op
      sits inside a compiled piece and attention+quant can fuse; ``"ops"`` cuts at
      ``splitting_ops``, which then run eagerly between pieces (what piecewise CUDA-graph
      capture needs) and no fusion can cross them.
    - ``splitting_ops``: ``"namespace.op"`` names (``"layerpass.unified_attention_with_output"``).
    - pass switches: ``fuse_attn_quant``, ``fuse_norm_quant``, ``fuse_act_quant``, ``fuse_moe``,
      ``eliminate_noops``.
    - ``cache_dir`` (default ``$LAYERPASS_CACHE_DIR`` or ``~/.cache/layerpass``), ``disable_cache``.
    - ``dynamic_tokens``: the token dimension is symbolic: no recompile when the batch changes.
    - ``compile_sizes``: token counts that additionally get a piece compiled for that static size.
    """

    split: str = "layers"
    splitting_ops: tuple[str, ...] = DEFAULT_SPLITTING_OPS
    fuse_attn_quant: bool = True
    fuse_norm_quant: bool = True
    fuse_act_quant: bool = True
    fuse_moe: bool = True
    eliminate_noops: bool = True
    cache_dir: str | None = None
    disable_cache: bool = False
    dynamic_tokens: bool = True
    compile_sizes: tuple[int, ...] = ()
    inductor_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.split not in SPLIT_MODES:
            raise ValueError(f"CompilationConfig.split={self.split!r}; allowed: {', '.join(SPLIT_MODES)}")
        if isinstance(self.splitting_ops, str) or not isinstance(self.splitting_ops, (tuple, list)):
            raise TypeError(f"splitting_ops must be a tuple of 'namespace.op_name' strings, got {self.splitting_ops!r}")
        for op in self.splitting_ops:
            if not isinstance(op, str):
                raise TypeError(f"splitting op {op!r} must be a str written 'namespace.op_name'")
        self.splitting_ops = tuple(op.replace("::", ".") for op in self.splitting_ops)
        for op in self.splitting_ops:
            if op.count(".") != 1 or not all(op.split(".")):
                raise ValueError(f"splitting op {op!r} must be written 'namespace.op_name' (e.g. 'layerpass.unified_attention_with_output')")
        if isinstance(self.compile_sizes, (str, bytes)) or not isinstance(self.compile_sizes, (tuple, list, set, frozenset)):
            raise TypeError(f"compile_sizes must be a tuple of positive ints, got {self.compile_sizes!r}")
        sizes = tuple(self.compile_sizes)
        if any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in sizes):
            raise ValueError(f"compile_sizes must be positive ints, got {self.compile_sizes!r}")
        self.compile_sizes = tuple(sorted(set(sizes)))
        if self.cache_dir is None:
            self.cache_dir = default_cache_dir()

    def fingerprint(self) -> str:
        """What changes compiled code (cache location and switch excluded)."""
        d = dataclasses.asdict(self)
        for k in ("cache_dir", "disable_cache"):
            d.pop(k)
        return json.dumps(d, sort_keys=True, default=str)
