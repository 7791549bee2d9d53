"""``CompilationConfig``: everything the ``layerpass`` backend can be told."""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from typing import Any

SPLIT_MODES = ("layers", "ops")
ON_COMPILE_ERROR = ("raise", "eager")
# Ops that hold per-layer state behind a name; in "ops" mode they run eagerly between pieces.
DEFAULT_SPLITTING_OPS = ("layerpass.unified_attention_with_output", "layerpass.linear_attention")
from layerpass.envs import CACHE_DIR_ENV  # noqa: F401  (re-exported: the variable's name)
from layerpass.envs import cache_dir as default_cache_dir
from layerpass.ops.library import op_name
from layerpass.passes.lowering import resolve_custom_ops


BOOL_FIELDS = ("fuse_attn_quant", "fuse_norm_quant", "fuse_act_quant", "fuse_moe", "eliminate_noops",
               "disable_cache", "dynamic_tokens")
# Inductor options layerpass sets itself: overriding them would silently turn the passes off.
RESERVED_INDUCTOR_OPTIONS = ("post_grad_custom_post_pass",)


def _check_cache_dir(value: Any) -> str:
    """A non-empty str or ``os.PathLike`` (to a str path); returned as a str."""
    path = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if not isinstance(path, str):
        raise TypeError(f"CompilationConfig.cache_dir must be a non-empty str or os.PathLike (a directory), or None "
                        f"for $LAYERPASS_CACHE_DIR / ~/.cache/layerpass; got {type(value).__name__} {value!r}")
    if not path.strip():
        raise ValueError(f"CompilationConfig.cache_dir must be a non-empty str or os.PathLike (a directory), or None "
                         f"for the default; got {value!r} (an empty path would mean the working directory)")
    if "\0" in path:
        raise ValueError(f"CompilationConfig.cache_dir must be a directory path without NUL bytes, got {value!r}")
    # (a path that exists and is not a directory is left to the cache: it is best effort, so the
    # compile goes on without it, with one warning)
    return path


def _check_inductor_option_names(names: list[str]) -> None:
    """``ValueError`` naming the first of ``names`` that is not an Inductor config name
    (``torch._inductor.list_options()``: ``"max_autotune"``, dotted ``"triton.cudagraphs"``)."""
    import torch._inductor

    known = torch._inductor.list_options()
    for name in names:
        if name not in known:
            # a group ("triton") -> some of its options; else names that look alike
            close = [k for k in known if k.startswith(name + ".")][:3] or difflib.get_close_matches(name, known, n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"CompilationConfig.inductor_options: {name!r} is not an Inductor config name (see "
                             f"torch._inductor.list_options(), e.g. 'max_autotune', 'triton.cudagraphs'){hint}")


def _check_inductor_options(value: Any) -> dict[str, Any]:
    """A dict of Inductor config names to values (copied); none that layerpass sets itself."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise TypeError(f"CompilationConfig.inductor_options must be a dict with str keys (Inductor config names), "
                        f"got {type(value).__name__} {value!r}")
    reserved = [k for k in value if k in RESERVED_INDUCTOR_OPTIONS]
    if reserved:
        raise ValueError(f"CompilationConfig.inductor_options may not set {reserved}: layerpass installs its pass "
                         f"manager there; turn passes off with fuse_attn_quant / fuse_norm_quant / fuse_act_quant / "
                         f"fuse_moe / eliminate_noops instead")
    if value:
        _check_inductor_option_names(list(value))
    return dict(value)


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
    - ``custom_ops`` (vLLM's spelling): which layerpass ops left unfused keep their custom kernel;
      the others are lowered to native torch code Inductor generates and fuses (the ``lowering``
      pass). ``("none",)`` (default): lower every lowerable op; ``("all",)``: lower none; then
      ``"+name"`` keeps ``name`` custom, ``"-name"`` lowers it (``("all", "-rms_norm")``,
      ``("+silu_and_mul",)``). Names: ``layerpass.passes.lowering.LOWERABLE_OPS``; attention,
      linear attention and MoE always keep their kernels.
    - ``on_compile_error``: ``"raise"`` (default, as torch.compile) or ``"eager"``: a decoder layer
      whose region fails to compile runs eagerly, with one warning naming the cause (the
      report's ``eager_layers`` lists those layers).
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
    custom_ops: tuple[str, ...] = ("none",)
    on_compile_error: str = "raise"

    def __post_init__(self) -> None:
        if self.on_compile_error not in ON_COMPILE_ERROR:
            raise ValueError(f"CompilationConfig.on_compile_error={self.on_compile_error!r}; allowed: "
                             f"{', '.join(map(repr, ON_COMPILE_ERROR))}")
        if self.split not in SPLIT_MODES:
            raise ValueError(f"CompilationConfig.split={self.split!r} ({type(self.split).__name__}); "
                             f"allowed: {', '.join(SPLIT_MODES)}")
        if isinstance(self.splitting_ops, str) or not isinstance(self.splitting_ops, (tuple, list)):
            raise TypeError(f"splitting_ops must be a tuple of 'namespace.op_name' strings, got {self.splitting_ops!r}")
        for op in self.splitting_ops:
            if not isinstance(op, str):
                raise TypeError(f"splitting op {op!r} must be a str written 'namespace.op_name'")
        self.splitting_ops = tuple(op_name(op, overload=True) or op for op in self.splitting_ops)  # "ns::op" -> "ns.op"
        for op in self.splitting_ops:
            if op.count(".") != 1 or not all(op.split(".")):
                raise ValueError(f"splitting op {op!r} must be written 'namespace.op_name' (e.g. 'layerpass.unified_attention_with_output')")
        if isinstance(self.compile_sizes, (str, bytes)) or not isinstance(self.compile_sizes, (tuple, list, set, frozenset)):
            raise TypeError(f"CompilationConfig.compile_sizes must be a tuple of positive ints, got {self.compile_sizes!r}")
        sizes = tuple(self.compile_sizes)
        if any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in sizes):
            raise ValueError(f"CompilationConfig.compile_sizes must be positive ints (token counts >= 1), got {self.compile_sizes!r}")
        self.compile_sizes = tuple(sorted(set(sizes)))
        for name in BOOL_FIELDS:  # a str like "no" or "false" is truthy: only real bools are taken
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"CompilationConfig.{name} must be a bool (True or False), got "
                                f"{type(value).__name__} {value!r}")
        if self.cache_dir is None:
            self.cache_dir = default_cache_dir()
        self.cache_dir = _check_cache_dir(self.cache_dir)
        self.inductor_options = _check_inductor_options(self.inductor_options)
        if isinstance(self.custom_ops, (str, bytes)) or not isinstance(self.custom_ops, (tuple, list)):
            raise TypeError(f"CompilationConfig.custom_ops must be a tuple of str ('none', 'all', '+name', '-name'), "
                            f"got {type(self.custom_ops).__name__} {self.custom_ops!r}")
        self.custom_ops = tuple(self.custom_ops)
        resolve_custom_ops(self.custom_ops)  # raises naming a bad entry and the allowed names

    def lowered_ops(self) -> tuple[str, ...]:
        """The layerpass ops the ``lowering`` pass replaces by native code (from ``custom_ops``)."""
        return resolve_custom_ops(self.custom_ops)

    def fingerprint(self) -> str:
        """What changes compiled code (cache location and switch, the error policy excluded)."""
        d = dataclasses.asdict(self)
        for k in ("cache_dir", "disable_cache", "on_compile_error"):
            d.pop(k)
        return json.dumps(d, sort_keys=True, default=str)
