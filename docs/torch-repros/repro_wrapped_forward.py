"""torch 2.13: a functools.wraps-decorated forward whose closure constants are guarded cannot be loaded.

The traced function (like transformers' GradientCheckpointingLayer wrapper) has the inner wrapper
(like deprecate_kwarg's) as a closure variable, so Dynamo guards `L['forward'].__closure__[i].cell_contents`.
GuardsStatePickler pickles that function as _Missing ("fqn mismatch": its __qualname__ names the
outer wrapper), and rebuilding the guards on load fails:
AttributeError: '_Missing' object has no attribute '__closure__'.
"""
import functools
import os
import tempfile

import torch
from torch import nn


def flagged(flag):
    def deco(func):
        @functools.wraps(func)
        def wrapper(self, x):
            return func(self, x) * 2 if flag else func(self, x)
        return wrapper
    return deco


def outer(forward):
    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        return forward(self, *args, **kwargs)
    return wrapper


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    @outer
    @flagged(False)
    def forward(self, x):
        return self.lin(x)


chain = {"f0": Layer.forward, "f1": Layer.forward.__wrapped__, "f2": Layer.forward.__wrapped__.__wrapped__}
layer, x = Layer(), torch.randn(2, 4)
aot = torch.compile(Layer.forward, fullgraph=True, backend="aot_eager").aot_compile(((layer, x), {}))
path = os.path.join(tempfile.mkdtemp(), "fn.bin")
aot.save_compiled_function(path, chain)  # the public save
with open(path, "rb") as f:
    loaded = torch.compiler.load_compiled_function(f, external_data=chain)  # AttributeError: '_Missing' ... '__closure__'
torch.testing.assert_close(loaded(layer, x), layer(x))
print("round trip ok")
