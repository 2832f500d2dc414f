"""Compile the Block AttnRes kernels for a GPU that is not present, and read ptxas's resource figures.

The host code of :mod:`attnres_kernels.block_attnres` runs on CPU tensors with its launches recorded instead of
run (:func:`recorded_launches`); each recorded launch is then specialised exactly as Triton's JIT would specialise
it at launch (integer arguments equal to 1 become constants, 16-divisible ones get divisibility hints) and
compiled for the target by :func:`compile_launch`. Triton's bundled ptxas reports registers, spills and the
static shared memory; Triton adds the shared memory its layouts need. No GPU and no CUDA driver are needed.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from . import block_attnres

HOPPER = GPUTarget("cuda", 90, 32)


@dataclass
class Launch:
    kernel: object  # triton JITFunction
    grid: tuple
    args: tuple
    meta: dict

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


@dataclass
class CompiledFigures:
    name: str
    num_warps: int
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    stack_bytes: int
    shared_bytes: int  # Triton's dynamic shared memory plus ptxas's static shared memory

    @property
    def spills(self) -> bool:
        return self.spill_store_bytes > 0 or self.spill_load_bytes > 0

    def blocks_per_sm(self, registers_per_sm: int = 65536, max_threads: int = 2048) -> int:
        """Resident programs per SM as registers and threads allow (Hopper: 64K registers, 2048 threads)."""
        threads = 32 * self.num_warps
        per_warp = -(-self.registers * 32 // 256) * 256  # registers are allocated per warp in units of 256
        return min(registers_per_sm // (per_warp * self.num_warps), max_threads // threads)


    def resident_warps(self) -> int:
        """Warps resident per SM (Hopper holds at most 64): the occupancy that hides memory latency."""
        return self.blocks_per_sm() * self.num_warps


@contextlib.contextmanager
def recorded_launches():
    """Within the block, kernel launches of ``block_attnres`` are recorded (into the yielded list), not run."""
    launches: list[Launch] = []

    def record(kernel, grid, args, meta):
        launches.append(Launch(kernel, tuple(grid), tuple(args), dict(meta)))

    previous, block_attnres._launch_hook = block_attnres._launch_hook, record
    try:
        yield launches
    finally:
        block_attnres._launch_hook = previous


def _ptxas_figures(ptx: str, arch: int) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        result = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}a", str(source), "-o",
                                 str(Path(folder) / "kernel.o")], capture_output=True, text=True, check=True)
    log = result.stderr + result.stdout

    def number(pattern: str) -> int:
        found = re.search(pattern, log)
        return int(found.group(1)) if found else 0

    return {"registers": number(r"Used (\d+) registers"), "spill_store_bytes": number(r"(\d+) bytes spill stores"),
            "spill_load_bytes": number(r"(\d+) bytes spill loads"), "stack_bytes": number(r"(\d+) bytes stack frame"),
            "static_shared_bytes": number(r"(\d+) bytes smem")}


def compile_launch(launch: Launch, target: GPUTarget = HOPPER) -> CompiledFigures:
    """Compiles one recorded launch for ``target`` as the JIT would specialise it, and reports ptxas's figures."""
    kernel = launch.kernel
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*launch.args, **launch.meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.meta, bound_args, specialization,
                                                              options)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    figures = _ptxas_figures(compiled.asm["ptx"], target.arch)
    return CompiledFigures(name=launch.name, num_warps=compiled.metadata.num_warps,
                           registers=figures["registers"], spill_store_bytes=figures["spill_store_bytes"],
                           spill_load_bytes=figures["spill_load_bytes"], stack_bytes=figures["stack_bytes"],
                           shared_bytes=compiled.metadata.shared + figures["static_shared_bytes"])


def block_launches(N: int, S: int, T: int, D: int, dtype, with_norm: bool = True) -> list[Launch]:
    """The launches of one block's forward and backward (phase 1, the merges of the first, second and a later
    sublayer, the close), recorded from the real host code on CPU tensors; the sources' gradients are
    accumulated into, as in every block but the last. ``with_norm``: the merges apply a norm, and phase 1 forms
    the first sublayer's normed input (whose merge then launches only its backward)."""
    import torch

    def zeros(*shape, dtype=dtype):
        return torch.zeros(*shape, dtype=dtype, requires_grad=True)

    sources = [zeros(T, D) for _ in range(N)]
    rstd = [torch.ones(T) for _ in range(N)]
    queries = [zeros(D, dtype=torch.float32) for _ in range(S)]
    key_weights = [zeros(D, dtype=torch.float32) for _ in range(S)]
    weight = zeros(D, dtype=torch.float32) if with_norm else None
    outputs_f = [zeros(T, D) for _ in range(3)]
    source_grads = block_attnres.SourceGradients()
    source_grads.register(sources)  # an earlier block scored them: this one adds its share in place
    with recorded_launches() as launches:
        outputs, lse, params = block_attnres.block_phase1(sources, rstd, queries, key_weights, source_grads,
                                                          None if weight is None else (weight, 1e-6))
        first, _ = block_attnres.block_merge(outputs[0], lse[0], None, None, params, 0, weight)
        second, partial = block_attnres.block_merge(outputs[-1], lse[-1], outputs_f[0], None, params, S - 1, weight)
        third, partial = block_attnres.block_merge(outputs[-1], lse[-1], outputs_f[1], partial, params, S - 1,
                                                   weight)
        summary, _ = block_attnres.block_close(partial, outputs_f[2], 1e-6)
        ends = [first, second, third, summary]
        torch.autograd.backward(ends, [torch.zeros_like(end) for end in ends])
    return launches
