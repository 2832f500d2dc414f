"""This package's decoder <-> Hugging Face's native Kimi Linear (``model_type: kimi_linear``).

A standard-residual stack of KDA and NoPE MLA layers with a dense or sigmoid-routed MoE MLP is exactly the
published Kimi Linear model, so it is written as a directory ``transformers.AutoModelForCausalLM`` loads with no
custom code, and such a directory (the published checkpoints included) is read back as this package's weights.

Weights use the published checkpoint's names (what transformers' weight conversion reads and what its
``save_pretrained`` writes): per layer ``model.layers.{i}.``

    ours                                   Kimi Linear
    mixer_norm / mlp_norm                  input_layernorm / post_attention_layernorm
    mixer.{q,k,v}_proj, {q,k,v}_conv1d     self_attn.{q,k,v}_proj, {q,k,v}_conv1d
    mixer.f_proj.0 / f_proj.1              self_attn.f_a_proj / f_b_proj
    mixer.g_proj.0 / g_proj.1              self_attn.g_a_proj / g_b_proj
    mixer.A_log [H]                        self_attn.A_log [1, 1, H, 1]
    mixer.{dt_bias,b_proj,o_norm,o_proj}   self_attn.{dt_bias,b_proj,o_norm,o_proj}
    mixer.* (MLA)                          self_attn.* (same names)
    mlp.{gate,up,down}_proj (dense)        mlp.{gate,up,down}_proj
    mlp.gate, mlp.expert_bias              block_sparse_moe.gate.weight, .gate.e_score_correction_bias
    mlp.w_gate[e] / w_up[e] / w_down[e]    block_sparse_moe.experts.{e}.w1 / w3 / w2 (transposed: [out, in])
    mlp.shared_experts.*                   block_sparse_moe.shared_experts.*

plus ``model.embed_tokens``, ``model.norm`` (our ``final_norm``) and ``lm_head``. A tied head is written as its
own ``lm_head.weight`` (transformers' Kimi Linear does not tie).

What the native model cannot hold is refused with the reason (``native_refusals``), never dropped.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from attnres_train.model.config import ModelConfig

MODEL_TYPE = "kimi_linear"
# transformers' MLA (DeepSeek-V3's) builds its latent norms with this eps whatever the config says.
NATIVE_LATENT_NORM_EPS = 1e-6


class InteropError(ValueError):
    """A model or directory cannot be converted; the message names the field, tensor or file."""


def native_refusals(cfg: ModelConfig, state: Mapping[str, torch.Tensor] | None = None) -> list[str]:
    """Why ``cfg`` (and its weights, when given) cannot be written as a native Kimi Linear model; empty if it can."""
    kinds = set(cfg.layer_kinds())
    reasons = []
    if cfg.residual != "standard":
        reasons.append(f"model.residual={cfg.residual!r}: Kimi Linear has the standard residual only")
    if "L" in kinds:
        if cfg.linear_mixer != "kda":
            reasons.append(f"model.linear_mixer={cfg.linear_mixer!r}: Kimi Linear's linear layers are KDA")
        if cfg.linear_num_v_heads not in (None, cfg.linear_num_heads):
            reasons.append(f"model.linear_num_v_heads={cfg.linear_num_v_heads}: Kimi Linear has one value head "
                           "per key head")
        if cfg.linear_expand_v != 1.0:
            reasons.append(f"model.linear_expand_v={cfg.linear_expand_v}: Kimi Linear's value heads equal its key "
                           "heads (1.0)")
        if cfg.linear_allow_neg_eigval:
            reasons.append("model.linear_allow_neg_eigval=true: Kimi Linear's beta is a plain sigmoid")
        if cfg.linear_output_gate_bias:
            bias_norms = [float(value.abs().max()) for name, value in (state or {}).items()
                          if name.endswith("mixer.g_proj.1.bias")]
            if state is None or any(norm != 0.0 for norm in bias_norms):
                reasons.append("model.linear_output_gate_bias=true with a nonzero bias: Kimi Linear's output gate "
                               "(g_b_proj) has no bias")
    if "F" in kinds:
        if cfg.full_mixer != "mla":
            reasons.append(f"model.full_mixer={cfg.full_mixer!r}: Kimi Linear's full-attention layers are MLA")
        elif cfg.mla_use_rope and cfg.mla_qk_rope_head_dim > 0:
            reasons.append("model.mla_use_rope=true: Kimi Linear's MLA uses no positional encoding")
        elif cfg.latent_norm_eps() != NATIVE_LATENT_NORM_EPS:
            reasons.append(f"model.mla_latent_norm_eps={cfg.latent_norm_eps()}: transformers' MLA latent norms use "
                           f"{NATIVE_LATENT_NORM_EPS}")
    if "moe" in cfg.mlp_kinds():
        if cfg.router_score != "sigmoid":
            reasons.append(f"model.router_score={cfg.router_score!r}: Kimi Linear routes with sigmoid scores")
        if cfg.num_shared_experts < 1:
            reasons.append("model.num_shared_experts=0: Kimi Linear's MoE always has a shared expert")
    return reasons


def _dense_width(cfg: ModelConfig) -> int:
    return cfg.ffn_dim if cfg.mlp == "dense" else (cfg.first_dense_ffn_dim or cfg.ffn_dim)


def kimi_linear_config(cfg: ModelConfig, special_tokens: Mapping[str, int]) -> dict[str, Any]:
    """The ``config.json`` fields of the native model (explicit per-layer types, so nothing is left to defaults).
    ``special_tokens``: ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` inside the vocabulary."""
    mlp_kinds = cfg.mlp_kinds()
    return {
        "architectures": ["KimiLinearForCausalLM"],
        "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "layer_types": ["full_attention" if kind == "F" else "linear_attention" for kind in cfg.layer_kinds()],
        "mlp_layer_types": ["dense" if kind == "dense" else "sparse" for kind in mlp_kinds],
        "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "initializer_range": cfg.init_std,
        "linear_num_heads": cfg.linear_num_heads,
        "linear_head_dim": cfg.linear_head_dim,
        "linear_conv_kernel_dim": cfg.linear_conv_size,
        "num_attention_heads": cfg.mla_num_heads,
        "num_key_value_heads": cfg.mla_num_heads,
        "q_lora_rank": cfg.mla_q_lora_rank,
        "kv_lora_rank": cfg.mla_kv_lora_rank,
        "qk_nope_head_dim": cfg.mla_qk_nope_head_dim,
        "qk_rope_head_dim": cfg.mla_qk_rope_head_dim,
        "v_head_dim": cfg.mla_v_head_dim,
        "intermediate_size": _dense_width(cfg),
        "moe_intermediate_size": cfg.expert_ffn_dim,
        "num_local_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.top_k,
        "n_shared_experts": cfg.num_shared_experts,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "norm_topk_prob": True,
        "n_group": 1,
        "topk_group": 1,
        "attention_bias": False,
        "use_cache": True,
        **{key: int(value) for key, value in special_tokens.items()},
    }


def model_config_from_kimi_linear(hf_cfg: Any, where: str) -> dict[str, Any]:
    """Our model config fields from a loaded ``KimiLinearConfig`` (transformers resolves the published
    checkpoint's aliases and its ``linear_attn_config``); ``where`` names the directory in errors."""
    def refuse(field: str, value: Any, expected: str) -> None:
        raise InteropError(f"{where}: config.json {field}={value!r}: this package supports {expected}")

    if getattr(hf_cfg, "hidden_act", "silu") != "silu":
        refuse("hidden_act", hf_cfg.hidden_act, "silu")
    if not getattr(hf_cfg, "norm_topk_prob", True):
        refuse("norm_topk_prob", False, "renormalised top-k weights (true)")
    for field in ("n_group", "topk_group"):
        if (getattr(hf_cfg, field, 1) or 1) != 1:
            refuse(field, getattr(hf_cfg, field), "1 (no group-limited routing)")
    layer_types = list(hf_cfg.layer_types)
    unknown = sorted({t for t in layer_types} - {"full_attention", "linear_attention"})
    if unknown or len(layer_types) != hf_cfg.num_hidden_layers:
        refuse("layer_types", layer_types, f"{hf_cfg.num_hidden_layers} entries of full_attention/linear_attention")
    mlp_types = list(hf_cfg.mlp_layer_types)
    dense_prefix = next((i for i, kind in enumerate(mlp_types) if kind != "dense"), len(mlp_types))
    if any(kind != "sparse" for kind in mlp_types[dense_prefix:]) or len(mlp_types) != hf_cfg.num_hidden_layers:
        refuse("mlp_layer_types", mlp_types, "dense layers first, then sparse (MoE) layers")
    all_dense = dense_prefix == len(mlp_types)
    return {
        "vocab_size": hf_cfg.vocab_size,
        "hidden_size": hf_cfg.hidden_size,
        "num_layers": hf_cfg.num_hidden_layers,
        "layer_pattern": "".join("F" if t == "full_attention" else "L" for t in layer_types),
        "linear_mixer": "kda",
        "full_mixer": "mla",
        "norm_eps": hf_cfg.rms_norm_eps,
        "tie_embeddings": False,
        "linear_num_heads": hf_cfg.linear_num_heads,
        "linear_num_v_heads": None,
        "linear_head_dim": hf_cfg.linear_head_dim,
        "linear_expand_v": 1.0,
        "linear_conv_size": hf_cfg.linear_conv_kernel_dim,
        "linear_allow_neg_eigval": False,
        "linear_output_gate_bias": False,
        "mla_num_heads": hf_cfg.num_attention_heads,
        "mla_q_lora_rank": hf_cfg.q_lora_rank,
        "mla_kv_lora_rank": hf_cfg.kv_lora_rank,
        "mla_qk_nope_head_dim": hf_cfg.qk_nope_head_dim,
        "mla_qk_rope_head_dim": hf_cfg.qk_rope_head_dim,
        "mla_use_rope": False,
        "mla_v_head_dim": hf_cfg.v_head_dim,
        "mla_latent_norm_eps": NATIVE_LATENT_NORM_EPS,
        "mlp": "dense" if all_dense else "moe",
        "ffn_dim": hf_cfg.intermediate_size,
        "first_dense_layers": 0 if all_dense else dense_prefix,
        "first_dense_ffn_dim": None if all_dense else hf_cfg.intermediate_size,
        "num_experts": hf_cfg.num_local_experts,
        "top_k": hf_cfg.num_experts_per_tok,
        "num_shared_experts": hf_cfg.n_shared_experts,
        "expert_ffn_dim": hf_cfg.moe_intermediate_size,
        "router_score": "sigmoid",
        "routed_scaling_factor": hf_cfg.routed_scaling_factor,
        "residual": "standard",
    }


# --- weights ----------------------------------------------------------------------------------------------------


def _layer_pairs(cfg: ModelConfig, index: int) -> list[tuple[str, str, str]]:
    """``(our name, native name, how)`` for one decoder layer; ``how`` is ``copy``, ``a_log`` or ``expert:<e>``."""
    ours, theirs = f"layers.{index}.", f"model.layers.{index}."
    pairs = [(ours + "mixer_norm.weight", theirs + "input_layernorm.weight", "copy"),
             (ours + "mlp_norm.weight", theirs + "post_attention_layernorm.weight", "copy")]
    attn = theirs + "self_attn."
    if cfg.layer_kinds()[index] == "L":
        renamed = {"f_proj.0": "f_a_proj", "f_proj.1": "f_b_proj", "g_proj.0": "g_a_proj", "g_proj.1": "g_b_proj"}
        for module in ("q_proj", "k_proj", "v_proj", "q_conv1d", "k_conv1d", "v_conv1d", "f_proj.0", "f_proj.1",
                       "b_proj", "g_proj.0", "g_proj.1", "o_norm", "o_proj"):
            pairs.append((f"{ours}mixer.{module}.weight", f"{attn}{renamed.get(module, module)}.weight", "copy"))
        pairs.append((ours + "mixer.dt_bias", attn + "dt_bias", "copy"))
        pairs.append((ours + "mixer.A_log", attn + "A_log", "a_log"))
    else:
        modules = ["q_proj"] if cfg.mla_q_lora_rank is None else ["q_a_proj", "q_a_layernorm", "q_b_proj"]
        for module in (*modules, "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"):
            pairs.append((f"{ours}mixer.{module}.weight", f"{attn}{module}.weight", "copy"))
    if cfg.mlp_kinds()[index] == "dense":
        for module in ("gate_proj", "up_proj", "down_proj"):
            pairs.append((f"{ours}mlp.{module}.weight", f"{theirs}mlp.{module}.weight", "copy"))
    else:
        moe = theirs + "block_sparse_moe."
        pairs += [(ours + "mlp.gate.weight", moe + "gate.weight", "copy"),
                  (ours + "mlp.expert_bias", moe + "gate.e_score_correction_bias", "copy")]
        for expert in range(cfg.num_experts):
            for stacked, native in (("w_gate", "w1"), ("w_up", "w3"), ("w_down", "w2")):
                pairs.append((f"{ours}mlp.{stacked}", f"{moe}experts.{expert}.{native}.weight", f"expert:{expert}"))
        for module in ("gate_proj", "up_proj", "down_proj"):
            pairs.append((f"{ours}mlp.shared_experts.{module}.weight", f"{moe}shared_experts.{module}.weight", "copy"))
    return pairs


def _model_pairs(cfg: ModelConfig) -> list[tuple[str, str, str]]:
    pairs = [("embed_tokens.weight", "model.embed_tokens.weight", "copy")]
    for index in range(cfg.num_layers):
        pairs += _layer_pairs(cfg, index)
    pairs += [("final_norm.weight", "model.norm.weight", "copy"), ("lm_head.weight", "lm_head.weight", "copy")]
    return pairs


def to_kimi_linear_state(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our decoder's state dict -> the native checkpoint's tensors (contiguous, ready for safetensors)."""
    out = {}
    for ours, theirs, how in _model_pairs(cfg):
        value = state[ours]
        if how == "a_log":
            value = value.reshape(1, 1, -1, 1)
        elif how.startswith("expert:"):
            value = value[int(how.split(":")[1])].t()
        out[theirs] = value.contiguous()
    return out


def from_kimi_linear_state(tensors: Mapping[str, torch.Tensor], cfg: ModelConfig,
                           expected: Mapping[str, torch.Size], where: str) -> dict[str, torch.Tensor]:
    """The native checkpoint's tensors -> our state dict, each shape checked against ``expected`` (our model's
    shapes for ``cfg``); errors name the tensor and file. ``tensors`` may be lazy (``safe_open``-like mapping)."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, list] = {}
    for ours, theirs, how in _model_pairs(cfg):
        if theirs not in tensors:
            dense_alias = theirs.replace(".mlp.", ".block_sparse_moe.")  # transformers' save_pretrained spelling
            if dense_alias in tensors:
                theirs = dense_alias
            else:
                raise InteropError(f"{where}: tensor {theirs} is missing (needed for {ours})")
        value = tensors[theirs]
        shape = expected[ours]
        if how == "a_log":
            want = torch.Size((1, 1, shape[0], 1))
        elif how.startswith("expert:"):
            want = torch.Size((shape[2], shape[1]))
        else:
            want = shape
        if tuple(value.shape) != tuple(want):
            raise InteropError(f"{where}: tensor {theirs} has shape {tuple(value.shape)}, the config gives "
                               f"{tuple(want)} (for {ours})")
        if how == "a_log":
            out[ours] = value.reshape(-1)
        elif how.startswith("expert:"):
            experts.setdefault(ours, [None] * cfg.num_experts)[int(how.split(":")[1])] = value.t()
        else:
            out[ours] = value
    for ours, per_expert in experts.items():
        out[ours] = torch.stack(per_expert)
    return out
