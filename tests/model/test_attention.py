"""Full-attention mixers: the causal attention backend, RoPE, MLA and gated GQA.

References are independent of the code under test: an explicit float64 masked softmax, a complex-number
RoPE, transformers' KimiLinear / DeepSeek-V3 / Qwen3-Next attention modules, and torch's FLOP counter.

Shape legend: B batch, T tokens per row, H query heads, G key/value heads, K qk head dim, V value head dim.
"""

from __future__ import annotations

import math

import pytest
import torch

from attnres_train.model.mixers import attention_backend
from attnres_train.model.mixers.attention import GatedGroupedQueryAttention, MultiheadLatentAttention
from attnres_train.model.mixers.attention_backend import causal_attention
from attnres_train.model.mixers.rope import RotaryEmbedding, apply_rotary, rotary_cos_sin
from attnres_train.model.packing import DocumentLayout

F64 = torch.float64

# Two packed rows: documents of lengths [3, 1, 5] and [6, 3] (a length-1 document included).
DOC_IDS = torch.tensor([[0, 0, 0, 1, 2, 2, 2, 2, 2], [7, 7, 7, 7, 7, 7, 3, 3, 3]])


def doc_spans(doc_ids_BT: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, start, end) of every document, from the doc ids (independent of DocumentLayout)."""
    spans = []
    for b, row in enumerate(doc_ids_BT.tolist()):
        start = 0
        for t in range(1, len(row) + 1):
            if t == len(row) or row[t] != row[t - 1]:
                spans.append((b, start, t))
                start = t
    return spans


def reference_attention(q_BTHK, k_BTGK, v_BTGV, doc_ids_BT, scale):
    """Slow explicit masked softmax in float64: query head h reads kv head h // (H // G)."""
    B, T, H, _ = q_BTHK.shape
    G = k_BTGK.shape[2]
    group = H // G
    q, k, v = q_BTHK.to(F64), k_BTGK.to(F64), v_BTGV.to(F64)
    if doc_ids_BT is None:
        doc_ids_BT = torch.zeros(B, T, dtype=torch.long)
    out = torch.zeros(B, T, H, v.shape[-1], dtype=F64)
    for b in range(B):
        for h in range(H):
            g = h // group
            scores = (q[b, :, h] @ k[b, :, g].T) * scale  # [T, T]
            pos = torch.arange(T)
            allowed = (pos[None, :] <= pos[:, None]) & (doc_ids_BT[b][None, :] == doc_ids_BT[b][:, None])
            scores = scores.masked_fill(~allowed, float("-inf"))
            out[b, :, h] = torch.softmax(scores, dim=-1) @ v[b, :, g]
    return out


def random_qkv(B, T, H, G, K, V, dtype=F64, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen, dtype=F64)
    k = torch.randn(B, T, G, K, generator=gen, dtype=F64)
    v = torch.randn(B, T, G, V, generator=gen, dtype=F64)
    return (t.to(device=device, dtype=dtype) for t in (q, k, v))


# ---------------------------------------------------------------------------------------------------------
# Backend
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("native_gqa", [False, True], ids=["repeat_kv", "enable_gqa"])
@pytest.mark.parametrize("use_layout", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("heads,kv_heads,K,V", [(4, 4, 8, 8), (4, 2, 8, 6), (6, 2, 6, 10), (4, 1, 8, 8)])
def test_sdpa_matches_explicit_reference(monkeypatch, native_gqa, use_layout, heads, kv_heads, K, V):
    monkeypatch.setattr(attention_backend, "_sdpa_native_gqa", lambda *a: native_gqa)
    B, T = DOC_IDS.shape
    q, k, v = random_qkv(B, T, heads, kv_heads, K, V)
    layout = DocumentLayout.from_doc_ids(DOC_IDS) if use_layout else None
    scale = 0.7 / math.sqrt(K)
    out = causal_attention(q, k, v, layout, scale, impl="sdpa")
    ref = reference_attention(q, k, v, DOC_IDS if use_layout else None, scale)
    assert out.shape == (B, T, heads, V) and out.dtype == F64
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


def test_sdpa_packed_equals_each_document_alone():
    B, T = DOC_IDS.shape
    q, k, v = random_qkv(B, T, 4, 2, 8, 6, seed=1)
    packed = causal_attention(q, k, v, DocumentLayout.from_doc_ids(DOC_IDS), 0.3, impl="sdpa")
    for b, start, end in doc_spans(DOC_IDS):
        alone = causal_attention(
            q[b : b + 1, start:end], k[b : b + 1, start:end], v[b : b + 1, start:end], None, 0.3, impl="sdpa"
        )
        torch.testing.assert_close(packed[b : b + 1, start:end], alone, atol=1e-12, rtol=1e-12)


def test_gqa_query_heads_read_consecutive_kv_groups():
    # Query heads 0,1 must read kv head 0 and heads 2,3 kv head 1 (not the interleaved h % G assignment).
    q, k, v = random_qkv(1, 7, 4, 2, 8, 5, seed=2)
    out = causal_attention(q, k, v, None, 0.5, impl="sdpa")
    for h in range(4):
        single = causal_attention(q[:, :, h : h + 1], k[:, :, h // 2 : h // 2 + 1], v[:, :, h // 2 : h // 2 + 1],
                                  None, 0.5, impl="sdpa")
        torch.testing.assert_close(out[:, :, h : h + 1], single, atol=1e-12, rtol=1e-12)
    wrong = causal_attention(q[:, :, 1:2], k[:, :, 1:2], v[:, :, 1:2], None, 0.5, impl="sdpa")
    assert not torch.allclose(out[:, :, 1:2], wrong)


def test_single_document_layout_equals_no_layout():
    q, k, v = random_qkv(2, 6, 2, 2, 4, 4, seed=3)
    layout = DocumentLayout.from_doc_ids(torch.zeros(2, 6, dtype=torch.long))
    expected = causal_attention(q, k, v, None, 0.5, "sdpa")
    torch.testing.assert_close(causal_attention(q, k, v, layout, 0.5, "sdpa"), expected)


def test_auto_falls_back_to_sdpa_on_cpu():
    q, k, v = random_qkv(1, 5, 2, 1, 4, 3, dtype=torch.float32, seed=4)
    expected = causal_attention(q, k, v, None, 0.5, "sdpa")
    torch.testing.assert_close(causal_attention(q, k, v, None, 0.5, "auto"), expected)


def test_backend_rejects_bad_inputs():
    q, k, v = random_qkv(1, 5, 4, 2, 8, 6)
    with pytest.raises(ValueError, match="impl"):
        causal_attention(q, k, v, None, 0.5, impl="xformers")
    with pytest.raises(RuntimeError, match="'flash' cannot run: flash-attn needs CUDA"):
        causal_attention(q, k, v, None, 0.5, impl="flash")
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        causal_attention(q[:, :, :3], k, v, None, 0.5)
    with pytest.raises(ValueError, match="same head dim"):
        causal_attention(q[..., :4], k, v, None, 0.5)
    with pytest.raises(ValueError, match="k and v must have the same number of heads"):
        causal_attention(q, k, v[:, :, :1], None, 0.5)
    with pytest.raises(ValueError, match="scale"):
        causal_attention(q, k, v, None, 0.0)
    with pytest.raises(ValueError, match="layout covers"):
        causal_attention(q, k, v, DocumentLayout.from_doc_ids(DOC_IDS), 0.5)


# ---------------------------------------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------------------------------------
def complex_rope_reference(x_BTHD, positions_BT, rotary_dim, theta):
    """Pair dim i with dim i + R/2 as a complex number and multiply by exp(i * pos * theta^(-2i/R))."""
    half = rotary_dim // 2
    x = x_BTHD.to(F64)
    z = torch.complex(x[..., :half], x[..., half:rotary_dim])
    freqs = theta ** (-torch.arange(half, dtype=F64) * 2 / rotary_dim)
    angle = positions_BT.to(F64)[..., None, None] * freqs  # [B, T, 1, R/2]
    z = z * torch.exp(1j * angle)
    return torch.cat((z.real, z.imag, x[..., rotary_dim:]), dim=-1)


@pytest.mark.parametrize("head_dim,rotary_dim", [(8, 8), (12, 4), (10, 0)])
def test_rope_matches_complex_reference_and_keeps_pass_through_dims(head_dim, rotary_dim):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 3, head_dim, generator=gen)
    positions = torch.tensor([[0, 1, 2, 0, 1, 2], [5, 17, 100, 1000, 3, 4]])
    out = RotaryEmbedding(rotary_dim, theta=500.0)(x, positions)
    assert out.dtype == x.dtype
    expected = complex_rope_reference(x, positions, rotary_dim, 500.0)
    torch.testing.assert_close(out.to(F64), expected, atol=1e-4, rtol=0)  # fp32 angles of up to 1000 rad
    assert torch.equal(out[..., rotary_dim:], x[..., rotary_dim:])  # untouched bit for bit
    if rotary_dim:
        assert torch.equal(out[0, [0, 3]], x[0, [0, 3]])  # position 0 is the identity
        assert not torch.allclose(out[1, 1:, :, :rotary_dim], x[1, 1:, :, :rotary_dim])


def test_rope_scores_depend_only_on_relative_position():
    gen = torch.Generator().manual_seed(6)
    rope = RotaryEmbedding(rotary_dim=6, theta=10000.0)
    q = torch.randn(1, 1, 1, 10, generator=gen, dtype=F64)
    k = torch.randn(1, 1, 1, 10, generator=gen, dtype=F64)

    def score(p, s):
        qp = rope(q, torch.tensor([[p]]))
        ks = rope(k, torch.tensor([[s]]))
        return float((qp * ks).sum())

    assert score(7, 3) == pytest.approx(score(107, 103), abs=1e-5)
    assert score(3, 7) == pytest.approx(score(1003, 1007), abs=1e-4)
    assert score(0, 0) == pytest.approx(float((q * k).sum()), abs=1e-12)
    assert abs(score(7, 3) - score(7, 4)) > 1e-3  # and does depend on the offset


def test_rope_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rotary_dim"):
        RotaryEmbedding(3)
    with pytest.raises(ValueError, match="exceeds the head dim"):
        cos, sin = rotary_cos_sin(torch.zeros(1, 2, dtype=torch.long), 8, 10000.0)
        apply_rotary(torch.zeros(1, 2, 1, 4), cos, sin)
    with pytest.raises(ValueError, match="position_ids"):
        RotaryEmbedding(4)(torch.zeros(1, 3, 1, 4), torch.zeros(1, 2, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------
HIDDEN = 24

MODULE_CONFIGS = {
    "mla_nope": lambda: MultiheadLatentAttention(HIDDEN, 3, kv_lora_rank=10, qk_nope_head_dim=6, v_head_dim=5,
                                                 attention_impl="sdpa"),
    "mla_rope_qlora": lambda: MultiheadLatentAttention(HIDDEN, 2, kv_lora_rank=8, qk_nope_head_dim=4,
                                                       qk_rope_head_dim=4, v_head_dim=6, q_lora_rank=12,
                                                       rope_theta=100.0, attention_impl="sdpa"),
    "gqa": lambda: GatedGroupedQueryAttention(HIDDEN, num_heads=4, num_kv_heads=2, head_dim=8, rope_fraction=0.5,
                                              rope_theta=100.0, attention_impl="sdpa"),
}


def make_module(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    module = MODULE_CONFIGS[name]().to(F64)
    with torch.no_grad():  # non-trivial norm weights, so a wrong norm placement shows up
        for p_name, p in module.named_parameters():
            if "norm" in p_name:
                p.uniform_(0.5, 1.5)
    return module


def random_x(B, T, seed=0):
    return torch.randn(B, T, HIDDEN, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("name", list(MODULE_CONFIGS))
def test_module_is_causal(name):
    module = make_module(name)
    x = random_x(2, 9)
    y = module(x)
    t = 5
    x2 = x.clone()
    x2[:, t] += torch.randn(2, HIDDEN, dtype=F64)
    y2 = module(x2)
    torch.testing.assert_close(y2[:, :t], y[:, :t], atol=1e-12, rtol=1e-12)
    assert (y2[:, t:] - y[:, t:]).abs().amax(dim=-1).min() > 1e-6  # every later token sees the change


@pytest.mark.parametrize("name", list(MODULE_CONFIGS))
def test_module_packed_row_equals_documents_alone(name):
    module = make_module(name)
    B, T = DOC_IDS.shape
    x = random_x(B, T, seed=1)
    packed = module(x, DocumentLayout.from_doc_ids(DOC_IDS))
    for b, start, end in doc_spans(DOC_IDS):
        alone = module(x[b : b + 1, start:end])
        torch.testing.assert_close(packed[b : b + 1, start:end], alone, atol=1e-12, rtol=1e-12)
    # Without the layout the second document of a row does see the first one.
    assert not torch.allclose(module(x)[0, 3:], packed[0, 3:])


@pytest.mark.parametrize("name,order_matters", [("mla_nope", False), ("mla_rope_qlora", True), ("gqa", True)])
def test_nope_sees_its_prefix_as_a_set(name, order_matters):
    # Without positional encoding the last token's output depends on which tokens precede it, not their order.
    module = make_module(name)
    x = random_x(1, 8, seed=2)
    perm = torch.cat((torch.randperm(7, generator=torch.Generator().manual_seed(0)), torch.tensor([7])))
    y, y_perm = module(x)[:, -1], module(x[:, perm])[:, -1]
    assert torch.allclose(y, y_perm, atol=1e-12) != order_matters


@pytest.mark.parametrize("name", list(MODULE_CONFIGS))
def test_gradients_reach_every_parameter(name):
    module = make_module(name)
    x = random_x(2, 9, seed=3).requires_grad_(True)
    (module(x, DocumentLayout.from_doc_ids(DOC_IDS)) ** 2).sum().backward()
    for p_name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, p_name
    assert x.grad.abs().sum() > 0


def test_parameter_names_and_counts():
    D = HIDDEN
    mla = make_module("mla_nope")  # H=3, C=10, n=6, R=0, V=5, full-rank q
    assert {n for n, _ in mla.named_parameters()} == {
        "q_proj.weight", "kv_a_proj_with_mqa.weight", "kv_a_layernorm.weight", "kv_b_proj.weight", "o_proj.weight"}
    assert sum(p.numel() for p in mla.parameters()) == D * 3 * 6 + D * 10 + 10 + 10 * 3 * 11 + 3 * 5 * D

    mla_q = make_module("mla_rope_qlora")  # H=2, C=8, n=4, R=4, V=6, Q=12
    assert {n for n, _ in mla_q.named_parameters()} == {
        "q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight", "kv_a_proj_with_mqa.weight",
        "kv_a_layernorm.weight", "kv_b_proj.weight", "o_proj.weight"}
    assert mla_q.kv_a_proj_with_mqa.weight.shape == (8 + 4, D)
    expected = D * 12 + 12 + 12 * 2 * 8 + D * 12 + 8 + 8 * 2 * 10 + 2 * 6 * D
    assert sum(p.numel() for p in mla_q.parameters()) == expected

    gqa = make_module("gqa")  # H=4, G=2, K=8
    assert {n for n, _ in gqa.named_parameters()} == {
        "q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "q_norm.weight", "k_norm.weight"}
    assert sum(p.numel() for p in gqa.parameters()) == D * 64 + D * 16 + D * 16 + 32 * D + 8 + 8


def test_flops_hand_count():
    mla = make_module("mla_nope")  # D=24 H=3 C=10 n=6 R=0 V=5
    # q 2*24*18=864, kv_a 2*24*10=480, kv_b 2*10*33=660, o 2*15*24=720; attention (7+1)/2*(2*3*6+2*3*5)=264
    assert mla.forward_flops_per_token(7) == 864 + 480 + 660 + 720 + 264
    mla_q = make_module("mla_rope_qlora")  # D=24 H=2 C=8 n=4 R=4 V=6 Q=12
    # q_a 576 + q_b 2*12*16=384, kv_a 2*24*12=576, kv_b 2*8*20=320, o 2*12*24=576; attention 2*(32+24)=112
    assert mla_q.forward_flops_per_token(3) == 576 + 384 + 576 + 320 + 576 + 112
    gqa = make_module("gqa")  # D=24 H=4 G=2 K=8
    # q 2*24*64=3072, k 768, v 768, o 2*32*24=1536; attention (4+1)/2*(64+64)=320
    assert gqa.forward_flops_per_token(4) == 3072 + 768 + 768 + 1536 + 320


def _full_einsum_attention(q_BTHK, k_BTGK, v_BTGV, layout, scale, impl):
    # Non-causal scores over all T x T pairs, as explicit matmuls the FLOP counter sees.
    group = q_BTHK.shape[2] // k_BTGK.shape[2]
    k = k_BTGK.repeat_interleave(group, dim=2)
    v = v_BTGV.repeat_interleave(group, dim=2)
    probs = torch.softmax(torch.einsum("bthk,bshk->bhts", q_BTHK, k) * scale, dim=-1)
    return torch.einsum("bhts,bshv->bthv", probs, v)


def _no_attention(q_BTHK, k_BTGK, v_BTGV, layout, scale, impl):
    return v_BTGV.new_zeros(*q_BTHK.shape[:3], v_BTGV.shape[-1])


@pytest.mark.parametrize("name", list(MODULE_CONFIGS))
def test_flops_match_torch_flop_counter(monkeypatch, name):
    # torch counts the matmuls actually run. Run once with the attention replaced by nothing (projections
    # only) and once by a full T x T einsum attention; the difference, scaled from T to the causal (T+1)/2
    # keys per token, is the attention term.
    from torch.utils.flop_counter import FlopCounterMode

    from attnres_train.model.mixers import attention as attention_module

    module = make_module(name)
    B, T = 2, 6
    counts = {}
    for label, fn in (("projections", _no_attention), ("full", _full_einsum_attention)):
        monkeypatch.setattr(attention_module, "causal_attention", fn)
        with FlopCounterMode(display=False) as counter:
            module(random_x(B, T))
        counts[label] = counter.get_total_flops() / (B * T)
    attention_full = counts["full"] - counts["projections"]
    assert attention_full > 0
    expected = counts["projections"] + attention_full * (T + 1) / (2 * T)
    assert module.forward_flops_per_token(T) == pytest.approx(expected, rel=1e-12)


def test_modules_reject_bad_arguments():
    with pytest.raises(ValueError, match="qk_rope_head_dim"):
        MultiheadLatentAttention(HIDDEN, 2, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=3, v_head_dim=4)
    with pytest.raises(ValueError, match="q_lora_rank"):
        MultiheadLatentAttention(HIDDEN, 2, kv_lora_rank=8, qk_nope_head_dim=4, v_head_dim=4, q_lora_rank=0)
    with pytest.raises(ValueError, match="attention_impl"):
        MultiheadLatentAttention(HIDDEN, 2, kv_lora_rank=8, qk_nope_head_dim=4, v_head_dim=4, attention_impl="x")
    with pytest.raises(ValueError, match="num_kv_heads"):
        GatedGroupedQueryAttention(HIDDEN, num_heads=4, num_kv_heads=3, head_dim=8)
    with pytest.raises(ValueError, match="rope_fraction"):
        GatedGroupedQueryAttention(HIDDEN, num_heads=4, num_kv_heads=2, head_dim=8, rope_fraction=0.3)
    with pytest.raises(ValueError, match="hidden_size=24"):
        make_module("gqa")(torch.zeros(1, 3, 16, dtype=F64))
    with pytest.raises(ValueError, match="layout covers"):
        make_module("mla_nope")(random_x(2, 5), DocumentLayout.from_doc_ids(DOC_IDS))


# ---------------------------------------------------------------------------------------------------------
# Parity with transformers' reference modules (CPU, eager attention, float64)
# ---------------------------------------------------------------------------------------------------------
def _causal_additive_mask(T: int) -> torch.Tensor:
    return torch.full((T, T), torch.finfo(F64).min, dtype=F64).triu(1)[None, None]


def _import_reference(module_path: str, *names: str):
    transformers = pytest.importorskip("transformers")
    try:
        module = __import__(module_path, fromlist=list(names))
        return [getattr(module, n) for n in names]
    except Exception as err:  # e.g. fla kernels picked up by transformers and unusable on this machine
        pytest.skip(f"transformers {transformers.__version__} reference {module_path} unusable here: {err!r}")


def _load(reference: torch.nn.Module, ours: torch.nn.Module, transform=lambda name, t: t) -> None:
    theirs = reference.state_dict()
    mine = ours.state_dict()
    assert set(theirs) == set(mine), (sorted(theirs), sorted(mine))
    reference.load_state_dict({name: transform(name, t) for name, t in mine.items()})


@pytest.mark.parametrize("q_lora_rank,qk_rope_head_dim", [(None, 0), (12, 0), (None, 4)])
def test_mla_matches_transformers_kimi_linear(q_lora_rank, qk_rope_head_dim):
    (KimiLinearConfig,) = _import_reference(
        "transformers.models.kimi_linear.configuration_kimi_linear", "KimiLinearConfig")
    (KimiLinearAttention,) = _import_reference(
        "transformers.models.kimi_linear.modeling_kimi_linear", "KimiLinearAttention")
    config = KimiLinearConfig(hidden_size=HIDDEN, num_attention_heads=3, num_key_value_heads=3, kv_lora_rank=10,
                              qk_nope_head_dim=6, qk_rope_head_dim=qk_rope_head_dim, v_head_dim=5,
                              q_lora_rank=q_lora_rank, attention_bias=False)
    config._attn_implementation = "eager"
    reference = KimiLinearAttention(config, layer_idx=0).to(F64).eval()
    torch.manual_seed(0)
    # Kimi Linear never rotates its rope dims: with qk_rope_head_dim > 0 that is our use_rope=False.
    ours = MultiheadLatentAttention(
        HIDDEN, 3, kv_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=qk_rope_head_dim, v_head_dim=5,
        q_lora_rank=q_lora_rank, use_rope=False, attention_impl="sdpa",
    ).to(F64)
    with torch.no_grad():
        for p_name, p in ours.named_parameters():
            if "norm" in p_name:
                p.uniform_(0.5, 1.5)
    _load(reference, ours)
    x = random_x(2, 7, seed=4)
    expected, _ = reference(x, attention_mask=_causal_additive_mask(7))
    # Both RMSNorms normalise in fp32 even for float64 inputs and apply the weight on different sides of the
    # cast back, so agreement is to fp32 rounding, not float64.
    torch.testing.assert_close(ours(x), expected, atol=1e-6, rtol=1e-6)


def test_mla_rope_matches_transformers_deepseek_v3():
    (DeepseekV3Config,) = _import_reference(
        "transformers.models.deepseek_v3.configuration_deepseek_v3", "DeepseekV3Config")
    DeepseekV3Attention, DeepseekV3RotaryEmbedding = _import_reference(
        "transformers.models.deepseek_v3.modeling_deepseek_v3", "DeepseekV3Attention", "DeepseekV3RotaryEmbedding")
    config = DeepseekV3Config(hidden_size=HIDDEN, num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=8,
                              qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=6, q_lora_rank=12,
                              rope_interleave=False, attention_bias=False, rope_theta=100.0)
    config._attn_implementation = "eager"
    assert config.rope_parameters["rope_theta"] == 100.0 and config.rope_parameters["rope_type"] == "default"
    reference = DeepseekV3Attention(config, layer_idx=0).to(F64).eval()
    ours = make_module("mla_rope_qlora")
    _load(reference, ours)
    x = random_x(2, 7, seed=5)
    positions = torch.arange(7).expand(2, 7)
    cos, sin = DeepseekV3RotaryEmbedding(config)(x, positions)
    expected, _ = reference(x, position_embeddings=(cos, sin), attention_mask=_causal_additive_mask(7))
    torch.testing.assert_close(ours(x), expected, atol=1e-6, rtol=1e-6)  # RoPE angles are fp32 on both sides


def test_gated_gqa_matches_transformers_qwen3_next():
    (Qwen3NextConfig,) = _import_reference("transformers.models.qwen3_next.configuration_qwen3_next", "Qwen3NextConfig")
    Qwen3NextAttention, Qwen3NextRotaryEmbedding = _import_reference(
        "transformers.models.qwen3_next.modeling_qwen3_next", "Qwen3NextAttention", "Qwen3NextRotaryEmbedding")
    config = Qwen3NextConfig(hidden_size=HIDDEN, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                             partial_rotary_factor=0.5, rope_theta=100.0, rms_norm_eps=1e-6, attention_bias=False)
    config._attn_implementation = "eager"
    assert config.rope_parameters["partial_rotary_factor"] == 0.5 and config.rope_parameters["rope_theta"] == 100.0
    reference = Qwen3NextAttention(config, layer_idx=3).to(F64).eval()
    ours = make_module("gqa")
    # Qwen3-Next's norms compute x_hat * (1 + w); ours x_hat * w.
    _load(reference, ours, transform=lambda name, t: t - 1 if "norm" in name else t)
    x = random_x(2, 7, seed=6)
    cos, sin = Qwen3NextRotaryEmbedding(config)(x, torch.arange(7).expand(2, 7))
    expected, _ = reference(x, position_embeddings=(cos, sin), attention_mask=_causal_additive_mask(7))
    torch.testing.assert_close(ours(x), expected, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# GPU: flash-attn vs SDPA in bf16
# ---------------------------------------------------------------------------------------------------------
# Tolerance: both bf16 paths are compared with an fp32 reference computed from the same bf16 inputs; each
# must be within BF16_ATOL (outputs are averages of unit-normal values, |o| < ~3; bf16 keeps 8 bits, so one
# rounding of the output alone is ~1e-2 at the top of that range), and flash within 2x SDPA's own error + 3e-3.
BF16_ATOL = 3e-2


def _skip_without_flash_attn():
    if not attention_backend.flash_attn_available():
        pytest.skip("flash_attn is not installed")


@pytest.mark.parametrize("use_layout", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("heads,kv_heads,K,V", [(8, 8, 64, 64), (8, 2, 128, 128), (4, 4, 192, 128), (4, 2, 24, 16)])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_flash_matches_sdpa_bf16(use_layout, heads, kv_heads, K, V):
    _skip_without_flash_attn()
    B, T = 2, 512
    q, k, v = random_qkv(B, T, heads, kv_heads, K, V, dtype=torch.bfloat16, seed=7, device="cuda")
    layout = None
    if use_layout:
        gen = torch.Generator().manual_seed(0)
        starts = (torch.rand(B, T, generator=gen) < 0.02).long()
        starts[:, 0] = 0
        layout = DocumentLayout.from_doc_ids(torch.cumsum(starts, dim=1).cuda())
        assert layout.num_documents > B
    scale = K**-0.5
    for t in (q, k, v):
        t.requires_grad_(True)
    flash = causal_attention(q, k, v, layout, scale, impl="flash")
    flash_grads = torch.autograd.grad(flash.float().square().sum(), (q, k, v))
    sdpa = causal_attention(q, k, v, layout, scale, impl="sdpa")
    sdpa_grads = torch.autograd.grad(sdpa.float().square().sum(), (q, k, v))
    reference = causal_attention(q.float(), k.float(), v.float(), layout, scale, impl="sdpa")
    assert flash.shape == (B, T, heads, V) and flash.dtype == torch.bfloat16
    flash_err = (flash.float() - reference).abs().max().item()
    sdpa_err = (sdpa.float() - reference).abs().max().item()
    assert sdpa_err < BF16_ATOL and flash_err < BF16_ATOL, (flash_err, sdpa_err)
    assert flash_err <= 2 * sdpa_err + 3e-3, (flash_err, sdpa_err)
    for name, gf, gs in zip("qkv", flash_grads, sdpa_grads):
        rel = ((gf.float() - gs.float()).abs().max() / gs.float().abs().max()).item()
        assert rel < 5e-2, (name, rel)


@pytest.mark.parametrize("name", ["mla", "gqa"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_modules_flash_matches_sdpa_bf16(name):
    _skip_without_flash_attn()
    torch.manual_seed(0)
    if name == "mla":  # Kimi-Linear-like head dims: qk 128 + 64, v 128 (v padded for flash-attn)
        module = MultiheadLatentAttention(256, 4, kv_lora_rank=64, qk_nope_head_dim=128, qk_rope_head_dim=64,
                                          v_head_dim=128)
    else:
        module = GatedGroupedQueryAttention(256, num_heads=4, num_kv_heads=2, head_dim=128)
    module = module.cuda().to(torch.bfloat16)
    x = torch.randn(2, 256, 256, device="cuda", dtype=torch.bfloat16)
    doc_ids = torch.zeros(2, 256, dtype=torch.long)
    doc_ids[:, 100:] = 1
    doc_ids[1, 200:] = 2
    layout = DocumentLayout.from_doc_ids(doc_ids.cuda())
    for lay in (None, layout):
        module.attention_impl = "flash"
        y_flash = module(x, lay).float()
        module.attention_impl = "sdpa"
        y_sdpa = module(x, lay).float()
        rel = ((y_flash - y_sdpa).abs().max() / y_sdpa.abs().max()).item()
        assert rel < 3e-2, rel
