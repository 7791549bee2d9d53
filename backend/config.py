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
# what compiles a piece: Inductor, or a debug compiler without its code generation (backend/pieces/debug_compile.py)
COMPILERS = ("inductor", "aot_eager", "eager")
from layerpass.envs import CACHE_DIR_ENV  # noqa: F401  (re-exported: the variable's name)
from layerpass.envs import cache_dir as default_cache_dir
from layerpass.envs import remote_cache_url as default_remote_cache
from layerpass.envs import resolve_path
from layerpass.ops.custom_ops import resolve_custom_ops
from layerpass.ops.library import op_name, split_point_ops


BOOL_FIELDS = ("fuse_attn_quant", "fuse_norm_quant", "fuse_act_quant", "fuse_moe", "eliminate_noops",
               "disable_cache", "dynamic_tokens")
# Where compiled code is kept, how it is shared, what a failed compile does: never part of its key.
CACHE_ONLY_FIELDS = ("cache_dir", "disable_cache", "remote_cache", "lock_timeout_s", "on_compile_error")
# Inductor options layerpass sets itself: overriding them would silently turn the passes off.
RESERVED_INDUCTOR_OPTIONS = ("post_grad_custom_post_pass",)


def _check_cache_dir(value: Any) -> str:
    """A non-empty str or ``os.PathLike`` (to a str path); returned as an absolute str path, ``~``
    and environment variables expanded."""
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
    return resolve_path(path, "CompilationConfig.cache_dir")  # ~, $VARS, absolute: once, here


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
        for name, v in value.items():
            _check_inductor_option_value(name, v)
    return dict(value)


_TYPE_NAMES = {bool: "a bool", int: "an int", float: "a float", str: "a str"}


def _check_inductor_option_value(name: str, value: Any) -> None:
    """``TypeError`` unless ``value`` has the type of Inductor's own config entry (its declared type,
    else its default's): a bool for a bool, an int (not a bool) for an int, an int or float for a
    float, a str, list, tuple or dict for those. Entries without a plain type (default ``None``,
    ``Optional[...]``, callables) take any value, as Inductor's config does."""
    import torch._inductor.config as inductor_config

    entry = getattr(inductor_config, "_config", {}).get(name)
    want = getattr(entry, "value_type", None)
    if not isinstance(want, type) or want in (type(None), object) or value is None and entry.default is None:
        return
    if want is bool:
        ok = isinstance(value, bool)
    elif want is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif want is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif want in (str, list, tuple, dict):
        ok = isinstance(value, want)
    else:
        return
    if not ok:
        raise TypeError(f"CompilationConfig.inductor_options: {name!r} takes {_TYPE_NAMES.get(want, f'a {want.__name__}')} "
                        f"(its default is {entry.default!r}), got {type(value).__name__} {value!r}")


@dataclass
class CompilationConfig:
    """How ``layerpass`` compiles a model.

    - ``split``: ``"layers"`` (default) cuts at decoder-layer boundaries, so the attention op
      sits inside a compiled piece and attention+quant can fuse; ``"ops"`` cuts at
      ``splitting_ops``, which then run eagerly between pieces (what piecewise CUDA-graph
      capture needs) and no fusion can cross them.
    - ``splitting_ops``: ``"namespace.op"`` names (``"layerpass.unified_attention_with_output"``);
      default: the ops defined with ``layerpass_op(..., splits=True)`` (attention, linear attention:
      they hold per-layer state behind a name).
    - pass switches: ``fuse_attn_quant``, ``fuse_norm_quant``, ``fuse_act_quant``, ``fuse_moe``,
      ``eliminate_noops``.
    - ``cache_dir`` (default ``$LAYERPASS_CACHE_DIR`` or ``~/.cache/layerpass``), ``disable_cache``.
    - ``remote_cache``: ``redis://HOST:PORT/DB`` of a store shared by machines (default
      ``$LAYERPASS_REMOTE_CACHE``; its entries are sealed with ``$LAYERPASS_CACHE_SECRET``).
    - ``lock_timeout_s``: how long a process waits for another one compiling the same piece or
      region (sharing the cache dir) before it compiles it itself.
    - ``dynamic_tokens``: the token dimension is symbolic: no recompile when the batch changes.
    - ``compile_sizes``: token counts that additionally get a piece compiled for that static size.
    - ``custom_ops`` (vLLM's spelling): which layerpass ops left unfused keep their custom kernel;
      the others are lowered to native torch code Inductor generates and fuses (the ``lowering``
      pass). ``("none",)`` (default): lower every lowerable op; ``("all",)``: lower none; then
      ``"+name"`` keeps ``name`` custom, ``"-name"`` lowers it (``("all", "-rms_norm")``,
      ``("+silu_and_mul",)``). Names: ``layerpass.ops.library.lowerable_ops()`` (the ops defined with
      ``lowers=True``); attention, linear attention and MoE always keep their kernels.
    - ``compiler``: ``"inductor"`` (default); ``"aot_eager"``: AOT autograd, Inductor's graph passes
      and the layerpass passes, then the post-pass graph runs as an fx ``GraphModule`` (no Inductor
      code generation); ``"eager"``: each piece runs its Dynamo graph (no AOT autograd, no passes).
      To bisect a miscompile; the debug compilers cache nothing and have no warm start.
    - ``on_compile_error``: ``"raise"`` (default, as torch.compile) or ``"eager"``: a decoder layer
      whose region fails to compile runs eagerly, with one warning naming the cause (the
      report's ``eager_layers`` lists those layers).
    """

    split: str = "layers"
    splitting_ops: tuple[str, ...] = field(default_factory=split_point_ops)
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
    remote_cache: str | None = None
    lock_timeout_s: float = 300.0
    on_compile_error: str = "raise"
    compiler: str = "inductor"

    def __post_init__(self) -> None:
        if self.compiler not in COMPILERS:
            raise ValueError(f"CompilationConfig.compiler={self.compiler!r}; allowed: {', '.join(map(repr, COMPILERS))} "
                             f"('aot_eager' and 'eager' are debug compilers, without Inductor's code generation)")
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
        if self.remote_cache is None:
            self.remote_cache = default_remote_cache()
        if self.remote_cache is not None and (not isinstance(self.remote_cache, str) or not self.remote_cache.strip()):
            raise TypeError(f"CompilationConfig.remote_cache must be a redis://HOST:PORT/DB URL (a str) or None, "
                            f"got {type(self.remote_cache).__name__} {self.remote_cache!r}")
        if (isinstance(self.lock_timeout_s, bool) or not isinstance(self.lock_timeout_s, (int, float))
                or not 0 <= self.lock_timeout_s < float("inf")):
            raise ValueError(f"CompilationConfig.lock_timeout_s must be a finite number of seconds >= 0, "
                             f"got {self.lock_timeout_s!r}")
        self.inductor_options = _check_inductor_options(self.inductor_options)
        # resolved once, here (raises naming a bad entry and the allowed names); the pass gets the result
        object.__setattr__(self, "_lowered_ops", resolve_custom_ops(self.custom_ops))
        self.custom_ops = tuple(self.custom_ops)

        object.__setattr__(self, "_validated", True)

    def __setattr__(self, name: str, value: Any) -> None:
        """After construction, a field set is checked (and normalised) as at construction: the
        config with the new value is built again, through the one validation, ``__post_init__``;
        a bad value raises and leaves the config as it was. A name that is no field is refused."""
        if not self.__dict__.get("_validated"):
            object.__setattr__(self, name, value)
            return
        fields = {f.name for f in dataclasses.fields(self)}
        if name not in fields:
            close = difflib.get_close_matches(name, sorted(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise AttributeError(f"CompilationConfig has no field {name!r}{hint} (fields: {', '.join(sorted(fields))})")
        checked = dataclasses.replace(self, **{name: value})
        object.__setattr__(self, name, getattr(checked, name))
        object.__setattr__(self, "_lowered_ops", checked._lowered_ops)

    @property
    def caches_pieces(self) -> bool:
        """Whether compiled pieces (and the warm start's programs) are stored and loaded: only
        Inductor's artifacts can be saved (``backend/pieces/debug_compile.py``)."""
        return not self.disable_cache and self.compiler == "inductor"

    def lowered_ops(self) -> tuple[str, ...]:
        """The layerpass ops the ``lowering`` pass replaces by native code (``custom_ops``, resolved
        when the config was made)."""
        return self._lowered_ops

    def fingerprint(self) -> str:
        """What changes compiled code (where it is cached, how long to wait for it and the error
        policy excluded)."""
        d = dataclasses.asdict(self)
        for k in CACHE_ONLY_FIELDS:
            d.pop(k)
        return json.dumps(d, sort_keys=True, default=str)
