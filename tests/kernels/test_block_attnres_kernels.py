"""The two-phase Block AttnRes kernels (attnres_kernels.block_attnres) against the pure-torch reference.

On a CUDA machine the kernels run compiled; the ``gpu`` tests add large shapes. Without a GPU the tests
run in Triton's interpreter on CPU (``test_kernels_interpreted.py`` starts this file in a process with
``TRITON_INTERPRET=1``, which must be set before triton is first imported): that checks the kernels' indexing,
masking and math, not their speed.
"""

import importlib
import os

import pytest
import torch

from attnres_kernels.reference import (block_merge_torch, block_phase1_torch, close_reference,
                                       source_rstd_reference)

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
ON_GPU = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if not ON_GPU and not INTERPRETED:
    pytest.skip("no GPU: these run under the Triton interpreter via test_kernels_interpreted.py",
                allow_module_level=True)


def _kernels():
    return importlib.import_module("attnres_kernels.block_attnres")


DEVICE = "cuda" if ON_GPU else "cpu"
# (N completed sources, S queries, T tokens, D hidden); odd T and D exercise every mask.
SHAPES = [(1, 1, 5, 16), (2, 3, 1, 40), (3, 4, 37, 48), (5, 6, 24, 72), (8, 3, 19, 96)]
SHAPES_GPU = SHAPES + [(8, 6, 4096, 2048), (9, 6, 1000, 4096)]
# Errors are relative RMS errors (|got - want| / |want| over the whole tensor) against a float64 run of the same
# steps. A single kernel step agrees with float64 to a few roundings: TOLERANCE bounds it. Whole blocks (stand-in
# sublayers between the merges, two blocks) amplify every rounding along the chain, in torch as much as in the
# kernels, so there the kernels' error is held to that of the torch steps run in the same dtype: at most
# CHAIN_FACTOR times it plus CHAIN_FLOOR (the error of one rounding, where torch happens to land closer). fp32
# chains are also held to TOLERANCE in absolute terms.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7}
CHAIN_FACTOR = 2.0
CHAIN_FLOOR = {torch.float32: 1e-6, torch.bfloat16: 2 ** -8}


def _round_bf16_to_nearest_like_the_gpu():
    """Make Triton's interpreter round fp32 -> bf16 to nearest even, as the GPU does (``cvt.rn.bf16.f32``).

    Triton 3.9's interpreter truncates instead (round toward zero). Truncation shrinks every stored bf16 value
    by half a unit in the last place on average, and the shrinkage compounds wherever a bf16 tensor is read,
    added to and stored again (the partial-sum gradient chain, the source gradients accumulated across blocks):
    under the interpreter the bf16 kernels then looked 1.3-6x less accurate than torch on some gradients, an
    artefact that a GPU does not have. ``test_interpreter_rounds_bf16_to_nearest`` checks this took effect.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    truncating = interpreter._convert_float
    if getattr(truncating, "rounds_to_nearest", False):
        return

    def convert(values, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16 and rounding_mode is None:
            rounded = torch.from_numpy(np.ascontiguousarray(values).view(np.float32)).to(torch.bfloat16)
            return rounded.view(torch.int16).numpy().view(np.uint16).reshape(values.shape)
        return truncating(values, input_dtype, output_dtype, rounding_mode)

    convert.rounds_to_nearest = True
    interpreter._convert_float = convert


if INTERPRETED:
    _round_bf16_to_nearest_like_the_gpu()


def _relative_errors(got, want, what):
    errors = []
    for index, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None or not g.abs().any(), (what, index)
            errors.append(0.0)
            continue
        assert g is not None and g.shape == w.shape, (what, index, None if g is None else g.shape, w.shape)
        errors.append(((g.double() - w.double()).norm() / w.double().norm().clamp_min(1e-30)).item())
    return errors


def _compare(got, want, dtype, what):
    for index, error in enumerate(_relative_errors(got, want, what)):
        assert error <= TOLERANCE[dtype], f"{what}[{index}]: relative error {error:.2e} > {TOLERANCE[dtype]:.0e}"


def _compare_beside_torch(got, torch_same_dtype, want, dtype, what):
    kernel_errors = _relative_errors(got, want, what)
    torch_errors = _relative_errors(torch_same_dtype, want, what)
    for index, (error, torch_error) in enumerate(zip(kernel_errors, torch_errors)):
        bound = CHAIN_FACTOR * torch_error + CHAIN_FLOOR[dtype]
        if dtype == torch.float32:
            bound = min(bound, TOLERANCE[dtype])
        assert error <= bound, (f"{what}[{index}]: relative error {error:.2e}, the torch steps in {dtype} "
                                f"{torch_error:.2e}: over {bound:.2e}")


def _block_leaves(N, S, T, D, seed=0):
    """Leaves of two consecutive blocks: N sources, then per block S (first) and 2 (second) pseudo-queries,
    key-norm weights, sublayer-norm weights and a stand-in sublayer's weight [D, D] (scaled by D**-0.5, so its
    tanh is not saturated: at a saturated tanh the bf16 rounding of y decides 1 - y**2, its gradient)."""
    generator = torch.Generator().manual_seed(seed)
    queries = S + 2

    def randn(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=generator) * scale + shift

    return ([randn(T, D, scale=1 + i) for i in range(N)] + [randn(D, scale=0.5) for _ in range(queries)]
            + [randn(D, scale=0.1, shift=1.0) for _ in range(2 * queries)]
            + [randn(D, D, scale=D ** -0.5) for _ in range(queries)])


def _run_block(ops, sources, rstd, queries, key_weights, norm_weights, weights, source_grads, with_norm):
    phase1, merge, close = ops
    # the first merge has no partial sum: phase 1 applies its norm (the torch steps ignore the offer)
    outputs, lse, params = phase1(sources, rstd, queries, key_weights, source_grads,
                                  (norm_weights[0], 1e-6) if with_norm else None)
    partial = previous = None
    inputs = []
    for j in range(len(queries)):
        x, merged = merge(outputs[j], lse[j], previous, partial, params, j,
                          norm_weights[j] if with_norm else None, 1e-5, 1e-6)
        partial = merged if merged is not None else partial
        inputs.append(x)
        previous = torch.tanh(x @ weights[j].to(x.dtype))  # the sublayer
    summary, summary_rstd = close(partial, previous, 1e-5)
    return inputs, summary, summary_rstd


def _two_blocks(ops, leaves, N, S, dtype, kernels, with_norm=True, unused=()):
    """Two blocks the way the model runs them: the second scores the first one's summary too (its rstd from the
    close), the sources' gradients accumulate across both. ``unused``: sublayer inputs left out of the loss."""
    leaves = [leaf.detach().clone().to(DEVICE, dtype).requires_grad_(True) for leaf in leaves]
    sources, rest = leaves[:N], leaves[N:]
    q, k, w, f = (rest[i * (S + 2):(i + 1) * (S + 2)] for i in range(4))
    rstd_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    rstd = [source_rstd_reference(s, 1e-5).to(rstd_dtype) for s in sources]
    source_grads = _kernels().SourceGradients() if kernels else None
    first, summary, summary_rstd = _run_block(ops, sources, rstd, q[:S], k[:S], w[:S], f[:S], source_grads,
                                              with_norm)
    second, summary2, summary2_rstd = _run_block(ops, sources + [summary], rstd + [summary_rstd], q[S:], k[S:],
                                                 w[S:], f[S:], source_grads, with_norm)
    generator = torch.Generator().manual_seed(5)
    outputs = [x for index, x in enumerate(first + second + [summary2]) if index not in unused]
    loss = sum((x.double() * torch.randn(x.shape, generator=generator, dtype=torch.float64).to(DEVICE)).sum()
               for x in outputs) + 3 * summary2_rstd.double().sum()
    loss.backward()
    return [x.detach() for x in outputs], [leaf.grad for leaf in leaves]


def _block_case(shape, dtype, with_norm=True, unused=()):
    """Forward and every gradient (sources, queries, key weights, norm weights, sublayers) of two blocks: the
    kernels in ``dtype`` against float64, beside the torch steps in ``dtype`` against float64."""
    N, S, T, D = shape
    kernels = _kernels()
    leaves = _block_leaves(N, S, T, D)
    torch_steps = (block_phase1_torch, block_merge_torch, close_reference)
    got_out, got_grads = _two_blocks((kernels.block_phase1, kernels.block_merge, kernels.block_close), leaves,
                                     N, S, dtype, True, with_norm, unused)
    same_out, same_grads = _two_blocks(torch_steps, leaves, N, S, dtype, False, with_norm, unused)
    want_out, want_grads = _two_blocks(torch_steps, leaves, N, S, torch.float64, False, with_norm, unused)
    _compare_beside_torch(got_out, same_out, want_out, dtype, "outputs")
    _compare_beside_torch(got_grads, same_grads, want_grads, dtype,
                   "grads (sources, queries, key weights, norm weights, sublayers)")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-S{}-T{}-D{}".format(*s))
def test_block_matches_reference_fp32(shape):
    _block_case(shape, torch.float32)


def test_block_without_norm_and_with_unused_inputs():
    """Mixes not followed by a foldable norm (ZeRO-3), and sublayer inputs that take no part in the loss (their
    output gradient is a null address in phase 1's backward)."""
    _block_case((3, 4, 21, 40), torch.float32, with_norm=False, unused=(1, 4))


def test_first_merge_launches_nothing_when_phase1_normed_its_input(monkeypatch):
    """Phase 1 forms the first sublayer's normed input (no partial sum to merge): of S merges forward only S - 1
    launch, every backward still does; the results are those of the other tests' checks."""
    kernels = _kernels()
    launched = []

    def run_and_count(kernel, grid, args, meta):
        launched.append(kernel.fn.__name__)
        return kernel[grid](*args, **meta)

    monkeypatch.setattr(kernels, "_launch_hook", run_and_count)
    _block_case((3, 4, 21, 40), torch.float32)  # two blocks: S = 4, then 2 queries
    assert launched.count("_phase1_forward") == 2
    assert launched.count("_merge_forward") == (4 - 1) + (2 - 1)
    assert launched.count("_merge_backward") == 4 + 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_phase1_alone_matches_reference(dtype):
    """Phase 1 by itself (one block, every output and log-sum-exp given a gradient): the rstd gradient it folds
    into the sources equals autograd's through the rstd. One step, so fp32 is held to TOLERANCE against float64
    of the same (rounded) inputs, and bf16 beside the torch step in bf16 (its outputs rounded once, like ours)."""
    N, S, T, D = 3, 4, 37, 48
    kernels = _kernels()
    generator = torch.Generator().manual_seed(3)
    leaves = [torch.randn(T, D, generator=generator) * (1 + i) for i in range(N)]
    leaves += [torch.randn(D, generator=generator) * 0.3 for _ in range(2 * S)]
    leaves = [leaf.to(dtype) for leaf in leaves]
    upstream = [torch.randn(T, D, generator=generator) for _ in range(S)] + [torch.randn(T, generator=generator)
                                                                           for _ in range(S)]

    def run(phase1, dtype, rstd_dtype):
        xs = [leaf.clone().to(DEVICE, dtype).requires_grad_(True) for leaf in leaves]
        rstd = [source_rstd_reference(x, 1e-6).to(rstd_dtype) for x in xs[:N]]
        outputs, lse, _ = phase1(xs[:N], rstd, xs[N:N + S], xs[N + S:])
        torch.autograd.backward([*outputs, *lse], [u.to(DEVICE, o.dtype) for u, o in zip(upstream, [*outputs, *lse])])
        return [o.detach() for o in [*outputs, *lse]] + [x.grad for x in xs]

    got = run(kernels.block_phase1, dtype, torch.float32)
    want = run(block_phase1_torch, torch.float64, torch.float64)
    if dtype == torch.float32:
        _compare(got, want, dtype, "outputs, log-sum-exps, grads")
    else:
        _compare_beside_torch(got, run(block_phase1_torch, dtype, torch.float32), want, dtype,
                              "outputs, log-sum-exps, grads")


def test_parameter_buffers_are_filled_by_phase1(monkeypatch):
    """The block's parameter-gradient buffer and its copy of the query vectors are allocated uninitialised;
    phase 1's forward zeroes the one and copies the queries into the other (read by address, not stacked).
    Filled with NaN beforehand, every output and gradient still matches (a missed element would stay NaN)."""
    kernels = _kernels()
    allocate = kernels.BlockParameters.of.__func__

    def poisoned(cls, queries, key_weights):
        params = allocate(cls, queries, key_weights)
        params.grads_3SD.fill_(float("nan"))
        params.values_2SD.fill_(float("nan"))
        return params

    monkeypatch.setattr(kernels.BlockParameters, "of", classmethod(poisoned))
    # 3 * S * D = 1200 floats: more than one program's step (_ZERO_BLOCK), so two programs share the work
    _block_case((2, 5, 37, 80), torch.float32)


@pytest.mark.parametrize("shape", [(4, 4, 24, 64), (8, 3, 19, 96)], ids=lambda s: "N{}-S{}-T{}-D{}".format(*s))
def test_block_matches_reference_bf16(shape):
    """bf16 storage, fp32 arithmetic: two whole blocks, beside the torch steps storing bf16 activations too."""
    _block_case(shape, torch.bfloat16)


@pytest.mark.skipif(not INTERPRETED, reason="the GPU rounds to nearest by itself")
def test_interpreter_rounds_bf16_to_nearest():
    """The interpreter's fp32 -> bf16 stores round as torch and the GPU do (see
    _round_bf16_to_nearest_like_the_gpu); without it the bf16 comparisons above measure truncation."""
    values = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    stored = torch.empty(1000, dtype=torch.bfloat16)
    _store_as(values, stored)
    assert torch.equal(stored, values.to(torch.bfloat16))


@triton.jit
def _store_kernel(values_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(out_ptr + offsets, tl.load(values_ptr + offsets, mask=mask), mask=mask)


def _store_as(values, out):
    _store_kernel[(1,)](values, out, values.numel(), BLOCK=triton.next_power_of_2(values.numel()))


def test_kernels_inside_the_model_match_the_torch_mix(monkeypatch):
    """The whole model with the Triton phases swapped in for the torch ones: views of the phase-1 outputs,
    log-sum-exp gradients from several sublayers, the final norm folded into phase 2."""
    import attnres_train.model.attnres as attnres
    from attnres_train.model import build_model

    kernels = _kernels()
    cfg = dict(vocab_size=50, hidden_size=32, num_layers=3, hybrid_ratio=1, linear_num_heads=2, linear_head_dim=16,
               linear_chunk_size=8, mla_num_heads=2, mla_kv_lora_rank=16, mla_qk_nope_head_dim=16,
               mla_v_head_dim=16, mlp="dense", ffn_dim=48, residual="block_attnres", attnres_block_size=4)
    torch.manual_seed(0)
    model = build_model(cfg).to(DEVICE)
    with torch.no_grad():
        for query in model.attnres_queries().values():
            query.query.normal_()
    input_ids = torch.randint(0, 50, (2, 12), device=DEVICE)
    results = []
    for impl in ("torch", "fused"):
        model.residual.impl = impl
        model.zero_grad(set_to_none=True)
        logits = model(input_ids).logits
        logits.square().mean().backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        monkeypatch.setattr(attnres, "_two_phase_ops",
                            lambda device: (kernels.block_phase1, kernels.block_merge, kernels.block_close))
        monkeypatch.setattr(attnres, "_source_gradients", lambda device: kernels.SourceGradients())
    (want_logits, want_grads), (got_logits, got_grads) = results
    _compare([got_logits], [want_logits], torch.float32, "logits")
    for name, grad in want_grads.items():
        scale = grad.abs().max().clamp_min(1e-12)
        assert ((got_grads[name] - grad).abs().max() / scale).item() < 1e-4, name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES_GPU, ids=lambda s: "N{}-S{}-T{}-D{}".format(*s))
def test_block_on_gpu(shape, dtype):
    _block_case(shape, dtype)
