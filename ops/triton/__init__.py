"""Triton kernels behind the ops' CUDA slots.

Modules here import ``triton`` at import time; the ops import them lazily (on the first
CUDA call) so that importing ``layerpass`` does not need triton, and so that tests can set
``TRITON_INTERPRET=1`` before a kernel module is imported (triton reads it at ``@triton.jit``).
"""
