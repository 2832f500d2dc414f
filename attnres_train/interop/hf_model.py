"""``AttnResForCausalLM``: the decoder as a transformers ``PreTrainedModel`` with ``generate()``.

Every configuration this package trains (Block/Full AttnRes, Gated DeltaNet, gated GQA, softmax routing, ...)
loads with ``AutoModelForCausalLM.from_pretrained(DIR)`` once ``attnres_train`` is imported (the Auto classes
are registered then, see ``registration.py``). The weights are the decoder's own state dict under ``model.``.

Decoding: ``generate()`` keeps this package's ``DecodeCache`` (``attnres_train.model.cache``: latent or expanded
K/V for attention layers, recurrent plus short-conv state of constant size for linear layers). ``forward`` builds
it on the prefill when ``use_cache=True`` and returns it as ``cache``; later calls pass only the new tokens.
transformers hands over the mask of the whole sequence ``[B, past + T]``; the decoder is given only its last T
columns. Beam search reorders the cache through ``_reorder_cache``. Assisted generation would need a cache that
can be rolled back, which a recurrent state is not: it is refused (``_is_stateful``). ``use_cache=False`` runs
the whole sequence every step (slower, same tokens).

Padding: rows are left-padded (``attention_mask`` 1 = token, 0 = padding). Pads are invisible: no real token
attends to, or carries recurrent state from, a padding position, and positions (RoPE in gated GQA) count real
tokens only. Without a cache right padding works too (pads become a document of their own).

Shape legend: B batch, T tokens, V vocabulary.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from attnres_train.model import HybridDecoder
from attnres_train.model.cache import DecodeCache
from attnres_train.model.loss import IGNORE_INDEX, language_model_loss
from attnres_train.model.moe import MoE

from .hf_config import AttnResConfig

def new_columns_mask(attention_mask_BS: Optional[torch.Tensor], cache: DecodeCache, num_new: int):
    """The mask of the ``num_new`` new columns: transformers passes the whole sequence's (``cache.columns +
    num_new`` wide), callers of the decoder may pass the new columns' only."""
    if attention_mask_BS is None:
        return None
    width = attention_mask_BS.shape[-1]
    if width == cache.columns + num_new:
        return attention_mask_BS[:, -num_new:]
    if width == num_new:
        return attention_mask_BS
    raise ValueError(f"attention_mask has {width} columns; with a cache holding {cache.columns} columns and "
                     f"{num_new} new tokens expected {cache.columns + num_new} (whole sequence) or {num_new} (new only)")


class AttnResForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = AttnResConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["DecoderLayer"]
    _is_stateful = True  # a recurrent state cannot be rolled back to an earlier token (assisted generation)

    def __init__(self, config: AttnResConfig):
        super().__init__(config)
        self.model = HybridDecoder(config.model_config())
        if config.tie_word_embeddings:
            self._tied_weights_keys = {"model.lm_head.weight": "model.embed_tokens.weight"}
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # transformers' DynamicCache does not hold recurrent or latent states: forward builds ours

    def _init_weights(self, module: torch.nn.Module) -> None:
        # The decoder initialises itself; only the non-persistent MoE load counters are not in a checkpoint.
        if isinstance(module, MoE):
            module.tokens_per_expert.zero_()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.lm_head

    def set_output_embeddings(self, value: torch.nn.Module) -> None:
        self.model.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.Tensor] = None,
        cache: Optional[DecodeCache] = None,
        use_cache: Optional[bool] = None,
        labels: Optional[torch.LongTensor] = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """``input_ids [B, T]``; ``attention_mask`` (optional) ``[B, T]``, or ``[B, past + T]`` with a cache;
        ``labels [B, T]`` gives the mean next-token loss (``-100`` ignored; shifted inside, as in transformers).
        ``use_cache=True`` without a cache starts one (returned as ``cache``, alias ``past_key_values``);
        with ``cache`` the T tokens continue the cached rows. ``logits_to_keep`` > 0 returns only the last that
        many positions."""
        if cache is None:
            cache = kwargs.pop("past_key_values", None)  # the name before transformers 5.24
        if cache is None and use_cache and labels is None:
            cache = self.model.new_cache(input_ids.shape[0], input_ids.shape[1])
        if cache is not None:
            if not isinstance(cache, DecodeCache):
                raise TypeError(f"cache must be the DecodeCache this model returned, got {type(cache).__name__}")
            if labels is not None:
                raise ValueError("labels cannot be combined with a decode cache: compute a loss with use_cache=False")
            mask_BT = new_columns_mask(attention_mask, cache, input_ids.shape[1])
            logits_BTV = self.model(input_ids, attention_mask=mask_BT, cache=cache,
                                    logits_to_keep=logits_to_keep).logits
            return CausalLMOutputWithPast(logits=logits_BTV, cache=cache)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # the unpadded (faster) path
        logits_BTV = self.model(input_ids, attention_mask=attention_mask,
                                logits_to_keep=0 if labels is not None else logits_to_keep).logits
        loss = None
        if labels is not None:
            shifted_BT = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
            loss = language_model_loss(logits_BTV, shifted_BT)
            if logits_to_keep:
                logits_BTV = logits_BTV[:, -logits_to_keep:]
        return CausalLMOutputWithPast(loss=loss, logits=logits_BTV)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, **kwargs: Any) -> dict:
        inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        inputs.pop("position_ids", None)  # positions follow from the mask (real tokens only) and the cache
        return inputs

    def _reorder_cache(self, cache: DecodeCache, beam_idx: torch.Tensor) -> DecodeCache:
        """Beam search: row i of the next step continues row ``beam_idx[i]``."""
        cache.reorder(beam_idx)
        return cache
