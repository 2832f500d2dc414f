"""Typed schema of the ``model`` config group and its validation.

Every field is documented where it is declared. ``validate`` raises ``ModelConfigError`` whose message
names the offending field (``model.<field>``) and what was expected; nothing downstream sees a bad config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from attnres_train.schema import section_from_mapping

LINEAR_MIXERS = ("kda", "gdn")
FULL_MIXERS = ("mla", "gqa")
RESIDUALS = ("standard", "full_attnres", "block_attnres")
MLP_KINDS = ("moe", "dense")
ROUTER_SCORES = ("sigmoid", "softmax")
ATTENTION_IMPLS = ("auto", "sdpa", "flash")
LINEAR_ATTENTION_IMPLS = ("auto", "torch", "fla")
ATTNRES_IMPLS = ("auto", "fused", "fla", "torch")  # see attnres_train/model/attnres.py


class ModelConfigError(ValueError):
    """A model config field has an impossible value; the message names the field."""


# Fields added after checkpoints were already being written, with the value that reproduces the model those
# checkpoints were trained as when a saved config lacks the field (a field absent from this table defaults
# to its declared default, which is then also what the older code computed).
LEGACY_FIELD_VALUES = {"linear_output_gate_bias": True}


def with_legacy_fields(saved: dict) -> dict:
    """A saved model config dict completed with the legacy value of every field it predates."""
    return {**{k: v for k, v in LEGACY_FIELD_VALUES.items() if k not in saved}, **saved}


@dataclass
class ModelConfig:
    # --- stack shape -------------------------------------------------------------------------------
    vocab_size: int = 258  # byte tokenizer: 256 bytes + EOS + PAD; data pipelines overwrite it to match
    hidden_size: int = 256
    num_layers: int = 8  # decoder blocks; each has two sublayers (mixer, MLP) for AttnRes purposes
    hybrid_ratio: int = 3  # k linear-attention layers per full-attention layer (0 = all full attention)
    layer_pattern: Optional[str] = None  # explicit per-layer string of L (linear) / F (full); overrides hybrid_ratio
    linear_mixer: str = "kda"  # kda | gdn
    full_mixer: str = "mla"  # mla | gqa
    norm_eps: float = 1e-6  # every RMSNorm but MLA's latent norms (published Kimi Linear: 1e-5)
    tie_embeddings: bool = False
    init_std: float = 0.02

    # --- linear attention (KDA / Gated DeltaNet); names follow fla's layers ----------------------------
    linear_num_heads: int = 4
    linear_num_v_heads: Optional[int] = None  # > linear_num_heads gives grouped value heads (Qwen3-Next GDN)
    linear_head_dim: Optional[int] = 64  # null: hidden_size / linear_num_heads (must divide)
    linear_expand_v: float = 1.0
    linear_conv_size: int = 4
    linear_allow_neg_eigval: bool = False
    # chunk length of the pure-torch chunked delta rule (linear_attention_impl=torch); fla's chunk kernels
    # (impl fla) use their own fixed chunk size and ignore this field
    linear_chunk_size: int = 64
    linear_attention_impl: str = "auto"  # auto (fla on CUDA, torch elsewhere) | torch | fla
    # KDA output gate: a bias on its second projection (g_proj.1) as in fla's layer; the published Kimi Linear
    # has none. Checkpoints saved before this field existed had it (see LEGACY_FIELD_VALUES).
    linear_output_gate_bias: bool = False

    # --- MLA (Kimi Linear) ---------------------------------------------------------------------------
    mla_num_heads: int = 4
    mla_q_lora_rank: Optional[int] = None  # None: full-rank query projection (Kimi Linear)
    mla_kv_lora_rank: int = 128
    mla_qk_nope_head_dim: int = 64
    mla_qk_rope_head_dim: int = 0  # decoupled shared-key dims (Kimi Linear: 64); rotated only if mla_use_rope
    mla_use_rope: bool = False  # Kimi Linear's MLA uses no positional encoding at all (NoPE)
    mla_v_head_dim: int = 64
    # eps of MLA's latent norms (kv_a_layernorm, q_a_layernorm); null: norm_eps. Published Kimi Linear and
    # DeepSeek-V3: 1e-6 while their other norms use 1e-5.
    mla_latent_norm_eps: Optional[float] = None

    # --- gated GQA (Qwen3-Next) ------------------------------------------------------------------------
    gqa_num_heads: int = 4
    gqa_num_kv_heads: int = 2
    gqa_head_dim: Optional[int] = 64  # null: hidden_size / gqa_num_heads (must divide)
    gqa_rope_fraction: float = 0.25  # fraction of head_dim rotated (partial RoPE)
    rope_theta: float = 10000.0
    attention_impl: str = "auto"  # auto (flash-attn varlen on CUDA when installed, else SDPA) | sdpa | flash

    # --- MLP slot ------------------------------------------------------------------------------------
    mlp: str = "moe"  # moe | dense
    ffn_dim: int = 704  # dense SwiGLU width (also used by the first_dense_layers)
    num_experts: int = 8
    top_k: int = 2
    num_shared_experts: int = 1
    expert_ffn_dim: int = 256
    router_score: str = "sigmoid"  # sigmoid | softmax
    routed_scaling_factor: float = 1.0
    moe_bias_update_rate: float = 1e-3  # aux-loss-free balancing step; 0 disables the bias update
    moe_aux_loss_coef: float = 0.0  # sequence-level balance loss weight; 0 = aux-loss-free only
    first_dense_layers: int = 0  # the first N decoder layers use a dense SwiGLU MLP
    first_dense_ffn_dim: Optional[int] = None  # width of those dense layers (default: ffn_dim)

    # --- residual slot -------------------------------------------------------------------------------
    residual: str = "block_attnres"  # standard | full_attnres | block_attnres
    attnres_block_size: int = 4  # sublayers per AttnRes block (S in the paper); 2 sublayers per decoder layer
    attnres_impl: str = "auto"  # auto | fused | fla | torch: how the AttnRes mixes run (model/attnres.py)

    # ------------------------------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, cfg: Any) -> "ModelConfig":
        """Build from a DictConfig, a dict or a ModelConfig; unknown keys are an error naming the key."""
        out = section_from_mapping(cls, cfg, "model", ModelConfigError)
        out.validate()
        return out

    def validate(self) -> None:
        def need(cond: bool, name: str, expected: str) -> None:
            if not cond:
                raise ModelConfigError(f"model.{name}={getattr(self, name)!r}: expected {expected}")

        need(self.vocab_size > 0, "vocab_size", "a positive integer")
        need(self.hidden_size > 0, "hidden_size", "a positive integer")
        need(self.num_layers > 0, "num_layers", "a positive integer")
        need(self.hybrid_ratio >= 0, "hybrid_ratio", "an integer >= 0 (k linear layers per full layer)")
        need(self.linear_mixer in LINEAR_MIXERS, "linear_mixer", f"one of {LINEAR_MIXERS}")
        need(self.full_mixer in FULL_MIXERS, "full_mixer", f"one of {FULL_MIXERS}")
        need(self.residual in RESIDUALS, "residual", f"one of {RESIDUALS}")
        need(self.mlp in MLP_KINDS, "mlp", f"one of {MLP_KINDS}")
        need(self.router_score in ROUTER_SCORES, "router_score", f"one of {ROUTER_SCORES}")
        need(self.attnres_impl in ATTNRES_IMPLS, "attnres_impl", f"one of {ATTNRES_IMPLS}")
        need(self.attention_impl in ATTENTION_IMPLS, "attention_impl", f"one of {ATTENTION_IMPLS}")
        need(
            self.linear_attention_impl in LINEAR_ATTENTION_IMPLS,
            "linear_attention_impl",
            f"one of {LINEAR_ATTENTION_IMPLS}",
        )
        need(self.norm_eps > 0, "norm_eps", "a positive float")
        need(self.mla_latent_norm_eps is None or self.mla_latent_norm_eps > 0, "mla_latent_norm_eps",
             "null (same as norm_eps) or a positive float")
        if self.layer_pattern is not None:
            pattern = self.layer_pattern
            need(
                len(pattern) == self.num_layers and set(pattern) <= {"L", "F"},
                "layer_pattern",
                f"a string of exactly num_layers={self.num_layers} characters from 'L' (linear) and 'F' (full)",
            )
        layer_kinds = set(self.layer_kinds())
        if "L" in layer_kinds:
            need(self.linear_num_heads > 0, "linear_num_heads", "a positive integer")
            if self.linear_head_dim is None:
                need(
                    self.hidden_size % self.linear_num_heads == 0,
                    "linear_num_heads",
                    f"a divisor of hidden_size={self.hidden_size} (linear_head_dim is null, so it is derived)",
                )
                self.linear_head_dim = self.hidden_size // self.linear_num_heads
            need(self.linear_head_dim > 0, "linear_head_dim", "a positive integer")
            v_heads = self.linear_num_v_heads or self.linear_num_heads
            need(
                v_heads % self.linear_num_heads == 0,
                "linear_num_v_heads",
                f"a multiple of linear_num_heads={self.linear_num_heads}",
            )
            need(
                float(self.linear_head_dim * self.linear_expand_v).is_integer() and self.linear_expand_v > 0,
                "linear_expand_v",
                f"a positive factor making linear_head_dim*expand_v an integer (head_dim={self.linear_head_dim})",
            )
            need(self.linear_conv_size >= 1, "linear_conv_size", "an integer >= 1")
            need(self.linear_chunk_size >= 1, "linear_chunk_size", "an integer >= 1")
        if "F" in layer_kinds and self.full_mixer == "mla":
            need(self.mla_num_heads > 0, "mla_num_heads", "a positive integer")
            need(self.mla_kv_lora_rank > 0, "mla_kv_lora_rank", "a positive integer")
            need(self.mla_qk_nope_head_dim > 0, "mla_qk_nope_head_dim", "a positive integer")
            need(self.mla_qk_rope_head_dim >= 0, "mla_qk_rope_head_dim", "an even integer >= 0")
            need(self.mla_qk_rope_head_dim % 2 == 0, "mla_qk_rope_head_dim", "an even integer >= 0")
            need(self.mla_v_head_dim > 0, "mla_v_head_dim", "a positive integer")
            need(
                self.mla_q_lora_rank is None or self.mla_q_lora_rank > 0,
                "mla_q_lora_rank",
                "null (full-rank queries) or a positive integer",
            )
        if "F" in layer_kinds and self.full_mixer == "gqa":
            need(self.gqa_num_heads > 0, "gqa_num_heads", "a positive integer")
            if self.gqa_head_dim is None:
                need(
                    self.hidden_size % self.gqa_num_heads == 0,
                    "gqa_num_heads",
                    f"a divisor of hidden_size={self.hidden_size} (gqa_head_dim is null, so it is derived)",
                )
                self.gqa_head_dim = self.hidden_size // self.gqa_num_heads
            need(
                self.gqa_num_kv_heads > 0 and self.gqa_num_heads % self.gqa_num_kv_heads == 0,
                "gqa_num_kv_heads",
                f"a positive divisor of gqa_num_heads={self.gqa_num_heads}",
            )
            need(self.gqa_head_dim > 0 and self.gqa_head_dim % 2 == 0, "gqa_head_dim", "a positive even integer")
            rotary = self.gqa_head_dim * self.gqa_rope_fraction
            need(
                0.0 <= self.gqa_rope_fraction <= 1.0 and rotary.is_integer() and int(rotary) % 2 == 0,
                "gqa_rope_fraction",
                f"a fraction in [0, 1] giving an even number of rotary dims of gqa_head_dim={self.gqa_head_dim}",
            )
        need(self.ffn_dim > 0, "ffn_dim", "a positive integer")
        need(0 <= self.first_dense_layers <= self.num_layers, "first_dense_layers", f"in [0, num_layers={self.num_layers}]")
        if self.mlp == "moe" and self.first_dense_layers < self.num_layers:
            need(self.num_experts > 0, "num_experts", "a positive integer")
            need(1 <= self.top_k <= self.num_experts, "top_k", f"in [1, num_experts={self.num_experts}]")
            need(self.num_shared_experts >= 0, "num_shared_experts", "an integer >= 0")
            need(self.expert_ffn_dim > 0, "expert_ffn_dim", "a positive integer")
            need(self.routed_scaling_factor > 0, "routed_scaling_factor", "a positive float")
            need(self.moe_bias_update_rate >= 0, "moe_bias_update_rate", "a float >= 0")
            need(self.moe_aux_loss_coef >= 0, "moe_aux_loss_coef", "a float >= 0")
        if self.residual != "standard":
            num_sublayers = 2 * self.num_layers
            need(
                1 <= self.attnres_block_size <= num_sublayers,
                "attnres_block_size",
                f"an integer in [1, 2*num_layers={num_sublayers}] (counted in sublayers)",
            )

    # ------------------------------------------------------------------------------------------------
    def layer_kinds(self) -> list[str]:
        """Per-layer mixer kind, 'L' (linear attention) or 'F' (full attention), following Kimi Linear:
        a full layer after every ``hybrid_ratio`` linear layers, and the last layer always full."""
        if self.layer_pattern is not None:
            return list(self.layer_pattern)
        k = self.hybrid_ratio
        kinds = ["F" if (k == 0 or (i + 1) % (k + 1) == 0) else "L" for i in range(self.num_layers)]
        kinds[-1] = "F"
        return kinds

    def mlp_kinds(self) -> list[str]:
        """Per-layer MLP kind: 'dense' for the first ``first_dense_layers`` layers (or all, if mlp=dense)."""
        return ["dense" if (self.mlp == "dense" or i < self.first_dense_layers) else "moe" for i in range(self.num_layers)]

    def latent_norm_eps(self) -> float:
        return self.norm_eps if self.mla_latent_norm_eps is None else self.mla_latent_norm_eps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
