"""Parameter and FLOP accounting of a ``HybridDecoder``.

Definitions (used by MFU and the sweep reports):
- total parameters: every distinct parameter tensor (tied embeddings counted once);
- active parameters: those one token's forward pass uses: each MoE layer contributes its router, its top_k
  routed experts and its shared experts (not the others), and an untied input embedding contributes the one
  row the token reads (a lookup, not a matmul). The LM head is a matmul over all of its weights and counts
  fully. ``active_non_embedding_parameters`` leaves out the input embedding and the LM head entirely;
- training FLOPs per token: 3 x the forward FLOPs of ``HybridDecoder.flops_per_token``; each mixer counts its
  own matmuls exactly (linear attention is linear in the sequence length, causal softmax attention averages
  (T + 1) / 2 keys per token), MoE counts active experts only, AttnRes counts its depth mixes.
"""

from __future__ import annotations

from torch import nn


def count_parameters(model: nn.Module, exclude_embeddings: bool = False) -> int:
    seen: set[int] = set()
    total = 0
    embedding_ids = set()
    if exclude_embeddings:
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                embedding_ids.add(id(module.weight))
    for param in model.parameters():
        if id(param) in seen or id(param) in embedding_ids:
            continue
        seen.add(id(param))
        total += param.numel()
    return total


def count_active_parameters(model: nn.Module, include_embeddings: bool = True) -> int:
    total = count_parameters(model)
    for moe in model.moe_layers():
        moe_total = sum(p.numel() for p in moe.parameters())
        total -= moe_total - moe.active_parameters()
    embedding = model.embed_tokens.weight
    head = model.lm_head.weight
    if not include_embeddings:
        total -= embedding.numel()
        if head is not embedding:
            total -= head.numel()
    elif head is not embedding:
        total -= embedding.numel() - embedding.shape[1]
    return total


def describe(model: nn.Module, seq_len: int) -> dict:
    """One summary dict for logs and reports."""
    return {
        "total_parameters": count_parameters(model),
        "active_parameters": count_active_parameters(model),
        "active_non_embedding_parameters": count_active_parameters(model, include_embeddings=False),
        "non_embedding_parameters": count_parameters(model, exclude_embeddings=True),
        "train_flops_per_token": model.flops_per_token(seq_len, training=True),
        "seq_len": seq_len,
        "layer_pattern": "".join("F" if spec.is_full_attention else "L" for spec in model.specs),
    }


def inference_cache_bytes(cfg, context_len: int, bytes_per_element: int = 2) -> dict:
    """Bytes of decoding state one sequence holds after ``context_len`` tokens (KV cache + recurrent state).

    Counted from the model's shape (``ModelConfig``), per layer by its mixer, in ``bytes_per_element`` (2 = bf16):
    - MLA caches the compressed latent and the shared rope key: ``kv_lora_rank + qk_rope_head_dim`` values per
      token (keys and values are re-expanded from the latent at decode time);
    - GQA caches keys and values: ``2 * num_kv_heads * head_dim`` values per token;
    - KDA / GDN keep a fixed-size state independent of ``context_len``: the delta-rule matrix
      ``num_v_heads * head_k_dim * head_v_dim`` plus the short-conv windows
      ``(conv_size - 1) * (2 * key_dim + value_dim)``, with key_dim = num_heads * head_k_dim and
      value_dim = num_v_heads * head_v_dim.
    Returns ``{"kv_cache": .., "recurrent_state": .., "total": ..}`` in bytes.
    """
    import dataclasses

    from .config import ModelConfig

    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
    if not isinstance(context_len, int) or context_len < 0:
        raise ValueError(f"context_len={context_len!r}: expected an integer >= 0")
    if bytes_per_element <= 0:
        raise ValueError(f"bytes_per_element={bytes_per_element!r}: expected a positive number")
    cfg = dataclasses.replace(cfg)
    cfg.validate()  # derives the null head dims
    kv_values_per_token = 0
    state_values = 0
    for kind in cfg.layer_kinds():
        if kind == "F" and cfg.full_mixer == "mla":
            kv_values_per_token += cfg.mla_kv_lora_rank + cfg.mla_qk_rope_head_dim
        elif kind == "F":
            kv_values_per_token += 2 * cfg.gqa_num_kv_heads * cfg.gqa_head_dim
        else:
            num_v_heads = cfg.linear_num_v_heads or cfg.linear_num_heads
            head_k_dim = cfg.linear_head_dim
            head_v_dim = int(round(head_k_dim * cfg.linear_expand_v))
            key_dim = cfg.linear_num_heads * head_k_dim
            value_dim = num_v_heads * head_v_dim
            state_values += num_v_heads * head_k_dim * head_v_dim
            state_values += (cfg.linear_conv_size - 1) * (2 * key_dim + value_dim)
    kv_cache = kv_values_per_token * context_len * bytes_per_element
    recurrent_state = state_values * bytes_per_element
    return {"kv_cache": kv_cache, "recurrent_state": recurrent_state, "total": kv_cache + recurrent_state}
