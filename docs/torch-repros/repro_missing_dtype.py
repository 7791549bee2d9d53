"""torch 2.13: a module attribute holding torch.float32 poisons every dtype in the saved guards.

GuardsStatePickler.reducer_override records each plain, non-guarded module attribute in
missing_values BY id(); torch.float32 is a singleton, so every tensor pickled after the module
gets dtype=_Missing and torch.compiler.load_compiled_function fails in _rebuild_meta_tensor_no_storage.
"""
import os
import tempfile

import torch
from torch import nn


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.params_dtype = torch.float32  # a plain attribute the forward never reads

    def forward(self, x):
        return self.lin(x)


layer = Layer()
x = torch.randn(2, 4)
aot = torch.compile(Layer.forward, fullgraph=True).aot_compile(((layer, x), {}))
path = os.path.join(tempfile.mkdtemp(), "fn.bin")
aot.save_compiled_function(path)  # the public save
with open(path, "rb") as f:
    loaded = torch.compiler.load_compiled_function(f)  # TypeError: empty_strided(): argument 'dtype' must be torch.dtype, not _Missing
torch.testing.assert_close(loaded(layer, x), layer(x))
print("round trip ok")
