"""torch 2.13: a module attribute holding torch.float32 poisons every dtype in the saved guards.

GuardsStatePickler.reducer_override records each plain, non-guarded module attribute in
missing_values BY id(); torch.float32 is a singleton, so every tensor pickled after the module
gets dtype=_Missing and AOTCompiledFunction.deserialize fails in _rebuild_meta_tensor_no_storage.
"""
import torch
from torch import nn
from torch._dynamo.aot_compile import AOTCompiledFunction


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
data = AOTCompiledFunction.serialize(aot).serialized_data
loaded = AOTCompiledFunction.deserialize(data)  # TypeError: empty_strided(): argument 'dtype' must be torch.dtype, not _Missing
torch.testing.assert_close(loaded(layer, x), layer(x))
print("round trip ok")
