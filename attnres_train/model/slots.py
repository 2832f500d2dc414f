"""Builders for the two sublayer slots of a decoder layer: the sequence mixer and the MLP.

The only place that maps a layer's kind (``kda``/``gdn``/``mla``/``gqa``, ``moe``/``dense``) to a module and
its config fields.
"""

from __future__ import annotations

from torch import nn

from .config import ModelConfig


def build_sequence_mixer(kind: str, cfg: ModelConfig) -> nn.Module:
    if kind in ("kda", "gdn"):
        from .mixers.linear_attention import GatedDeltaNet, KimiDeltaAttention

        mixer_class = KimiDeltaAttention if kind == "kda" else GatedDeltaNet
        return mixer_class(
            hidden_size=cfg.hidden_size,
            head_dim=cfg.linear_head_dim,
            num_heads=cfg.linear_num_heads,
            num_v_heads=cfg.linear_num_v_heads,
            expand_v=cfg.linear_expand_v,
            conv_size=cfg.linear_conv_size,
            allow_neg_eigval=cfg.linear_allow_neg_eigval,
            norm_eps=cfg.norm_eps,
            chunk_size=cfg.linear_chunk_size,
            impl=cfg.linear_attention_impl,
            **({"output_gate_bias": cfg.linear_output_gate_bias} if kind == "kda" else {}),
        )
    if kind == "mla":
        from .mixers.attention import MultiheadLatentAttention

        return MultiheadLatentAttention(
            hidden_size=cfg.hidden_size,
            num_heads=cfg.mla_num_heads,
            kv_lora_rank=cfg.mla_kv_lora_rank,
            qk_nope_head_dim=cfg.mla_qk_nope_head_dim,
            qk_rope_head_dim=cfg.mla_qk_rope_head_dim,
            v_head_dim=cfg.mla_v_head_dim,
            q_lora_rank=cfg.mla_q_lora_rank,
            rope_theta=cfg.rope_theta,
            norm_eps=cfg.latent_norm_eps(),
            attention_impl=cfg.attention_impl,
            use_rope=cfg.mla_use_rope,
        )
    if kind == "gqa":
        from .mixers.attention import GatedGroupedQueryAttention

        return GatedGroupedQueryAttention(
            hidden_size=cfg.hidden_size,
            num_heads=cfg.gqa_num_heads,
            num_kv_heads=cfg.gqa_num_kv_heads,
            head_dim=cfg.gqa_head_dim,
            rope_fraction=cfg.gqa_rope_fraction,
            rope_theta=cfg.rope_theta,
            norm_eps=cfg.norm_eps,
            attention_impl=cfg.attention_impl,
        )
    raise ValueError(f"unknown sequence mixer {kind!r}: expected kda, gdn, mla or gqa")


def build_mlp(kind: str, cfg: ModelConfig) -> nn.Module:
    if kind == "dense":
        from .mlp import SwiGLU

        ffn_dim = cfg.ffn_dim if cfg.mlp == "dense" else (cfg.first_dense_ffn_dim or cfg.ffn_dim)
        return SwiGLU(hidden_size=cfg.hidden_size, ffn_dim=ffn_dim)
    if kind == "moe":
        from .moe import MoE

        return MoE(
            hidden_size=cfg.hidden_size,
            num_experts=cfg.num_experts,
            top_k=cfg.top_k,
            expert_ffn_dim=cfg.expert_ffn_dim,
            num_shared_experts=cfg.num_shared_experts,
            router_score=cfg.router_score,
            routed_scaling_factor=cfg.routed_scaling_factor,
            bias_update_rate=cfg.moe_bias_update_rate,
            aux_loss_coef=cfg.moe_aux_loss_coef,
        )
    raise ValueError(f"unknown MLP kind {kind!r}: expected moe or dense")
