"""Fused kernels of attnres-train (import name ``attnres_kernels``; a bare ``kernels`` would shadow the Hugging
Face ``kernels`` package that transformers probes for).

``reference`` is pure torch and always importable. The Triton implementations live in ``block_attnres`` and are
imported on demand (they need triton, and a CUDA device to run outside Triton's interpreter).
"""

from .reference import phase1_reference, phase2_reference

__all__ = ["phase1_reference", "phase2_reference"]
