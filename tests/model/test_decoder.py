"""The hybrid stack as a whole: layer plan, causality, document isolation, accounting, presets, bad configs."""

from pathlib import Path

import pytest
import torch
import yaml

from attnres_train.model import ModelConfig, ModelConfigError, build_model

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "model"


def preset(name: str) -> dict:
    return yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())


SMALL = dict(
    vocab_size=40,
    hidden_size=32,
    num_layers=4,
    hybrid_ratio=1,
    linear_num_heads=2,
    linear_head_dim=16,
    linear_chunk_size=8,
    mla_num_heads=2,
    mla_kv_lora_rank=16,
    mla_qk_nope_head_dim=16,
    mla_qk_rope_head_dim=8,
    mla_v_head_dim=16,
    gqa_num_heads=2,
    gqa_num_kv_heads=1,
    gqa_head_dim=16,
    gqa_rope_fraction=0.5,
    num_experts=4,
    top_k=2,
    expert_ffn_dim=24,
    ffn_dim=48,
    attnres_block_size=3,
)

STACKS = [
    dict(linear_mixer=lm, full_mixer=fm, residual=res)
    for lm in ("kda", "gdn")
    for fm in ("mla", "gqa")
    for res in ("standard", "full_attnres", "block_attnres")
]


def _build(**overrides):
    torch.manual_seed(0)
    return build_model({**SMALL, **overrides}).double().eval()


def test_kimi_linear_placement_27_layers_3_to_1():
    kinds = ModelConfig(num_layers=27, hybrid_ratio=3).layer_kinds()
    assert [i + 1 for i, k in enumerate(kinds) if k == "F"] == [4, 8, 12, 16, 20, 24, 27]


@pytest.mark.parametrize(
    "num_layers,ratio,expected",
    [(8, 0, "FFFFFFFF"), (8, 1, "LFLFLFLF"), (8, 7, "LLLLLLLF"), (6, 100, "LLLLLF"), (10, 3, "LLLFLLLFLF")],
)
def test_hybrid_ratio_layouts(num_layers, ratio, expected):
    assert "".join(ModelConfig(num_layers=num_layers, hybrid_ratio=ratio).layer_kinds()) == expected


def test_layer_pattern_overrides_ratio():
    model = _build(layer_pattern="FLLF", hybrid_ratio=3)
    assert [spec.mixer for spec in model.specs] == ["mla", "kda", "kda", "mla"]


def test_first_dense_layers():
    model = _build(first_dense_layers=1)
    assert [spec.mlp for spec in model.specs] == ["dense", "moe", "moe", "moe"]


@pytest.mark.parametrize("stack", STACKS, ids=lambda s: "-".join(s.values()))
def test_causality(stack):
    model = _build(**stack)
    ids = torch.randint(0, 40, (2, 20))
    t = 11
    changed = ids.clone()
    changed[:, t] = (changed[:, t] + 1) % 40
    with torch.no_grad():
        a = model(ids).logits
        b = model(changed).logits
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-12)
    assert not torch.allclose(a[:, t:], b[:, t:])


@pytest.mark.parametrize("stack", STACKS[::2], ids=lambda s: "-".join(s.values()))
def test_packed_documents_match_documents_run_alone(stack):
    model = _build(**stack)
    lengths = [7, 12, 5]
    docs = [torch.randint(0, 40, (1, n)) for n in lengths]
    packed = torch.cat(docs, dim=1)
    doc_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    with torch.no_grad():
        packed_logits = model(packed, doc_ids=doc_ids).logits
        alone = torch.cat([model(d).logits for d in docs], dim=1)
    # Some kernels compute in fp32 even for fp64 inputs; a leak across documents would be O(1e-1).
    torch.testing.assert_close(packed_logits, alone, rtol=1e-5, atol=1e-6)


def test_forward_returns_aux_loss_when_enabled():
    model = _build(moe_aux_loss_coef=0.01).train()
    out = model(torch.randint(0, 40, (2, 16)))
    assert out.aux_loss.ndim == 0 and out.aux_loss.item() > 0
    disabled = _build(moe_aux_loss_coef=0.0).train()
    assert disabled(torch.randint(0, 40, (2, 16))).aux_loss.item() == 0


def test_flops_are_linear_for_linear_attention_and_grow_for_full():
    linear_only = _build(layer_pattern="LLLL")
    full_only = _build(layer_pattern="FFFF")
    lin = [linear_only.flops_per_token(t) for t in (1024, 2048, 4096)]
    full = [full_only.flops_per_token(t) for t in (1024, 2048, 4096)]
    assert abs((lin[2] - lin[1]) - (lin[1] - lin[0])) < 1e-6 * lin[0] + 1  # constant per token
    assert lin[2] == pytest.approx(lin[0], rel=1e-9)
    assert full[2] - full[1] == pytest.approx(2 * (full[1] - full[0]), rel=1e-9)  # (T+1)/2 keys per token


def test_flops_count_active_experts_only():
    model = _build(num_experts=4, top_k=1)
    more_experts = _build(num_experts=16, top_k=1)
    # Same active work except for the router (2 * D * E per token per MoE layer)
    num_moe = len(model.moe_layers())
    router_delta = 3 * 2 * 32 * (16 - 4) * num_moe
    assert more_experts.flops_per_token(64) - model.flops_per_token(64) == pytest.approx(router_delta)


def test_active_parameters():
    model = _build(num_experts=8, top_k=2)
    per_expert = 3 * 32 * 24
    inactive_experts = len(model.moe_layers()) * (8 - 2) * per_expert
    unread_embedding_rows = (40 - 1) * 32
    assert model.num_parameters() - model.num_active_parameters() == inactive_experts + unread_embedding_rows
    tied = _build(num_experts=8, top_k=2, tie_embeddings=True)
    assert tied.num_parameters() - tied.num_active_parameters() == inactive_experts


def _kimi_48b_hand_count() -> tuple[int, int]:
    """Published Kimi-Linear-48B-A3B shape, counted by hand from its config."""
    D, V, F_dense, F_exp, E, K = 2304, 163840, 9216, 1024, 256, 8
    kda = 4 * D * 4096 + 2 * (D * 128 + 128 * 4096) + D * 32 + 3 * 4096 * 4 + 32 + 4096 + 128
    mla = D * 32 * 192 + D * (512 + 64) + 512 + 512 * 32 * 256 + 32 * 128 * D
    norms_and_queries = 27 * 2 * D + 27 * 2 * 2 * D + 2 * D + D  # pre-norms, AttnRes q + key norm, final
    expert = 3 * D * F_exp
    moe_total = 26 * (D * E + E * expert + expert)
    moe_active = 26 * (D * E + K * expert + expert)
    shared = 20 * kda + 7 * mla + 3 * D * F_dense + norms_and_queries
    total = 2 * V * D + shared + moe_total
    active = V * D + D + shared + moe_active  # head fully, one embedding row
    return total, active


def test_kimi_linear_48b_shape_counts():
    model = build_model(preset("kimi_linear_48b_a3b"), device="meta")
    total, active = model.num_parameters(), model.num_active_parameters()
    assert (total, active) == _kimi_48b_hand_count()
    assert abs(total / 48e9 - 1) < 0.03, total
    # "A3B" is a rounded figure: 3.11B counting the LM head and one embedding row, 2.73B without embeddings.
    assert 2.7e9 < model.num_active_parameters() < 3.2e9
    assert 2.7e9 < model.num_active_parameters() - model.lm_head.weight.numel() + 2304 < 3.0e9
    assert "".join("F" if s.is_full_attention else "L" for s in model.specs) == "LLLF" * 6 + "LLF"


def test_qwen3_next_80b_shape_counts():
    model = build_model(preset("qwen3_next_80b_a3b"), device="meta")
    total, active = model.num_parameters(), model.num_active_parameters()
    assert abs(total / 80e9 - 1) < 0.03, total
    assert 3.0e9 < active < 3.7e9, active
    assert [i for i, s in enumerate(model.specs) if s.is_full_attention][:3] == [3, 7, 11]


@pytest.mark.parametrize("name", ["tiny", "small", "kimi_linear_1b"])
def test_presets_build(name):
    cfg = ModelConfig.from_mapping(preset(name))
    model = build_model(cfg, device="meta")
    assert model.num_parameters() > 0


def test_tiny_forward_is_fast():
    import time

    model = build_model(preset("tiny"))
    ids = torch.randint(0, 258, (2, 128))
    model(ids)  # warm-up
    start = time.perf_counter()
    with torch.no_grad():
        model(ids)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(hybrid_ratio=-1), "model.hybrid_ratio"),
        (dict(linear_mixer="mamba"), "model.linear_mixer"),
        (dict(full_mixer="mha"), "model.full_mixer"),
        (dict(residual="highway"), "model.residual"),
        (dict(attnres_block_size=9), "model.attnres_block_size"),
        (dict(linear_head_dim=None, linear_num_heads=3), "model.linear_num_heads"),
        (dict(full_mixer="gqa", gqa_head_dim=None, gqa_num_heads=5), "model.gqa_num_heads"),
        (dict(full_mixer="gqa", gqa_num_kv_heads=3, gqa_num_heads=4), "model.gqa_num_kv_heads"),
        (dict(top_k=5, num_experts=4), "model.top_k"),
        (dict(layer_pattern="LLX"), "model.layer_pattern"),
        (dict(hidden_sise=3), "model.hidden_sise"),
    ],
)
def test_bad_configs_name_the_field(overrides, field):
    with pytest.raises(ModelConfigError, match=field.replace(".", r"\.")):
        build_model({**SMALL, **overrides})


@pytest.mark.gpu
@pytest.mark.parametrize("linear_mixer", ["kda", "gdn"])
def test_cuda_kernel_path_matches_torch_path_whole_model(linear_mixer):
    """The whole stack on CUDA in bf16: fla kernels (auto) vs the pure-torch path on the same weights, with
    packed documents. Tolerance: relative L2 error of the logits and of the gradients below 3e-2 (bf16)."""
    cfg = {**preset("tiny"), "linear_mixer": linear_mixer, "linear_chunk_size": 64}
    torch.manual_seed(0)
    kernel = build_model(cfg).cuda().bfloat16()
    reference = build_model({**cfg, "linear_attention_impl": "torch", "attention_impl": "sdpa"}).cuda().bfloat16()
    reference.load_state_dict(kernel.state_dict())
    ids = torch.randint(0, 258, (2, 512), device="cuda")
    doc_ids = (torch.arange(512, device="cuda") >= 200).long().expand(2, -1).contiguous()

    def run(model):
        out = model(ids, doc_ids=doc_ids)
        out.logits.float().pow(2).mean().backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
        return out.logits.float(), grads

    logits_k, grads_k = run(kernel)
    logits_r, grads_r = run(reference)
    assert ((logits_k - logits_r).norm() / logits_r.norm()).item() < 3e-2
    assert ((grads_k - grads_r).norm() / grads_r.norm()).item() < 3e-2
