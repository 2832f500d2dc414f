"""Decoding caches: what each sequence mixer keeps between calls so that new tokens never re-run the prefix.

``HybridDecoder.new_cache(batch_size, max_length)`` builds a ``DecodeCache``: one state object per decoder layer,
made by that layer's mixer, plus the per-row bookkeeping every layer shares. ``HybridDecoder.forward(input_ids,
attention_mask=..., cache=cache)`` consumes the T new tokens of every row (a prefill when T > 1, one decode step
when T == 1) and advances the cache.

Per-layer state:
  ``KVCache``        gated GQA: keys (after q/k norm and RoPE) and values of every consumed column, ``[B, S, G, K]``.
  ``LatentKVCache``  MLA: only the normed latent and the shared key part, ``[B, S, C + R]`` per layer (C + R = 576
                     numbers per token for Kimi Linear 48B instead of H * (K + V) = 10240 for expanded K/V);
                     decoding attends in latent space with ``kv_b_proj`` absorbed into the query and the output.
  ``RecurrentCache`` KDA / Gated DeltaNet: the delta-rule state ``[B, N, K, V]`` (fp32) and the last W - 1 inputs
                     of each short convolution. Its size does not depend on how many tokens were consumed, so
                     the per-token work of these layers does not grow with the context.
AttnRes mixes over depth at one position, so the residual strategies need no state across time.

Padding (batched prompts of different lengths): rows are LEFT-padded and ``attention_mask`` ``[B, T]`` marks the
real tokens of the T new columns (1) and the pads (0). A pad is invisible: attention never reads its key, the
recurrent state is neither decayed nor written (gate 0, beta 0) and the short-conv inputs are zero there, which
is exactly the zero history a row starts from. Positions count real tokens only, per row, so RoPE sees every
prompt as if it were alone. Pads may only precede a row's first real token (the mask of a row never goes from 1
back to 0): a pad after real tokens would need the conv window to skip a column.

Attention caches are preallocated for ``max_length`` columns and grow (doubling) when a call needs more; the
column axis holds pads too, so every row writes its new tokens at the same column.

Shape legend: B batch, T new tokens, S cached columns (capacity), G key/value heads, K key dim, V value dim,
C MLA latent rank, R MLA shared-key dims, N value heads of a linear mixer, W short-conv width, D channels.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Union

import torch


def _grown(buffer_BS: torch.Tensor, capacity: int) -> torch.Tensor:
    """``buffer`` with its column axis (dim 1) extended to ``capacity``, zero-filled; contents kept."""
    out = buffer_BS.new_zeros(buffer_BS.shape[0], capacity, *buffer_BS.shape[2:])
    out[:, : buffer_BS.shape[1]] = buffer_BS
    return out


@dataclass
class KVCache:
    """Keys and values of one gated-GQA layer, ``[B, S, G, K]`` each."""

    keys_BSGK: torch.Tensor
    values_BSGK: torch.Tensor

    def write(self, start: int, keys_BTGK: torch.Tensor, values_BTGK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new columns at ``start`` and return keys and values of columns ``0 .. start + T``."""
        end = start + keys_BTGK.shape[1]
        self.keys_BSGK[:, start:end] = keys_BTGK
        self.values_BSGK[:, start:end] = values_BTGK
        return self.keys_BSGK[:, :end], self.values_BSGK[:, :end]

    def grow(self, capacity: int) -> None:
        self.keys_BSGK = _grown(self.keys_BSGK, capacity)
        self.values_BSGK = _grown(self.values_BSGK, capacity)


@dataclass
class LatentKVCache:
    """One MLA layer: per column the normed kv latent followed by the (rotated) shared key part, ``[B, S, C + R]``."""

    entries_BSE: torch.Tensor

    def write(self, start: int, entries_BTE: torch.Tensor) -> torch.Tensor:
        end = start + entries_BTE.shape[1]
        self.entries_BSE[:, start:end] = entries_BTE
        return self.entries_BSE[:, :end]

    def grow(self, capacity: int) -> None:
        self.entries_BSE = _grown(self.entries_BSE, capacity)


@dataclass
class RecurrentCache:
    """One KDA / Gated DeltaNet layer: delta-rule state and the three short-conv windows (constant size)."""

    state_BNKV: torch.Tensor  # fp32 (or wider)
    q_window_BWD: torch.Tensor  # last W - 1 inputs of q_conv1d, oldest first; zeros before the first token
    k_window_BWD: torch.Tensor
    v_window_BWD: torch.Tensor

    def grow(self, capacity: int) -> None:
        """Nothing to do: the state does not depend on the number of columns."""


LayerCache = Union[KVCache, LatentKVCache, RecurrentCache]


@dataclass
class DecodeStep:
    """What every layer needs to know about the T new columns of one ``forward`` call."""

    start: int  # column of the first new token
    token_mask_BT: torch.Tensor  # bool, real tokens among the new columns
    position_ids_BT: torch.Tensor  # int64, per-row index of each real token among the row's real tokens (0 at pads)
    visible_BTS: torch.Tensor  # bool [B, T, start + T]: which columns each new token attends to

    @property
    def has_padding(self) -> bool:
        return not bool(self.token_mask_BT.all())


class DecodeCache:
    """Per-layer decoding state of a batch plus the per-row bookkeeping shared by every layer.

    ``layers[i]`` is layer i's ``KVCache`` / ``LatentKVCache`` / ``RecurrentCache``. ``columns`` counts the
    columns consumed so far (pads included, the same for every row); ``lengths_B`` the real tokens per row;
    ``key_mask_BS`` which consumed columns are real tokens.
    """

    def __init__(self, layers: list[LayerCache], batch_size: int, capacity: int, device: torch.device):
        self.layers = layers
        self.batch_size = batch_size
        self.capacity = capacity
        self.columns = 0
        self.lengths_B = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.key_mask_BS = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)

    # --- one forward call --------------------------------------------------------------------------------------
    def begin(self, attention_mask_BT: Optional[torch.Tensor], num_new: int) -> DecodeStep:
        """Check the mask of the new columns, make room for them and describe them to the layers."""
        B, T = self.batch_size, num_new
        device = self.lengths_B.device
        if attention_mask_BT is None:
            mask_BT = torch.ones(B, T, dtype=torch.bool, device=device)
        else:
            if tuple(attention_mask_BT.shape) != (B, T):
                raise ValueError(
                    f"attention_mask must have the shape [batch={B}, new_tokens={T}] of the new input_ids when a cache "
                    f"is given (only the new columns), got {tuple(attention_mask_BT.shape)}")
            mask_BT = attention_mask_BT.to(device=device, dtype=torch.bool)
            check_left_padded(mask_BT, started_B=self.lengths_B > 0)
        start, end = self.columns, self.columns + T
        if end > self.capacity:
            self._grow(max(end, 2 * self.capacity))
        self.key_mask_BS[:, start:end] = mask_BT
        position_ids_BT = (self.lengths_B.unsqueeze(1) + mask_BT.long().cumsum(dim=1) - 1).clamp(min=0)
        columns_S = torch.arange(end, device=device)
        causal_TS = columns_S.unsqueeze(0) <= (start + torch.arange(T, device=device)).unsqueeze(1)
        visible_BTS = self.key_mask_BS[:, None, :end] & causal_TS
        # A pad query sees itself, so no softmax row is empty: its output is never used, but a NaN in a pad
        # column would reach the real queries of later layers as 0 * NaN in their weighted sums of values.
        visible_BTS[:, :, start:end] |= torch.eye(T, dtype=torch.bool, device=device)
        return DecodeStep(start=start, token_mask_BT=mask_BT, position_ids_BT=position_ids_BT, visible_BTS=visible_BTS)

    def finish(self, step: DecodeStep) -> None:
        self.columns = step.start + step.token_mask_BT.shape[1]
        self.lengths_B += step.token_mask_BT.sum(dim=1)

    def _grow(self, capacity: int) -> None:
        for layer in self.layers:
            layer.grow(capacity)
        self.key_mask_BS = _grown(self.key_mask_BS, capacity)
        self.capacity = capacity

    # --- beam search and batch surgery --------------------------------------------------------------------------
    def reorder(self, index_B: torch.Tensor) -> None:
        """Keep rows ``index_B`` (in that order, repeats allowed): beam-search reordering or dropping finished
        rows. The batch size becomes ``len(index_B)``."""
        index_B = index_B.to(self.lengths_B.device, dtype=torch.long)
        for layer in self.layers:
            for spec in fields(layer):
                setattr(layer, spec.name, getattr(layer, spec.name).index_select(0, index_B))
        self.lengths_B = self.lengths_B.index_select(0, index_B)
        self.key_mask_BS = self.key_mask_BS.index_select(0, index_B)
        self.batch_size = int(index_B.numel())

    def state_numel(self) -> list[int]:
        """Numbers held per layer (for tests and reports: a linear layer's count never changes)."""
        return [sum(getattr(layer, spec.name).numel() for spec in fields(layer)) for layer in self.layers]


def check_left_padded(mask_BT: torch.Tensor, started_B: Optional[torch.Tensor] = None) -> None:
    """Raise unless every row of the bool mask is pads then real tokens (and all real if the row ``started``)."""
    if mask_BT.shape[1] > 1 and bool((mask_BT[:, :-1] & ~mask_BT[:, 1:]).any()):
        raise ValueError("attention_mask: a pad (0) follows a real token (1) in some row; rows must be left-padded "
                         "(all pads before the first real token)")
    if started_B is not None and bool((started_B.unsqueeze(1) & ~mask_BT).any()):
        raise ValueError("attention_mask: a row that already holds real tokens in the cache got a pad (0); pads may "
                         "only precede a row's first real token")
