"""The debug compilers of ``CompilationConfig.compiler``: a piece compiled without Inductor's
code generation, so a miscompile can be bisected.

- ``"aot_eager"``: the piece goes through everything Inductor does before it generates code,
  by Inductor's own entry point (``compile_fx``): AOT autograd with Inductor's decompositions
  and ``auto_functionalized`` v1, Inductor's joint-graph and post-grad passes and, among them,
  the layerpass pass manager (``post_grad_custom_post_pass``), so the passes see the graph they
  see under ``"inductor"`` and match the same. Then the post-pass graph runs as an fx
  ``GraphModule`` (``inner_compile`` below, in place of Inductor's codegen). A wrong result here
  and not under ``"eager"``: a pass (or a decomposition); right here and wrong under
  ``"inductor"``: Inductor's generated code.
- ``"eager"``: the piece's Dynamo graph runs as traced: no AOT autograd, no passes. What
  layerpass does around the pieces (regions, the split, the piece dedup) still runs.

Neither makes an artifact that can be saved: their pieces are not cached and the warm start is
off (each process compiles again; they are for debugging). Inductor's own caches are off while
``"aot_eager"`` compiles (an entry holds generated code, not this graph).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx


def _run_post_pass_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Callable[..., Any]:
    """Inductor's ``inner_compile`` slot: its post-grad passes (the layerpass passes among them) on
    ``gm``, then ``gm`` itself, run by fx, as the compiled function (boxed, as AOT autograd calls it)."""
    from torch._functorch._aot_autograd.utils import make_boxed_func
    from torch._guards import detect_fake_mode
    from torch._inductor.compile_fx import _recursive_post_grad_passes
    from torch._inductor.virtualized import V

    fake_mode = detect_fake_mode(example_inputs) or V.fake_mode
    with V.set_fake_mode(fake_mode):
        _recursive_post_grad_passes(gm, is_inference=kwargs.get("is_inference", False))
    gm.recompile()
    return make_boxed_func(gm.forward)


def compile_aot_eager(gm: fx.GraphModule, args: Sequence[Any], config_patches: dict[str, Any],
                      static: bool) -> Callable[..., Any]:
    """``gm`` through AOT autograd and the passes, run by fx (see the module docstring); ``static``:
    specialised on ``args`` (real tensors), else on the ambient Dynamo trace's symbolic sizes."""
    import copy

    from torch._inductor.compile_fx import compile_fx

    patches = {**config_patches, "fx_graph_cache": False, "fx_graph_remote_cache": False}
    gm = copy.deepcopy(gm)  # compile_fx takes ownership of the graph it compiles
    with torch._functorch.config.patch(enable_autograd_cache=False):
        if static:
            from torch._subclasses.fake_tensor import FakeTensorMode
            from torch.fx.experimental.symbolic_shapes import ShapeEnv

            mode = FakeTensorMode(shape_env=ShapeEnv())
            with torch._guards.tracing(torch._guards.TracingContext(mode)):
                return compile_fx(gm, list(args), inner_compile=_run_post_pass_graph, config_patches=patches,
                                  ignore_shape_env=True)
        context = torch._guards.TracingContext.get()
        with torch._guards.tracing(torch._guards.TracingContext(context.fake_mode)):
            return compile_fx(gm, list(args), inner_compile=_run_post_pass_graph, config_patches=patches)
