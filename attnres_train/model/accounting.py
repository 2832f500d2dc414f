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
