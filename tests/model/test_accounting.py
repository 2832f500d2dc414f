"""Inference cache bytes per sequence, against counts done by hand from the layer shapes."""

from __future__ import annotations

import pytest

from attnres_train.model.accounting import inference_cache_bytes
from attnres_train.model.config import ModelConfig


def test_kda_mla_hybrid_matches_a_hand_count():
    # 4 layers at ratio 3: L L L F. KDA: 2 heads x 32 dims, conv 4. MLA: latent 32 + rope 8.
    cfg = ModelConfig(num_layers=4, hybrid_ratio=3, hidden_size=64, linear_num_heads=2, linear_head_dim=32,
                      linear_conv_size=4, full_mixer="mla", mla_kv_lora_rank=32, mla_qk_rope_head_dim=8)
    # one KDA layer: state 2*32*32 = 2048; conv windows 3 * (2*64 + 64) = 576 -> 2624 values
    state_values = 3 * 2624
    kv_values_per_token = 1 * (32 + 8)
    out = inference_cache_bytes(cfg, 4096)
    assert out["recurrent_state"] == state_values * 2 == 15744
    assert out["kv_cache"] == kv_values_per_token * 4096 * 2 == 327680
    assert out["total"] == 15744 + 327680
    # the recurrent state does not grow with the context, the KV cache grows linearly
    long = inference_cache_bytes(cfg, 1 << 20)
    assert long["recurrent_state"] == out["recurrent_state"]
    assert long["kv_cache"] == out["kv_cache"] * 256


def test_gdn_gqa_with_grouped_value_heads_and_fp32():
    # 3 layers at ratio 1: L F F (last layer is always full). GDN: 2 key heads, 4 value heads, head 16,
    # expand_v 2 (head_v 32), conv 3. GQA: 2 kv heads x head_dim 8.
    cfg = ModelConfig(num_layers=3, hybrid_ratio=1, hidden_size=32, linear_mixer="gdn", linear_num_heads=2,
                      linear_num_v_heads=4, linear_head_dim=16, linear_expand_v=2.0, linear_conv_size=3,
                      full_mixer="gqa", gqa_num_heads=4, gqa_num_kv_heads=2, gqa_head_dim=8)
    # GDN: state 4*16*32 = 2048; key_dim 32, value_dim 128; conv 2 * (64 + 128) = 384 -> 2432 values
    # GQA: 2 * 2 * 8 = 32 values per token per layer, 2 layers -> 64
    out = inference_cache_bytes(cfg, 1000, bytes_per_element=4)
    assert out["recurrent_state"] == 2432 * 4
    assert out["kv_cache"] == 64 * 1000 * 4


def test_all_full_attention_has_no_recurrent_state_and_bad_inputs_are_named():
    cfg = ModelConfig(num_layers=2, hybrid_ratio=0, full_mixer="mla", mla_kv_lora_rank=16, mla_qk_rope_head_dim=0)
    assert inference_cache_bytes(cfg, 10) == {"kv_cache": 2 * 16 * 10 * 2, "recurrent_state": 0,
                                              "total": 640}
    with pytest.raises(ValueError, match="context_len"):
        inference_cache_bytes(cfg, -1)
    with pytest.raises(TypeError, match="ModelConfig"):
        inference_cache_bytes({"num_layers": 2}, 10)
