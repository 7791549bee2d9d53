"""The Triton kernels as the ops' registered kernels: registration, dispatch through
``torch.ops.layerpass.*`` with the ops' own schemas, and the package without triton.

Dispatch is checked in a subprocess that registers the same lazy trampolines the CUDA key
gets for the CPU key instead (this machine has no GPU), so each call goes through the
dispatcher exactly as a CUDA call would, under the interpreter.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap

import pytest

from layerpass.ops import OPS, op_overload
from layerpass.ops.library import schema_of
from layerpass.ops.triton import (TRITON_KERNELS, interpreter_unusable, register_triton_kernels, triton_available,
                                  triton_kernel)


def _run(code: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=240,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_every_kernel_serves_a_registered_op_with_its_signature() -> None:
    pytest.importorskip("triton", reason="triton is not installed (optional extra: pip install 'layerpass[triton]')")
    assert register_triton_kernels() == list(TRITON_KERNELS)  # idempotent: already done on import
    for op_name in TRITON_KERNELS:
        assert op_name in OPS
        op_params = [a.name for a in schema_of(op_overload(op_name)).arguments]
        assert list(inspect.signature(triton_kernel(op_name)).parameters) == op_params, op_name
    with pytest.raises(KeyError, match="no Triton kernel"):
        triton_kernel("scaled_fp8_mm")


@pytest.mark.skipif(not triton_available(), reason="triton is not installed (optional extra: pip install 'layerpass[triton]')")
@pytest.mark.skipif(interpreter_unusable() is not None, reason=str(interpreter_unusable()))
def test_ops_dispatch_to_the_triton_kernels() -> None:
    out = _run(
        """
        import torch
        from torch import nn
        import layerpass.ops as lo
        from layerpass.ops.triton import TRITON_KERNELS, lazy_kernel

        ops = torch.ops.layerpass
        torch.manual_seed(0)
        x, res, w, s = torch.randn(5, 64), torch.randn(5, 64), torch.rand(64) + 0.5, torch.tensor([0.05])
        hs, logits = torch.randn(6, 32), torch.randn(6, 4)

        class Attn(nn.Module):
            def __init__(self):
                super().__init__()
                self.kv_cache = torch.randn(2, 6, 4, 2, 16)
                self.scale = 0.25

        class MoE(nn.Module):
            def __init__(self):
                super().__init__()
                self.w13_weight = torch.randn(4, 32, 32) / 6
                self.w2_weight = torch.randn(4, 32, 16) / 4
                self.top_k, self.renormalize = 2, False
                self.shared_experts = nn.Linear(32, 32)

        md = lo.build_batch_metadata([1, 5], [3, 2], [[0, 1], [4, 2]], 4)
        q, k, v = torch.randn(6, 4, 16), torch.randn(6, 2, 16), torch.randn(6, 2, 16)

        def step():
            reg = lo.LayerRegistry("dispatch")
            attn, moe = Attn(), MoE()
            reg.register("attn", attn)
            reg.register("moe", moe)
            o8 = torch.empty(6, 4, 16, dtype=lo.FP8_DTYPE)
            r8 = torch.empty(5, 64, dtype=lo.FP8_DTYPE)
            with lo.set_forward_context(md, reg):
                ops.unified_attention_with_output(q, k, v, o8, lo.encode_layer_name("attn"), output_scale=s)
                o = torch.empty(6, 4, 16)
                ops.unified_attention_with_output(q, k, v, o, lo.encode_layer_name("attn"))
                ops.static_scaled_fp8_quant(r8, x, s)
                with torch.no_grad():
                    return [
                        o8.float(), o, attn.kv_cache, r8.float(),
                        ops.static_scaled_fp8_quant_functional(x, s).float(),
                        ops.rms_norm(x, w, 1e-6), *ops.fused_add_rms_norm(x, res, w, 1e-6),
                        ops.rms_norm_static_fp8_quant(x, w, s, 1e-6).float(),
                        *[t.float() for t in ops.fused_add_rms_norm_static_fp8_quant(x, res, w, s, 1e-6)],
                        ops.silu_and_mul(x), ops.silu_and_mul_static_fp8_quant(x, s).float(),
                        ops.moe_forward(hs, logits, lo.encode_layer_name("moe")),
                        *ops.moe_forward_shared(hs, logits, lo.encode_layer_name("moe")),
                    ]

        torch.manual_seed(1)
        ref = step()  # the torch CPU kernels
        for name in TRITON_KERNELS:
            lo.OPS[name].custom_op.register_kernel("cpu")(lazy_kernel(name))
        torch.manual_seed(1)
        got = step()  # the same calls, now dispatched to the Triton wrappers
        import sys
        assert "layerpass.ops.triton.moe" in sys.modules and "layerpass.ops.triton.attention" in sys.modules
        for i, (a, b) in enumerate(zip(got, ref)):
            # fp8 results within one e4m3 step (0.125 relative), float results tight
            tol = dict(rtol=0.13, atol=0.002) if i in (0, 3, 4, 8, 9, 12) else dict(rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(a, b, **tol, msg=lambda m: f"result {i}: {m}")
        print("dispatched", len(got))
        """,
        env={"TRITON_INTERPRET": "1"},
    )
    assert "dispatched 16" in out


def test_package_imports_and_works_without_triton() -> None:
    out = _run(
        """
        import sys
        sys.modules["triton"] = None  # as if not installed: import fails, find_spec gives None
        import torch
        import layerpass.ops as lo
        from layerpass.ops.triton import register_triton_kernels, triton_available
        assert not triton_available() and register_triton_kernels() == []
        x = torch.randn(3, 8)
        y = torch.ops.layerpass.rms_norm_static_fp8_quant(x, torch.ones(8), torch.tensor([0.1]), 1e-6)
        assert y.dtype == lo.FP8_DTYPE
        print("ok", "triton" in sys.modules and sys.modules["triton"] is not None)
        """
    )
    assert "ok False" in out
