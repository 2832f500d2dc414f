"""Activation checkpointing: recompute each sublayer (norm + mixer, norm + MLP) in backward.

Applied by the engine, not the model: the decoder stays plain single-device PyTorch. The AttnRes depth mixes
are left outside the checkpointed region; they are cheap to keep and their inputs (block summaries) are live
anyway. The MoE does not count tokens again during recomputation (see ``MoE``), so load statistics and the
balancing bias are unaffected.
"""

from __future__ import annotations

import functools

from torch.utils.checkpoint import checkpoint


def _checkpointed(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)

    return wrapper


def apply_activation_checkpointing(model) -> int:
    """Wrap every decoder layer's two sublayers; returns the number of wrapped sublayers."""
    wrapped = 0
    for layer in model.layers:
        layer.mixer_sublayer = _checkpointed(layer.mixer_sublayer)
        layer.mlp_sublayer = _checkpointed(layer.mlp_sublayer)
        wrapped += 2
    return wrapped
