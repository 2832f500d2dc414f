"""The two-phase Block AttnRes kernels (attnres_kernels.block_attnres) against the pure-torch reference.

On a CUDA machine the kernels run compiled; the ``gpu`` tests add bf16 and large shapes. Without a GPU the
fp32 tests run in Triton's interpreter on CPU (``test_kernels_interpreted.py`` starts this file in a process with
``TRITON_INTERPRET=1``, which must be set before triton is first imported): that checks the kernels' indexing,
masking and math, not their speed.
"""

import importlib
import os

import pytest
import torch

from attnres_kernels.reference import phase1_reference, phase2_reference

triton = pytest.importorskip("triton")
ON_GPU = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if not ON_GPU and not INTERPRETED:
    pytest.skip("no GPU: these run under the Triton interpreter via test_kernels_interpreted.py",
                allow_module_level=True)


def _kernels():
    return importlib.import_module("attnres_kernels.block_attnres")


DEVICE = "cuda" if ON_GPU else "cpu"
# (N completed sources, S queries, T tokens, D hidden); odd T and D exercise every mask.
SHAPES = [(1, 1, 5, 16), (2, 3, 1, 40), (3, 4, 37, 48), (5, 6, 64, 128), (8, 3, 19, 96)]
SHAPES_GPU = SHAPES + [(8, 6, 4096, 2048), (9, 6, 1000, 4096)]
# Largest error relative to the tensor's largest magnitude, against a float64 reference: fp32 kernels agree to
# fp32 rounding; bf16 ones to about two bf16 roundings (2**-8 each) of their stored outputs and gradients, the
# arithmetic inside being fp32.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _phase1_inputs(N, S, T, D, dtype, seed=0):
    """``[*sources_TD, rstd_NT, queries_SD]``: separate source tensors, as the model keeps them."""
    generator = torch.Generator().manual_seed(seed)
    sources = [(torch.randn(T, D, generator=generator) * (1 + i)).to(DEVICE, dtype) for i in range(N)]
    rstd = torch.stack([torch.rsqrt(s.float().pow(2).mean(-1) + 1e-6) for s in sources])
    queries = (torch.randn(S, D, generator=generator) * 0.3).to(DEVICE, dtype)
    return [*sources, rstd, queries]


def _grads(fn, inputs, upstream):
    """Outputs of ``fn`` and the gradients of its inputs for the given upstream gradients (None: that output
    takes no part in the loss)."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    outputs = fn(*leaves)
    pairs = [(o, u.to(o.dtype)) for o, u in zip(outputs, upstream) if o is not None and u is not None]
    torch.autograd.backward([o for o, _ in pairs], [u for _, u in pairs])
    return [o.detach() for o in outputs if o is not None], [leaf.grad for leaf in leaves]


def _compare(got, want, dtype, what):
    for index, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None or not g.abs().any(), (what, index)
            continue
        assert g.shape == w.shape, (what, index, g.shape, w.shape)
        scale = w.double().abs().max().clamp_min(1e-12)
        error = ((g.double() - w.double()).abs().max() / scale).item()
        assert error <= TOLERANCE[dtype], f"{what}[{index}]: relative error {error:.2e} > {TOLERANCE[dtype]:.0e}"


def _reference(fn):
    """``fn`` evaluated in float64 (inputs promoted), the yardstick for both precisions."""
    def run(*inputs):
        return fn(*[x.double() if torch.is_tensor(x) and x.is_floating_point() else x for x in inputs])
    return run


def _flat_phase1(phase1, N):
    """``phase1`` as a function of ``(*sources, rstd, queries)`` returning ``(*outputs, lse)``."""
    def run(*inputs):
        outputs, lse = phase1(list(inputs[:N]), inputs[N], inputs[N + 1])
        return (*outputs, lse)
    return run


def _phase1_case(shape, dtype, unused=()):
    """Forward and every gradient against float64; ``unused`` lists outputs (index S: the log-sum-exp) that get
    no upstream gradient, as when a sublayer's mix is not needed."""
    N, S, T, D = shape
    kernels = _kernels()
    inputs = _phase1_inputs(N, S, T, D, dtype)
    generator = torch.Generator().manual_seed(1)
    upstream = [torch.randn(T, D, generator=generator).to(DEVICE, dtype) for _ in range(S)]
    upstream.append(torch.randn(S, T, generator=generator).to(DEVICE))
    upstream = [None if index in unused else u for index, u in enumerate(upstream)]
    got_out, got_grads = _grads(_flat_phase1(kernels.block_phase1, N), inputs, upstream)
    want_out, want_grads = _grads(_reference(_flat_phase1(phase1_reference, N)), inputs, upstream)
    _compare(got_out, want_out, dtype, "outputs")
    _compare(got_grads, want_grads, dtype, "grads (sources..., rstd, queries)")


def _phase2_case(T, D, dtype, with_partial, with_norm):
    kernels = _kernels()
    generator = torch.Generator().manual_seed(2)
    o = torch.randn(T, D, generator=generator).to(DEVICE, dtype)
    lse = (torch.randn(T, generator=generator) * 3).to(DEVICE)
    partial = (torch.randn(T, D, generator=generator) * 2).to(DEVICE, dtype)
    query = (torch.randn(D, generator=generator) * 0.5).to(DEVICE, dtype)
    weight = (1 + 0.1 * torch.randn(D, generator=generator)).to(DEVICE, dtype)
    upstream = [torch.randn(T, D, generator=generator).to(DEVICE, dtype)]

    def call(fn):
        def run(o, lse, partial, query, weight):
            return (fn(o, lse, partial if with_partial else None, query, weight if with_norm else None, 1e-5, 1e-6),)
        return run

    inputs = [o, lse, partial, query, weight]
    got_out, got_grads = _grads(call(kernels.block_phase2), inputs, upstream)
    want_out, want_grads = _grads(call(_reference(phase2_reference)), inputs, upstream)
    _compare(got_out, want_out, dtype, "output")
    for name, got, want in zip(["o", "lse", "partial", "query", "norm_weight"], got_grads, want_grads):
        _compare([got], [want], dtype, f"grad {name}")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-S{}-T{}-D{}".format(*s))
def test_phase1_matches_reference_fp32(shape):
    _phase1_case(shape, torch.float32)


def test_phase1_outputs_without_gradient_count_as_zero():
    """A sublayer whose mix takes no part in the loss hands phase 1 no gradient (a null address in the kernel),
    and neither does an unused log-sum-exp."""
    _phase1_case((3, 4, 21, 40), torch.float32, unused=(1, 2, 4))


@pytest.mark.parametrize("T,D", [(45, 80), (1, 3), (33, 100), (70, 257)])
@pytest.mark.parametrize("with_norm", [False, True], ids=["plain", "normed"])
@pytest.mark.parametrize("with_partial", [False, True], ids=["block_start", "with_partial"])
def test_phase2_matches_reference_fp32(with_partial, with_norm, T, D):
    if with_norm and D < 8:
        pytest.skip("the RMSNorm gradient of a 3-wide row is all cancellation")
    _phase2_case(T, D, torch.float32, with_partial, with_norm)


def test_bf16_kernels_match_reference():
    """bf16 storage, fp32 arithmetic: outputs to bf16 rounding, gradients as close (the logit gradient is built
    from the fp32 dO . v, not from the bf16-rounded output)."""
    _phase1_case((4, 4, 96, 64), torch.bfloat16)
    _phase2_case(45, 80, torch.bfloat16, True, True)


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
        monkeypatch.setattr(attnres, "_two_phase_ops", lambda device: (kernels.block_phase1, kernels.block_phase2))
    (want_logits, want_grads), (got_logits, got_grads) = results
    _compare([got_logits], [want_logits], torch.float32, "logits")
    for name, grad in want_grads.items():
        scale = grad.abs().max().clamp_min(1e-12)
        assert ((got_grads[name] - grad).abs().max() / scale).item() < 1e-4, name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES_GPU, ids=lambda s: "N{}-S{}-T{}-D{}".format(*s))
def test_phase1_on_gpu(shape, dtype):
    _phase1_case(shape, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T,D", [(45, 80), (8192, 2048), (1000, 4096)])
def test_phase2_on_gpu(T, D, dtype):
    for with_partial in (False, True):
        for with_norm in (False, True):
            _phase2_case(T, D, dtype, with_partial, with_norm)
