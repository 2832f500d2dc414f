"""Tests of the linear-attention mixers (KDA, Gated DeltaNet), the chunked delta rule and the short conv.

References: fla 0.6.0's pure-torch ``naive_*`` functions and gate functions (they run on CPU), fla's layer
classes (constructed on CPU for parameter names, shapes and checkpoints), and our own token-by-token
recurrence. GPU tests compare the fla-kernel path with the torch path and run only with CUDA.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from attnres_train.model.mixers.delta_rule import (
    chunk_delta_rule,
    delta_rule_chunk_macs,
    recurrent_delta_rule,
)
from attnres_train.model.mixers.linear_attention import GatedDeltaNet, KimiDeltaAttention
from attnres_train.model.mixers.short_conv import ShortConvolution
from attnres_train.model.packing import DocumentLayout

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    # These shapes are too small to gain from intra-op threads, and on a loaded 2-core machine the OpenMP
    # barriers of every small op make them up to 100x slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------------------------------------------
# helpers
def _prepared_inputs(B, T, H, HV, K, V, per_channel, dtype=torch.float64, gate_scale=1.0, seed=0):
    """Inputs as the kernels expect them: L2-normalised q/k, log-space gate <= 0, beta in (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=dtype), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=dtype), dim=-1)
    v = torch.randn(B, T, HV, V, generator=gen, dtype=dtype)
    gate_shape = (B, T, HV, K) if per_channel else (B, T, HV)
    g = F.logsigmoid(torch.randn(gate_shape, generator=gen, dtype=dtype)) * gate_scale
    beta = torch.rand(B, T, HV, generator=gen, dtype=dtype)
    h0 = torch.randn(B, HV, K, V, generator=gen, dtype=dtype)
    return q, k, v, g, beta, h0


def _fla_naive():
    kda = pytest.importorskip("fla.ops.kda.naive")
    gdn = pytest.importorskip("fla.ops.gated_delta_rule.naive")
    return kda, gdn


def _fla_layers():
    return pytest.importorskip("fla.layers")


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------------------------------
# chunked delta rule vs fla's naive references (they compute in float32 internally)
@pytest.mark.parametrize("T", [64, 100])
@pytest.mark.parametrize("H,HV", [(2, 2), (2, 4)])
def test_chunk_kda_matches_fla_naive_recurrent(T, H, HV):
    kda_naive, _ = _fla_naive()
    q, k, v, g, beta, h0 = _prepared_inputs(2, T, H, HV, 16, 8, per_channel=True)
    ref_o, ref_s = kda_naive.naive_recurrent_kda(
        q=q, k=k, v=v, g=g, beta=beta, initial_state=h0, output_final_state=True
    )
    o, s = chunk_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=64)
    torch.testing.assert_close(o, ref_o.to(o.dtype), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(s, ref_s.to(s.dtype), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("H,HV", [(2, 2), (1, 3)])
def test_chunk_kda_matches_fla_naive_chunk(H, HV):
    kda_naive, _ = _fla_naive()
    q, k, v, g, beta, h0 = _prepared_inputs(1, 128, H, HV, 16, 8, per_channel=True, dtype=torch.float32)
    ref_o, ref_s = kda_naive.naive_chunk_kda(
        q=q, k=k, v=v, g=g, beta=beta, initial_state=h0, output_final_state=True, chunk_size=64
    )
    o, s = chunk_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=64)
    torch.testing.assert_close(o, ref_o, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(s, ref_s, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("T", [64, 100])
def test_chunk_gdn_matches_fla_naive_recurrent_and_chunk(T):
    _, gdn_naive = _fla_naive()
    q, k, v, g, beta, h0 = _prepared_inputs(2, T, 3, 3, 16, 8, per_channel=False)
    o, s = chunk_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=64)
    rec_o, rec_s = gdn_naive.naive_recurrent_gated_delta_rule(
        q=q, k=k, v=v, beta=beta, g=g, initial_state=h0, output_final_state=True
    )
    chk_o, chk_s = gdn_naive.naive_chunk_gated_delta_rule(
        q=q, k=k, v=v, g=g, beta=beta, chunk_size=64, initial_state=h0, output_final_state=True
    )
    for ref_o, ref_s in ((rec_o, rec_s), (chk_o, chk_s)):
        torch.testing.assert_close(o, ref_o.to(o.dtype), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(s, ref_s.to(s.dtype), atol=2e-5, rtol=1e-5)


def test_chunk_gdn_grouped_value_heads_match_kda_reference_with_broadcast_gate():
    # fla's naive GDN has no grouped value heads; a scalar gate is a per-channel gate constant over K,
    # so naive_recurrent_kda (which has GVA) is an independent reference.
    kda_naive, _ = _fla_naive()
    q, k, v, g, beta, h0 = _prepared_inputs(2, 70, 2, 6, 16, 8, per_channel=False)
    ref_o, ref_s = kda_naive.naive_recurrent_kda(
        q=q, k=k, v=v, g=g.unsqueeze(-1).expand(-1, -1, -1, 16), beta=beta, initial_state=h0, output_final_state=True
    )
    o, s = chunk_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=32)
    torch.testing.assert_close(o, ref_o.to(o.dtype), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(s, ref_s.to(s.dtype), atol=2e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# chunked vs our step-by-step recurrence, float64, tight
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize(
    "T,chunk_size,H,HV",
    [(1, 64, 2, 2), (37, 16, 2, 4), (64, 64, 1, 1), (130, 64, 2, 4), (100, 48, 2, 2), (50, 24, 1, 2), (19, 1, 2, 2)],
)
def test_chunked_equals_recurrent_float64(per_channel, T, chunk_size, H, HV):
    q, k, v, g, beta, h0 = _prepared_inputs(2, T, H, HV, 8, 6, per_channel=per_channel)
    ref_o, ref_s = recurrent_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o, s = chunk_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=chunk_size)
    torch.testing.assert_close(o, ref_o, atol=1e-11, rtol=1e-11)
    torch.testing.assert_close(s, ref_s, atol=1e-11, rtol=1e-11)
    o_no_state, s_none = chunk_delta_rule(q, k, v, g, beta, chunk_size=chunk_size)
    assert s_none is None
    assert not torch.allclose(o_no_state, o)  # the initial state matters, so the check above can fail


@pytest.mark.parametrize("per_channel", [True, False])
def test_chunked_gradients_equal_recurrent_gradients(per_channel):
    inputs = [t.requires_grad_() for t in _prepared_inputs(1, 70, 2, 4, 8, 6, per_channel=per_channel)]
    probe = torch.randn(1, 70, 4, 6, dtype=torch.float64)
    state_probe = torch.randn(1, 4, 8, 6, dtype=torch.float64)

    def grads(fn, **kwargs):
        q, k, v, g, beta, h0 = inputs
        o, s = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True, **kwargs)
        return torch.autograd.grad((o * probe).sum() + (s * state_probe).sum(), inputs)

    for got, want in zip(grads(chunk_delta_rule, chunk_size=32), grads(recurrent_delta_rule)):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_is_stable_for_very_negative_gates(per_channel, dtype):
    # fla's init allows exp(A_log) up to 16 and softplus grows with the projection: per-step gates of
    # -100s make in-chunk cumulative gates of -10^4, far beyond exp's range if ever negated.
    q, k, v, g, beta, _ = _prepared_inputs(2, 150, 2, 4, 16, 8, per_channel=per_channel, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    g = -torch.rand(g.shape, generator=gen, dtype=torch.float64) * 300.0
    g[:, ::7] = -1e-3  # some near-identity steps mixed in
    ref_o, ref_s = recurrent_delta_rule(q, k, v, g, beta, output_final_state=True)
    low = [t.to(dtype).requires_grad_() for t in (q, k, v, g, beta)]
    o, s = chunk_delta_rule(*low, output_final_state=True, chunk_size=64)
    (o.float().sum() + s.sum()).backward()
    assert o.dtype == dtype and s.dtype == torch.float32
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert all(torch.isfinite(t.grad).all() for t in low)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert (o.double() - ref_o).abs().max() < tol
    if dtype == torch.float32:
        assert (s.double() - ref_s).abs().max() < tol


def test_delta_rule_rejects_bad_shapes():
    q, k, v, g, beta, h0 = _prepared_inputs(1, 8, 2, 4, 8, 6, per_channel=True)
    with pytest.raises(ValueError, match="multiple of the 2 query/key heads"):
        chunk_delta_rule(q, k, v[:, :, :3], g[:, :, :3], beta[:, :, :3])
    with pytest.raises(ValueError, match="g must have shape"):
        chunk_delta_rule(q, k, v, g[..., :5], beta)
    with pytest.raises(ValueError, match="beta must have shape"):
        chunk_delta_rule(q, k, v, g, beta[:, :4])
    with pytest.raises(ValueError, match="initial_state must have shape"):
        chunk_delta_rule(q, k, v, g, beta, initial_state=h0.transpose(-1, -2))
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_delta_rule(q, k, v, g, beta, chunk_size=0)


# --------------------------------------------------------------------------------------------------
# short convolution
def test_short_conv_is_causal_depthwise_with_last_tap_on_current_token():
    conv = ShortConvolution(hidden_size=3, kernel_size=4, activation=None).double()
    x = torch.randn(2, 9, 3, dtype=torch.float64)
    y = conv(x)
    w = conv.weight[:, 0, :]  # [D, W]
    expected = torch.zeros_like(x)
    for t in range(9):
        for tap in range(4):
            src = t - 3 + tap
            if src >= 0:
                expected[:, t] += x[:, src] * w[:, tap]
    torch.testing.assert_close(y, expected)
    with_silu = ShortConvolution(hidden_size=3, kernel_size=4).double()
    with_silu.load_state_dict(conv.state_dict())
    torch.testing.assert_close(with_silu(x), F.silu(expected))
    with pytest.raises(ValueError, match="use_fla_kernel"):
        conv(x, cu_seqlens=torch.tensor([0, 9], dtype=torch.int32))


# --------------------------------------------------------------------------------------------------
# module level
MODULE_CASES = {
    # output_gate_bias=True: fla's KDA layout (its g_proj.1 has a bias; the published model's has none)
    "kda": (KimiDeltaAttention, dict(hidden_size=32, head_dim=8, num_heads=2, num_v_heads=4, expand_v=1.0,
                                     output_gate_bias=True)),
    "kda_mha": (KimiDeltaAttention, dict(hidden_size=32, head_dim=16, num_heads=2, expand_v=0.5,
                                         output_gate_bias=True)),
    "gdn": (GatedDeltaNet, dict(hidden_size=32, head_dim=8, num_heads=2, expand_v=2.0)),
    "gdn_gva": (GatedDeltaNet, dict(hidden_size=32, head_dim=8, num_heads=2, num_v_heads=4, expand_v=1.0)),
}


def _build(name, **overrides):
    cls, kwargs = MODULE_CASES[name]
    torch.manual_seed(0)
    return cls(**{**kwargs, "chunk_size": 16, "impl": "torch", **overrides})


def _fla_class(module):
    layers = _fla_layers()
    return layers.KimiDeltaAttention if isinstance(module, KimiDeltaAttention) else layers.GatedDeltaNet


def _fla_layer_like(module):
    return _fla_class(module)(
        hidden_size=module.hidden_size,
        expand_v=module.expand_v,
        head_dim=module.head_dim,
        num_heads=module.num_heads,
        num_v_heads=module.num_v_heads,
        conv_size=module.conv_size,
        allow_neg_eigval=module.allow_neg_eigval,
        norm_eps=module.norm_eps,
    )


def _fla_layer_reference_forward(layer, x_BTD):
    """fla's layer forward rebuilt from CPU-safe pieces: its own parameters, nn.Conv1d's forward (fla's
    ShortConvolution is an nn.Conv1d with padding W-1), fla's naive gate and naive recurrence."""
    from fla.ops.gated_delta_rule.gate import naive_gdn_gate
    from fla.ops.kda.gate import naive_kda_gate
    from fla.ops.kda.naive import naive_recurrent_kda

    B, T, _ = x_BTD.shape
    H, HV, K, V = layer.num_heads, layer.num_v_heads, layer.head_k_dim, layer.head_v_dim

    def conv(mod, y):
        return F.silu(torch.nn.Conv1d.forward(mod, y.transpose(1, 2))[..., :T].transpose(1, 2))

    def l2(y):
        return y / torch.sqrt(y.pow(2).sum(-1, keepdim=True) + 1e-6)

    q = l2(conv(layer.q_conv1d, layer.q_proj(x_BTD)).view(B, T, H, K))
    k = l2(conv(layer.k_conv1d, layer.k_proj(x_BTD)).view(B, T, H, K))
    v = conv(layer.v_conv1d, layer.v_proj(x_BTD)).view(B, T, HV, V)
    beta = layer.b_proj(x_BTD).sigmoid() * (2.0 if layer.allow_neg_eigval else 1.0)
    if isinstance(layer, _fla_layers().KimiDeltaAttention):
        g = naive_kda_gate(layer.f_proj(x_BTD).view(B, T, HV, K), layer.A_log, layer.dt_bias)
        gate = torch.sigmoid(layer.g_proj(x_BTD).view(B, T, HV, V))
    else:
        g = naive_gdn_gate(layer.a_proj(x_BTD), layer.A_log, layer.dt_bias).unsqueeze(-1).expand(B, T, HV, K)
        gate = F.silu(layer.g_proj(x_BTD).view(B, T, HV, V))
    o, _ = naive_recurrent_kda(q=q, k=k, v=v, g=g, beta=beta)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + layer.o_norm.eps) * layer.o_norm.weight * gate
    return layer.o_proj(o.reshape(B, T, HV * V))


@pytest.mark.parametrize("name", list(MODULE_CASES))
@pytest.mark.parametrize("allow_neg_eigval", [False, True])
def test_module_matches_fla_layer_weights_run_through_fla_naive_pieces(name, allow_neg_eigval):
    module = _build(name, allow_neg_eigval=allow_neg_eigval)
    layer = _fla_layer_like(module)
    with torch.no_grad():  # non-trivial norm weights and biases so every parameter matters
        for p in layer.parameters():
            if p.dim() == 1 and p is not layer.A_log and p is not layer.dt_bias:
                p.add_(0.3 * torch.randn_like(p))
    module.load_state_dict(layer.state_dict(), strict=True)
    x = torch.randn(2, 45, module.hidden_size)
    with torch.no_grad():
        expected = _fla_layer_reference_forward(layer, x)
        got = module(x)
    torch.testing.assert_close(got, expected, atol=3e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["kda", "gdn_gva"])
def test_state_dict_round_trip_with_fla_layers(name):
    module = _build(name)
    layer = _fla_layer_like(module)
    ours = {n: tuple(p.shape) for n, p in module.state_dict().items()}
    theirs = {n: tuple(p.shape) for n, p in layer.state_dict().items()}
    assert ours == theirs
    layer.load_state_dict(module.state_dict(), strict=True)
    for n, p in layer.state_dict().items():
        torch.testing.assert_close(p, module.state_dict()[n])
    fresh = _build(name)
    fresh.load_state_dict(_fla_layer_like(module).state_dict(), strict=True)
    assert module.A_log._no_weight_decay and module.dt_bias._no_weight_decay


@pytest.mark.parametrize("cls,A_low", [(KimiDeltaAttention, 1.0), (GatedDeltaNet, 0.0)])
def test_gate_parameter_init_ranges_follow_fla(cls, A_low):
    module = cls(hidden_size=64, head_dim=16, num_heads=4, num_v_heads=8, impl="torch")
    A = module.A_log.exp()
    assert A.min() >= A_low and A.max() <= 16.0
    dt = F.softplus(module.dt_bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    expected_dt_size = 8 * 16 if cls is KimiDeltaAttention else 8
    assert module.dt_bias.shape == (expected_dt_size,) and module.A_log.shape == (8,)


def _packed_doc_ids():
    doc_ids = torch.zeros(2, 40, dtype=torch.long)
    doc_ids[0, 13:] = 1
    doc_ids[0, 14:] = 2  # a one-token document
    doc_ids[0, 33:] = 3
    doc_ids[1, 25:] = 1
    return doc_ids


@pytest.mark.parametrize("name", ["kda", "gdn_gva"])
def test_packed_documents_equal_documents_run_alone(name):
    module = _build(name)
    x = torch.randn(2, 40, module.hidden_size)
    doc_ids = _packed_doc_ids()
    layout = DocumentLayout.from_doc_ids(doc_ids)
    with torch.no_grad():
        packed = module(x, layout)
        unpacked = module(x)
        for b in range(2):
            starts = [0] + [t for t in range(1, 40) if doc_ids[b, t] != doc_ids[b, t - 1]] + [40]
            for s, e in zip(starts[:-1], starts[1:]):
                torch.testing.assert_close(packed[b, s:e], module(x[b : b + 1, s:e])[0], atol=1e-6, rtol=1e-5)
    # boundaries matter: without the layout, tokens after a boundary see the previous document
    assert not torch.allclose(packed[0, 13:], unpacked[0, 13:], atol=1e-4)
    torch.testing.assert_close(packed[0, :13], unpacked[0, :13], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["kda", "gdn"])
def test_module_is_causal(name):
    module = _build(name)
    x = torch.randn(2, 50, module.hidden_size)
    t = 21
    x_changed = x.clone()
    x_changed[:, t] += torch.randn(module.hidden_size)
    with torch.no_grad():
        y, y_changed = module(x), module(x_changed)
    torch.testing.assert_close(y_changed[:, :t], y[:, :t], atol=1e-6, rtol=0)
    assert (y_changed[:, t:] - y[:, t:]).abs().amax() > 1e-3


@pytest.mark.parametrize("name", list(MODULE_CASES))
def test_gradients_reach_every_parameter(name):
    module = _build(name)
    x = torch.randn(2, 40, module.hidden_size, requires_grad=True)
    module(x, DocumentLayout.from_doc_ids(_packed_doc_ids())).square().sum().backward()
    for pname, p in module.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname
    assert x.grad.abs().sum() > 0


def test_bfloat16_module_runs_and_tracks_float32():
    module = _build("kda")
    x = torch.randn(2, 40, module.hidden_size)
    with torch.no_grad():
        ref = module(x)
        got = module.to(torch.bfloat16)(x.bfloat16())
    assert got.dtype == torch.bfloat16
    assert _rel_err(got, ref) < 3e-2


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="num_v_heads"):
        KimiDeltaAttention(hidden_size=32, head_dim=8, num_heads=4, num_v_heads=6)
    with pytest.raises(ValueError, match="expand_v"):
        GatedDeltaNet(hidden_size=32, head_dim=8, num_heads=2, expand_v=0.3)
    with pytest.raises(ValueError, match="impl"):
        GatedDeltaNet(hidden_size=32, head_dim=8, num_heads=2, impl="triton")
    with pytest.raises(ValueError, match="chunk_size"):
        KimiDeltaAttention(hidden_size=32, head_dim=8, num_heads=2, chunk_size=0)
    module = _build("kda")
    with pytest.raises(ValueError, match="hidden_size=32"):
        module(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="layout"):
        module(torch.randn(2, 5, 32), DocumentLayout.from_doc_ids(torch.zeros(2, 6, dtype=torch.long)))
    module.impl = "fla"
    with pytest.raises(RuntimeError, match="impl='fla'.*CUDA"):
        module(torch.randn(2, 5, 32))


# --------------------------------------------------------------------------------------------------
# FLOP accounting
def test_forward_flops_hand_count():
    # KDA, D=16, H=2, HV=4, K=V=8, W=4, C=64 (sub-blocks of 16: S=4), one chunk for T=64.
    kda = KimiDeltaAttention(hidden_size=16, head_dim=8, num_heads=2, num_v_heads=4, impl="torch")
    projections = 2 * 16 * 16 + 16 * 32 + (16 * 8 + 8 * 32) + 16 * 4 + (16 * 8 + 8 * 32) + 32 * 16  # q,k v f b g o
    convs = 4 * (16 + 16 + 32)
    per_chunk_head = (
        2 * 10 * 16 * 16 * 8  # A_qk, A_kk: 6 off-diagonal + 4 diagonal 16x16 sub-blocks over K=8
        + 64 * 63 // 2 * (8 + 8)  # unit lower-triangular solve, K+V right-hand sides
        + 3 * 64 * 8 * 8  # W S, (q Gamma) S, k^T delta
        + 64 * 64 * 8  # A_qk delta
    )
    assert projections == 2368 and per_chunk_head == 118272
    assert kda.forward_flops_per_token(64) == 2 * (projections + convs + 4 * per_chunk_head / 64) == 20032
    # T = 100: two chunks (the second partial one computed in full)
    two_chunks = 2 * (projections + convs) + 2 * 4 * 2 * per_chunk_head / 100
    assert kda.forward_flops_per_token(100) == pytest.approx(two_chunks)

    # GDN, D=16, H=HV=2, K=8, V=16 (expand_v=2): scalar gate, dense C x C products.
    gdn = GatedDeltaNet(hidden_size=16, head_dim=8, num_heads=2, impl="torch")
    projections = 2 * 16 * 16 + 16 * 32 + 2 * 16 * 2 + 16 * 32 + 32 * 16  # q,k v a,b g o
    convs = 4 * (16 + 16 + 32)
    per_chunk_head = 2 * 64 * 64 * 8 + 64 * 63 // 2 * (8 + 16) + 3 * 64 * 8 * 16 + 64 * 64 * 16
    assert gdn.forward_flops_per_token(64) == 2 * (projections + convs + 2 * per_chunk_head / 64) == 17488
    assert delta_rule_chunk_macs(64, 8, 16, per_channel_gate=False) == per_chunk_head


@pytest.mark.parametrize("name", ["kda", "gdn_gva"])
def test_forward_flops_match_flop_counter_and_scale_linearly(name):
    module = _build(name, chunk_size=64)
    T = 128
    with FlopCounterMode(display=False) as counter:
        module(torch.randn(1, T, module.hidden_size))
    # FlopCounterMode sees every matmul, bmm and conv, but not the triangular solve.
    K, V, C = module.head_k_dim, module.head_v_dim, 64
    solve = 2 * C * (C - 1) // 2 * (K + V) * module.num_v_heads * (T // C)
    assert module.forward_flops_per_token(T) * T == counter.get_total_flops() + solve
    per_token = [module.forward_flops_per_token(64 * n) for n in (1, 4, 64, 1024)]
    assert per_token == [per_token[0]] * 4  # linear in seq_len: constant per token on whole chunks
    assert module.forward_flops_per_token(65) < 2 * per_token[0]


# --------------------------------------------------------------------------------------------------
def test_cpu_forward_backward_is_fast():
    torch.manual_seed(0)
    x = torch.randn(2, 256, 128)
    for module in (
        KimiDeltaAttention(hidden_size=128, head_dim=32, num_heads=4, impl="torch"),
        GatedDeltaNet(hidden_size=128, head_dim=32, num_heads=4, impl="torch"),
    ):
        timings = []
        for _ in range(3):
            start = time.perf_counter()
            module(x).square().mean().backward()
            timings.append(time.perf_counter() - start)
        assert min(timings) < 1.0, (type(module).__name__, timings)


# --------------------------------------------------------------------------------------------------
# GPU: fla kernels vs the torch path (run by hand on a CUDA machine)
GPU_TOLERANCE = {torch.float32: 1e-2, torch.bfloat16: 5e-2}  # relative L2 error, outputs and gradients


def _gpu_doc_ids(B, T):
    doc_ids = torch.zeros(B, T, dtype=torch.long)
    doc_ids[0, 70:] = 1
    doc_ids[0, 71:] = 2
    doc_ids[0, 200:] = 3
    doc_ids[-1, 129:] = 1
    return doc_ids.cuda()


def _run_impl(module, impl, x, layout, probe):
    module.impl = impl
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = module(x, layout)
    (y.float() * probe).sum().backward()
    return y.detach().float(), x.grad.float(), {n: p.grad.float() for n, p in module.named_parameters()}


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("cls", [KimiDeltaAttention, GatedDeltaNet])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
def test_fla_kernel_path_matches_torch_path_on_cuda(cls, dtype, packed):
    torch.manual_seed(0)
    module = cls(hidden_size=256, head_dim=64, num_heads=2, num_v_heads=4, impl="fla").cuda().to(dtype)
    B, T = 2, 300  # T not a multiple of the chunk size
    x = torch.randn(B, T, 256, device="cuda", dtype=dtype)
    probe = torch.randn(B, T, 256, device="cuda")
    layout = DocumentLayout.from_doc_ids(_gpu_doc_ids(B, T)) if packed else None
    y_fla, dx_fla, grads_fla = _run_impl(module, "fla", x, layout, probe)
    y_ref, dx_ref, grads_ref = _run_impl(module, "torch", x, layout, probe)
    tol = GPU_TOLERANCE[dtype]
    assert _rel_err(y_fla, y_ref) < tol
    assert _rel_err(dx_fla, dx_ref) < tol
    for name in grads_ref:
        assert _rel_err(grads_fla[name], grads_ref[name]) < tol, name


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("cls", [KimiDeltaAttention, GatedDeltaNet])
@pytest.mark.parametrize("packed", [False, True])
def test_fla_decode_kernel_path_matches_torch_path_on_cuda(cls, packed):
    # eval + no grad + T <= 64 takes fla's fused_recurrent kernels
    torch.manual_seed(0)
    module = cls(hidden_size=256, head_dim=64, num_heads=2, num_v_heads=4, impl="fla").cuda().eval()
    x = torch.randn(2, 48, 256, device="cuda")
    doc_ids = torch.zeros(2, 48, dtype=torch.long, device="cuda")
    doc_ids[0, 20:] = 1
    layout = DocumentLayout.from_doc_ids(doc_ids) if packed else None
    with torch.no_grad():
        y_fla = module(x, layout)
        module.impl = "torch"
        y_ref = module(x, layout)
    assert _rel_err(y_fla, y_ref) < GPU_TOLERANCE[torch.float32]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("per_channel", [True, False])
def test_chunk_delta_rule_matches_fla_chunk_kernels_on_cuda(per_channel):
    if per_channel:
        from fla.ops.kda import chunk_kda as kernel
    else:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as kernel
    q, k, v, g, beta, h0 = (
        t.float().cuda() for t in _prepared_inputs(2, 200, 2, 4, 64, 64, per_channel=per_channel, seed=3)
    )
    o_ref, s_ref = kernel(q=q, k=k, v=v, g=g, beta=beta, initial_state=h0, output_final_state=True)
    o, s = chunk_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=64)
    assert _rel_err(o, o_ref) < GPU_TOLERANCE[torch.float32]
    assert _rel_err(s, s_ref) < GPU_TOLERANCE[torch.float32]


@pytest.mark.parametrize("name", ["kda", "gdn"])
def test_fla_chunk_kernel_gets_the_host_copy_of_cu_seqlens(name, monkeypatch):
    """With documents, fla's chunk kernel receives ``cu_seqlens_cpu`` (so it plans chunks without a device sync);
    the kernels are stand-ins recording their arguments, the rest of the fla path runs as on a GPU."""
    from attnres_train.model.packing import DocumentLayout

    module = _build(name).train()
    seen = {}

    def chunk_kernel(**kwargs):
        seen.update(kwargs)
        q, v = kwargs["q"], kwargs["v"]
        return torch.zeros(*q.shape[:2], *v.shape[2:]), None

    monkeypatch.setattr(type(module), "_fla_kernels", lambda self: (chunk_kernel, None))
    for conv in (module.q_conv1d, module.k_conv1d, module.v_conv1d):
        monkeypatch.setattr(conv, "forward", lambda x, cu_seqlens=None, use_fla_kernel=False: x)
    layout = DocumentLayout.from_doc_ids(torch.tensor([[0, 0, 0, 1, 1, 2], [3, 3, 3, 3, 4, 4]]))
    module._mix_fla(torch.randn(2, 6, 32), layout)
    assert seen["cu_seqlens_cpu"].device.type == "cpu"
    assert seen["cu_seqlens_cpu"].tolist() == seen["cu_seqlens"].tolist() == [0, 3, 5, 6, 10, 12]
