"""The language-model loss, shared by the trainer, the pipeline's last stage and evaluation.

Labels equal to ``IGNORE_INDEX`` (padding, document boundaries the data marks) do not count.
Shape legend: B batch, T tokens, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def language_model_loss(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy in fp32 over the labels that count."""
    return F.cross_entropy(
        logits_BTV.float().reshape(-1, logits_BTV.shape[-1]), labels_BT.reshape(-1), ignore_index=IGNORE_INDEX
    )
