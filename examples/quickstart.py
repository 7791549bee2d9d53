"""README quick start: build a zoo model, compile it with layerpass, compare with eager."""
import torch

import layerpass
from layerpass.models import build_model, make_step

model = build_model("llama-fp8", num_layers=8)                  # deterministic, no downloads
step = make_step(model, num_decodes=2, prefill_lens=[5, 3])     # decode-first batch with KV history
compiled = layerpass.compile(model, layerpass.CompilationConfig(disable_cache=True))
with torch.no_grad():
    eager, fused = step.run(model), step.run(compiled)          # run(fn) sets the forward context
report = layerpass.last_compile_report()
print(report.summary())                      # 8 pieces (1 unique, 1 compiled, 0 from cache) ...
print(report.trace, report.num_regions)      # regions 1: each distinct layer traced once
print("fusions:", report.matches)           # attention+quant, norm+quant, act+quant on every layer
print("max |eager - compiled| =", (eager - fused).abs().max().item())
