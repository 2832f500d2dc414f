"""Every Block AttnRes kernel compiles for Hopper (sm_90) without a GPU, at edge shapes, with no register spills.

The real host code runs on CPU tensors with its launches recorded (attnres_kernels.compile_check); each launch is
specialised as Triton's JIT would specialise it (an integer argument equal to 1 becomes a constant: T, N or S = 1
once failed to compile) and compiled by Triton with its bundled ptxas, whose report gives registers, spills and
shared memory. These run wherever triton is installed, GPU or not.
"""

import functools

import pytest
import torch

pytest.importorskip("triton")
compile_check = pytest.importorskip("attnres_kernels.compile_check")

# (N sources, S queries, T tokens, D hidden): ones everywhere; T = 1 with D off the 64-wide chunk; S = 1 with a
# full-size D; a realistic block (N = 8 completed blocks, S = 6 sublayers, 16K tokens, D = 4096).
SHAPES = [(1, 1, 1, 100), (3, 5, 1, 4096), (2, 1, 37, 2000), (8, 6, 16384, 4096)]
ALL_KERNELS = {"_phase1_forward", "_phase1_backward", "_merge_forward", "_merge_backward", "_close_forward"}
HOPPER_SHARED_BYTES = 227 * 1024


@functools.lru_cache(maxsize=None)
def _figures(shape, dtype, with_norm=True):
    return [(launch, compile_check.compile_launch(launch))
            for launch in compile_check.block_launches(*shape, dtype, with_norm=with_norm)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-S{}-T{}-D{}".format(*s))
def test_every_kernel_compiles_for_sm90_without_spills(shape):
    figures = _figures(shape, torch.bfloat16)
    assert {launch.name for launch, _ in figures} == ALL_KERNELS
    for launch, figure in figures:
        what = f"{figure.name} {shape} {sorted((k, v) for k, v in launch.meta.items() if k.isupper())}"
        assert figure.registers > 0, f"{what}: no ptxas report"
        assert not figure.spills, f"{what}: spills {figure.spill_store_bytes} B stored, {figure.spill_load_bytes} B loaded"
        assert figure.shared_bytes <= HOPPER_SHARED_BYTES, f"{what}: {figure.shared_bytes} B shared memory"


def test_realistic_block_keeps_sms_occupied():
    """At D = 4096 each kernel keeps at least 16 warps resident per SM (phase-2 backward used to hold 8)."""
    for launch, figure in _figures((8, 6, 16384, 4096), torch.bfloat16):
        assert figure.resident_warps() >= 16, (figure.name, figure.registers, figure.num_warps)


def test_fp32_sources_compile_too():
    for launch, figure in _figures((3, 5, 1, 4096), torch.float32):
        assert not figure.spills, (figure.name, figure.spill_store_bytes)


def test_phase1_without_first_norm_compiles_too():
    """No norm after the mixes (ZeRO-3): phase 1 forms no normed input."""
    figures = [(launch, figure) for launch, figure in _figures((3, 5, 1, 4096), torch.bfloat16, with_norm=False)
               if launch.name == "_phase1_forward"]
    assert [launch.meta["HAS_FIRST_NORM"] for launch, _ in figures] == [False]
    for launch, figure in figures:
        assert figure.registers > 0 and not figure.spills, (figure.name, figure.spill_store_bytes)
