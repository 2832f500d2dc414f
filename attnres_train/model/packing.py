"""Document boundaries inside packed rows.

A packed batch row holds several documents back to back. Every sequence mixer must keep them apart:
attention may not look across a boundary, recurrent state and short-conv windows restart at each
document. ``DocumentLayout`` is computed once per batch from per-token document ids and handed to every
mixer, so each can choose the cheapest exact form:

* ``cu_seqlens`` / ``max_seqlen`` over the flattened ``B*T`` tokens, for varlen kernels (flash-attn, fla), and
  ``cu_seqlens_cpu``, the same offsets on the host: fla's chunk kernels take it to plan their chunks without
  reading the device tensor back (one device sync per call otherwise);
* ``to_padded`` / ``from_padded``, which gather the documents into a ``[N_docs, L_max, ...]`` batch padded
  at the end. Trailing padding never influences earlier positions of a causal mixer, so a mixer run on
  the padded batch with no mask at all is exact for every real token;
* ``position_ids`` restarting at 0 in each document, for RoPE.

Shape legend: B batch, T tokens per row, N documents in the batch, L longest document.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DocumentLayout:
    doc_ids_BT: torch.Tensor
    position_ids_BT: torch.Tensor
    cu_seqlens: torch.Tensor  # int32 [N + 1], offsets into the flattened B*T tokens
    cu_seqlens_cpu: torch.Tensor  # the same on the host (read back once per batch, here)
    max_seqlen: int
    # Gather/scatter indices between the flattened tokens and the padded [N, L] document batch.
    token_index_NL: torch.Tensor  # int64 [N, L]: flat token index, or B*T (a pad slot) where beyond the doc
    valid_NL: torch.Tensor  # bool [N, L]
    flat_to_padded: torch.Tensor  # int64 [B*T]: position of each token inside the flattened [N*L] batch

    @property
    def num_documents(self) -> int:
        return int(self.cu_seqlens.numel() - 1)

    @classmethod
    def from_doc_ids(cls, doc_ids_BT: torch.Tensor) -> "DocumentLayout":
        """Build the layout from per-token document ids ``[B, T]``.

        A new document starts wherever the id changes from the previous token of the same row (ids need
        not be globally unique or increasing; only changes matter) and at the start of every row.
        """
        if doc_ids_BT.dim() != 2:
            raise ValueError(f"doc_ids must have shape [batch, seq_len], got {tuple(doc_ids_BT.shape)}")
        B, T = doc_ids_BT.shape
        device = doc_ids_BT.device
        starts_BT = torch.ones_like(doc_ids_BT, dtype=torch.bool)
        starts_BT[:, 1:] = doc_ids_BT[:, 1:] != doc_ids_BT[:, :-1]
        starts_flat = starts_BT.reshape(-1)
        start_index = torch.nonzero(starts_flat, as_tuple=False).squeeze(1)
        total = B * T
        cu_seqlens = torch.cat([start_index, torch.tensor([total], device=device)]).to(torch.int32)
        cu_seqlens_cpu = cu_seqlens.cpu()  # the one read-back per batch: max_seqlen and fla's chunk planning
        lengths = (cu_seqlens_cpu[1:] - cu_seqlens_cpu[:-1]).long()
        max_seqlen = int(lengths.max())
        N = lengths.numel()

        # Document index of each flat token and its offset inside the document.
        doc_of_token = torch.cumsum(starts_flat.long(), 0) - 1
        offset_in_doc = torch.arange(total, device=device) - start_index[doc_of_token]
        position_ids_BT = offset_in_doc.view(B, T)

        flat_to_padded = doc_of_token * max_seqlen + offset_in_doc
        token_index = torch.full((N * max_seqlen,), total, dtype=torch.long, device=device)
        token_index[flat_to_padded] = torch.arange(total, device=device)
        token_index_NL = token_index.view(N, max_seqlen)
        valid_NL = token_index_NL < total
        return cls(
            doc_ids_BT=doc_ids_BT,
            position_ids_BT=position_ids_BT,
            cu_seqlens=cu_seqlens,
            cu_seqlens_cpu=cu_seqlens_cpu,
            max_seqlen=max_seqlen,
            token_index_NL=token_index_NL,
            valid_NL=valid_NL,
            flat_to_padded=flat_to_padded,
        )

    def to_padded(self, x_BT: torch.Tensor) -> torch.Tensor:
        """``[B, T, *F]`` -> ``[N, L, *F]`` with zeros after each document's end."""
        B, T = x_BT.shape[:2]
        feature_shape = x_BT.shape[2:]
        flat = x_BT.reshape(B * T, *feature_shape)
        flat = torch.cat([flat, flat.new_zeros(1, *feature_shape)], dim=0)  # index B*T is the zero pad row
        return flat[self.token_index_NL.reshape(-1)].view(*self.token_index_NL.shape, *feature_shape)

    def from_padded(self, y_NL: torch.Tensor, batch_size: int, seq_len: int) -> torch.Tensor:
        """Inverse of ``to_padded``: ``[N, L, *F]`` -> ``[B, T, *F]`` (pad slots dropped)."""
        feature_shape = y_NL.shape[2:]
        flat = y_NL.reshape(-1, *feature_shape)[self.flat_to_padded]
        return flat.view(batch_size, seq_len, *feature_shape)

    def is_single_document_per_row(self) -> bool:
        return self.num_documents == self.doc_ids_BT.shape[0]


def doc_ids_from_eos(input_ids_BT: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Document ids for rows packed as ``doc EOS doc EOS ...``: a new document starts after each EOS."""
    is_eos = (input_ids_BT == eos_token_id).long()
    starts_after = torch.zeros_like(is_eos)
    starts_after[:, 1:] = is_eos[:, :-1]
    return torch.cumsum(starts_after, dim=1)
