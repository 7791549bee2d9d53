"""torch 2.13: a method bound in an instance's __dict__ is restored as the CLASS's method in saved guards.

`child.forward = MethodType(f, child)` (an instance override, as in transformers' kernels routing
or `module.forward = ...` patches): GuardsStatePickler lets pickle reduce the bound method as
getattr(child, "forward"), which runs while `child` is half restored and finds Child.forward;
the guards on `child.forward.__func__.__closure__` are rebuilt against the wrong function:
IndexError / TypeError on load (or guards built on the wrong function).
"""
import functools
import types
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


class Child(nn.Module):
    def forward(self, x):
        return x + 1


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.child = Child()
        self.child.forward = types.MethodType(flagged(False)(Child.forward), self.child)

    def forward(self, x):
        return self.child(x)


layer, x = Layer(), torch.randn(2, 4)
aot = torch.compile(Layer.forward, fullgraph=True, backend="aot_eager").aot_compile(((layer, x), {}))
path = os.path.join(tempfile.mkdtemp(), "fn.bin")
aot.save_compiled_function(path)  # the public save
with open(path, "rb") as f:
    loaded = torch.compiler.load_compiled_function(f)
torch.testing.assert_close(loaded(layer, x), layer(x))
print("round trip ok")
