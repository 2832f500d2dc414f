"""The AttnRes dispatch point (``model.attnres_impl``): every implementation gives the torch reference's
numbers. On CPU ``fused`` runs the two phases in torch (attnres_kernels.reference); the Triton kernels behind it
on CUDA are compared with that reference in tests/kernels."""

import pytest
import torch

import attnres_train.model.attnres as attnres
from attnres_kernels.reference import (block_merge_torch, block_phase1_torch, close_reference, phase1_reference,
                                       phase2_reference)
from attnres_train.model import ModelConfigError, build_model

BASE = dict(
    vocab_size=50, hidden_size=32, num_layers=4, hybrid_ratio=1, linear_mixer="kda", full_mixer="gqa",
    linear_num_heads=2, linear_head_dim=16, linear_chunk_size=8, gqa_num_heads=2, gqa_num_kv_heads=1,
    gqa_head_dim=16, gqa_rope_fraction=0.5, mlp="dense", ffn_dim=48,
)


def _model(**overrides):
    torch.manual_seed(0)
    model = build_model({**BASE, **overrides}).double()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # zero queries give uniform mixes: randomise them so the softmax matters
        for query in model.attnres_queries().values():
            query.query.copy_(torch.randn(query.query.shape, generator=generator, dtype=torch.float64))
            query.key_norm_weight.copy_(1 + 0.2 * torch.randn(query.query.shape, generator=generator,
                                                                dtype=torch.float64))
    return model


def _run(model, impl):
    model.residual.impl = impl
    model.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(0, 50, (2, 16), generator=generator)
    doc_ids = torch.tensor([[0] * 9 + [1] * 7, [0] * 16])
    logits = model(input_ids, doc_ids).logits
    (logits * torch.randn(logits.shape, generator=generator, dtype=logits.dtype)).sum().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_same(got, want, tolerance=1e-10):
    """Logits and every parameter gradient agree: largest error relative to the tensor's largest magnitude
    (float64 models; ``tolerance`` is looser for an implementation that computes in fp32)."""
    pairs = [("logits", got[0], want[0])]
    assert got[1].keys() == want[1].keys()
    pairs += [(name, got[1][name], grad) for name, grad in want[1].items()]
    for name, g, w in pairs:
        error = ((g - w).abs().max() / w.abs().max().clamp_min(1e-30)).item()
        assert error <= tolerance, f"{name}: relative error {error:.2e} > {tolerance:.0e}"


# 8 sublayers + the output mix: block sizes 2 and 4 end on a block boundary (the output mix starts a block of its
# own), 3 leaves the last block one sublayer short (sublayers 6, 7 and the output mix).
@pytest.mark.parametrize("block_size", [1, 2, 3, 4, 6])
def test_fused_two_phase_matches_torch_in_the_whole_model(block_size):
    model = _model(residual="block_attnres", attnres_block_size=block_size)
    _assert_same(_run(model, "fused"), _run(model, "torch"))


def test_fused_scores_completed_blocks_once_per_block(monkeypatch):
    model = _model(residual="block_attnres", attnres_block_size=4)
    calls = []

    first_norms = []

    def counting_phase1(sources_TD, rstd_T, queries_D, key_weights_D, source_grads=None, first_norm=None):
        calls.append((len(sources_TD), len(queries_D)))
        first_norms.append(first_norm is not None)
        return block_phase1_torch(sources_TD, rstd_T, queries_D, key_weights_D)

    merges = []

    def recording_merge(o, lse, previous_output, previous_partial, params, index, norm_weight=None, eps=1e-6,
                        norm_eps=1e-6):
        merges.append((previous_output is not None, norm_weight is not None))
        return block_merge_torch(o, lse, previous_output, previous_partial, params, index, norm_weight, eps,
                                 norm_eps)

    closes = []

    def counting_close(partial, output, eps):
        closes.append(partial is not None)
        return close_reference(partial, output, eps)

    monkeypatch.setattr(attnres, "_two_phase_ops",
                        lambda device: (counting_phase1, recording_merge, counting_close))
    _run(model, "fused")
    # (completed sources, queries): block 0 over the embedding, block 1 over b_0, b_1, the output mix over all.
    assert calls == [(1, 4), (2, 4), (3, 1)]
    # Phase 1 is asked to apply the norm of the mix it runs for exactly where nothing is merged into that mix.
    assert first_norms == [True, True, True]
    # Every mix applies its following RMSNorm inside phase 2; the first of each block has no partial sum.
    assert merges == [(False, True), (True, True), (True, True), (True, True)] * 2 + [(False, True)]
    # Each block's summary is formed once, by its close (the partial sums by the merges on the way).
    assert closes == [True, True]

    # Queries not registered here (another pipeline stage's, or a ZeRO-3 shard) wait for their own turn.
    want = _run(model, "torch")
    model.residual.register_queries(model.attnres_queries(layer_indices=[0, 3]))
    calls.clear()
    first_norms.clear()
    _assert_same(_run(model, "fused"), want)
    # Registered: layers 0 and 3 (sublayers 0, 1, 6, 7) and the output mix (8).
    assert calls == [(1, 2), (1, 1), (1, 1), (2, 3), (2, 1), (3, 1)]
    assert first_norms == [True, False, False, True, False, True]

    # Parameters valid only inside their own module's call (ZeRO-3): one query per phase 1, norms not folded in.
    model.residual.register_queries(model.attnres_queries())
    model.residual.per_module_parameters = True
    calls.clear()
    merges.clear()
    first_norms.clear()
    _assert_same(_run(model, "fused"), want)
    assert calls == [(1, 1)] * 4 + [(2, 1)] * 4 + [(3, 1)]
    assert not any(first_norms)
    assert merges == [(True, False)] * 3 + [(True, False)] * 3  # only the mixes with a partial sum merge


def test_full_attnres_and_diagnostics_use_the_torch_mix_under_fused():
    model = _model(residual="full_attnres")
    _assert_same(_run(model, "fused"), _run(model, "torch"))
    block = _model(residual="block_attnres", attnres_block_size=2)
    block.residual.impl = "fused"
    out = block(torch.randint(0, 50, (1, 8)), return_diagnostics=True)
    assert len(out.depth_weights) == 9


def test_fla_impl_passes_the_model_parameters_to_fla(monkeypatch):
    """fla's kernel needs CUDA; its pure-torch twin (same signature) checks the arguments we hand it."""
    naive = pytest.importorskip("fla.ops.attnres.naive").naive_attnres
    calls = []

    def fla_on_cpu(query, residuals, rms_weight, **kwargs):
        calls.append(len(residuals))
        return naive(query, residuals, rms_weight, **kwargs)

    monkeypatch.setattr(attnres, "_fla_attnres", lambda: fla_on_cpu)
    monkeypatch.setattr(attnres, "resolve_attnres_impl", lambda impl, device: impl)
    for residual in ("block_attnres", "full_attnres"):
        model = _model(residual=residual, attnres_block_size=4)
        calls.clear()
        _assert_same(_run(model, "fla"), _run(model, "torch"), tolerance=2e-5)  # fla computes in fp32
        assert len(calls) == 9


def test_two_phases_equal_one_softmax_over_all_sources():
    generator = torch.Generator().manual_seed(3)
    N, S, T, D = 4, 3, 10, 16
    sources = torch.randn(N, T, D, generator=generator, dtype=torch.float64)
    rstd = torch.rsqrt(sources.pow(2).mean(-1) + 1e-6)
    queries = torch.randn(S, D, generator=generator, dtype=torch.float64)
    partial = torch.randn(T, D, generator=generator, dtype=torch.float64)
    partial_rstd = torch.rsqrt(partial.pow(2).mean(-1) + 1e-6)
    o, lse = phase1_reference(list(sources), rstd, queries)
    weight = 1 + 0.1 * torch.randn(D, generator=generator, dtype=torch.float64)
    for s in range(S):
        direct, _ = attnres.attnres_mix(torch.cat([sources, partial[None]]).unsqueeze(1),
                                        torch.cat([rstd, partial_rstd[None]]).unsqueeze(1), queries[s])
        merged = phase2_reference(o[s], lse[s], partial, queries[s], eps=1e-6)
        torch.testing.assert_close(merged, direct[0], rtol=1e-12, atol=1e-12)
        normed = phase2_reference(o[s], lse[s], partial, queries[s], weight, 1e-6, 1e-6)
        expected = direct[0] * torch.rsqrt(direct[0].pow(2).mean(-1, keepdim=True) + 1e-6) * weight
        torch.testing.assert_close(normed, expected, rtol=1e-12, atol=1e-12)
        alone, _ = attnres.attnres_mix(sources.unsqueeze(1), rstd.unsqueeze(1), queries[s])
        torch.testing.assert_close(phase2_reference(o[s], lse[s], None, queries[s]), alone[0])


def test_impl_choice_is_validated_and_fla_needs_cuda():
    with pytest.raises(ModelConfigError, match="attnres_impl"):
        build_model({**BASE, "attnres_impl": "triton"})
    assert attnres.resolve_attnres_impl("auto", torch.device("cpu")) == "torch"
    assert attnres.resolve_attnres_impl("fused", torch.device("cpu")) == "fused"
    with pytest.raises(RuntimeError, match="attnres_impl=fla.*CUDA"):
        attnres.resolve_attnres_impl("fla", torch.device("cpu"))
    model = build_model({**BASE, "attnres_impl": "fla"})
    with pytest.raises(RuntimeError, match="attnres_impl=fla"):
        model(torch.randint(0, 50, (1, 8)))


def _run_cuda(model, impl, dtype):
    model.residual.impl = impl
    model.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(0, 50, (4, 256), generator=generator).cuda()
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        logits = model(input_ids).logits.float()
    (logits * torch.randn(logits.shape, generator=generator).cuda()).sum().backward()
    return logits.detach(), {name: p.grad.float().clone() for name, p in model.named_parameters()
                             if p.grad is not None}


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["fused", "fla"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_impls_match_torch_in_the_whole_model(impl, dtype):
    if impl == "fla":
        pytest.importorskip("fla.ops.attnres")
    torch.manual_seed(0)
    model = build_model({**BASE, "residual": "block_attnres", "attnres_block_size": 3}).cuda()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for query in model.attnres_queries().values():
            query.query.copy_(torch.randn(query.query.shape, generator=generator).cuda())
    if dtype == torch.bfloat16:
        model = model.to(torch.bfloat16)
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    _assert_same(_run_cuda(model, impl, dtype), _run_cuda(model, "torch", dtype), tolerance=tolerance)


def test_pipeline_layers_that_end_their_stream_batch_only_their_own_queries(monkeypatch):
    """With every pipeline layer speaking the wire format (DeepSpeed's activation checkpointing), each layer
    gets a fresh stream: phase 1 batches that layer's two queries, not the rest of the block."""
    from attnres_train.parallel.pipeline import pipeline_layers

    model = _model(residual="block_attnres", attnres_block_size=4)
    calls = []

    def counting_phase1(sources_TD, rstd_T, queries_D, key_weights_D, source_grads=None, first_norm=None):
        calls.append((len(sources_TD), len(queries_D)))
        return block_phase1_torch(sources_TD, rstd_T, queries_D, key_weights_D)

    input_ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(4))
    want = model(input_ids).logits
    monkeypatch.setattr(attnres, "_two_phase_ops", lambda device: (counting_phase1, block_merge_torch, close_reference))
    model.residual.impl = "fused"
    layers = pipeline_layers(model)
    for layer in layers:
        layer.emits_wire = True
    out = input_ids
    for layer in layers:
        out = layer(out)
    torch.testing.assert_close(out[0], want, rtol=1e-10, atol=1e-10)
    assert calls == [(1, 2), (1, 2), (2, 2), (2, 2), (3, 1)]
