"""``AttnResForCausalLM``: the decoder as a transformers ``PreTrainedModel`` with ``generate()``.

Every configuration this package trains (Block/Full AttnRes, Gated DeltaNet, gated GQA, softmax routing, ...)
loads with ``AutoModelForCausalLM.from_pretrained(DIR)`` once ``attnres_train`` is imported (the Auto classes
are registered then, see ``registration.py``). The weights are the decoder's own state dict under ``model.``.

Padding: ``attention_mask`` (1 = token, 0 = padding, left or right) becomes document ids, so each row's real
tokens form one document and padding another: no real token attends to, or carries recurrent state from, a
padding position, and positions (RoPE in gated GQA) restart at the first real token.

Decoding: no cache yet; each ``generate()`` step runs the full sequence again (``prepare_inputs_for_generation``
keeps the whole prefix when ``cache`` is None). A decode cache plugs into ``forward``'s ``cache`` argument.

Shape legend: B batch, T tokens, V vocabulary.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from attnres_train.model import HybridDecoder
from attnres_train.model.moe import MoE

from .hf_config import AttnResConfig

IGNORE_INDEX = -100


def doc_ids_from_attention_mask(attention_mask_BT: torch.Tensor) -> torch.Tensor:
    """A new document wherever the mask switches between padding and tokens: ``[0, 0, 1, 1] -> [0, 0, 1, 1]``,
    ``[1, 1, 0] -> [0, 0, 1]``."""
    mask_BT = attention_mask_BT.to(torch.long)
    switches_BT = torch.zeros_like(mask_BT)
    switches_BT[:, 1:] = (mask_BT[:, 1:] != mask_BT[:, :-1]).to(torch.long)
    return switches_BT.cumsum(dim=1)


class AttnResForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = AttnResConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["DecoderLayer"]

    def __init__(self, config: AttnResConfig):
        super().__init__(config)
        self.model = HybridDecoder(config.model_config())
        if config.tie_word_embeddings:
            self._tied_weights_keys = {"model.lm_head.weight": "model.embed_tokens.weight"}
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # transformers' DynamicCache does not hold recurrent or latent states

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
        cache: Optional[Any] = None,
        use_cache: Optional[bool] = None,
        labels: Optional[torch.LongTensor] = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """``input_ids [B, T]``; ``attention_mask [B, T]`` (optional, padding anywhere); ``labels [B, T]`` gives
        the mean next-token loss (``-100`` ignored; shifted inside, as in transformers). ``cache`` (alias
        ``past_key_values``) and ``use_cache`` are accepted for generate(); no cache is kept yet, so the whole
        sequence must be passed each call. ``logits_to_keep`` > 0 returns only the last that many positions."""
        if cache is not None:
            raise ValueError("AttnResForCausalLM keeps no decode cache yet: pass the whole sequence with cache=None")
        doc_ids_BT = None
        if attention_mask is not None and not bool(attention_mask.all()):
            doc_ids_BT = doc_ids_from_attention_mask(attention_mask)
        logits_BTV = self.model(input_ids, doc_ids=doc_ids_BT).logits
        loss = None
        if labels is not None:
            shifted_BT = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
            loss = F.cross_entropy(logits_BTV.float().flatten(0, 1), shifted_BT.flatten(), ignore_index=IGNORE_INDEX)
        if logits_to_keep:
            logits_BTV = logits_BTV[:, -logits_to_keep:]
        return CausalLMOutputWithPast(loss=loss, logits=logits_BTV, past_key_values=None)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, next_sequence_length: Optional[int] = None,
                                      cache: Optional[Any] = None, **kwargs: Any) -> dict:
        if cache is None:  # no decode cache: every step sees the whole sequence
            next_sequence_length = None
        inputs = super().prepare_inputs_for_generation(input_ids, next_sequence_length=next_sequence_length,
                                                       cache=cache, **kwargs)
        inputs.pop("position_ids", None)  # positions follow from attention_mask (per-document)
        return inputs
