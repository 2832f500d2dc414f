"""Autoregressive generation with a ``DecodeCache``: one prefill of the left-padded prompts, then one decode step
per new token. Greedy (temperature 0) or sampled (temperature, nucleus top-p), stopping at EOS per row.

Shape legend: B prompts (rows), L longest prompt, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch


class GenerationError(ValueError):
    """Bad generation input (argument, prompt or model path); the message names it."""


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy (argmax)
    top_p: float = 1.0  # nucleus: sample among the most likely tokens whose probabilities add up to top_p
    seed: int = 0  # seeds the sampling generator; equal seeds give equal text for the same batch

    def __post_init__(self) -> None:
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise GenerationError(f"max_new_tokens={self.max_new_tokens!r}: expected an integer >= 1")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise GenerationError(f"temperature={self.temperature!r}: expected a finite float >= 0 (0 = greedy)")
        if not (0.0 < self.top_p <= 1.0):
            raise GenerationError(f"top_p={self.top_p!r}: expected a float in (0, 1]")


def next_tokens(logits_BV: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator) -> torch.Tensor:
    """One token per row ``[B]``: argmax at temperature 0, else a draw from the tempered, top-p-truncated softmax."""
    if sampling.temperature == 0:
        return logits_BV.argmax(dim=-1)
    probs_BV = torch.softmax(logits_BV.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
        # Keep a token when the mass before it is still short of top_p: the most likely token always stays.
        keep_BV = (sorted_BV.cumsum(dim=-1) - sorted_BV) < sampling.top_p
        probs_BV = torch.zeros_like(probs_BV).scatter(-1, order_BV, sorted_BV * keep_BV)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    eos_token_id: Optional[int] = None,
    on_token: Optional[Callable[[int, Optional[int]], Optional[bool]]] = None,
) -> list[list[int]]:
    """Continue every prompt (token ids) by up to ``sampling.max_new_tokens`` tokens, batched.

    Returns the new tokens of each row, without the EOS that ended it. ``on_token(row, token)`` is called as each
    token is produced, and once with ``token=None`` when a row ends (EOS or the token limit), so callers can
    stream; it may return True to end that row after this token (a stop string). A row that ended leaves the batch
    and its cache (``DecodeCache.reorder``), so the rows still running decode alone.
    """
    if not prompts:
        raise GenerationError("no prompts given")
    for index, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise GenerationError(f"prompt #{index + 1} is empty: a continuation needs at least one token")
    device = model.embed_tokens.weight.device
    B, L = len(prompts), max(len(p) for p in prompts)
    ids_BL = torch.zeros(B, L, dtype=torch.long, device=device)
    mask_BL = torch.zeros(B, L, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        ids_BL[row, L - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.long, device=device)
        mask_BL[row, L - len(prompt):] = True
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    cache = model.new_cache(B, L + sampling.max_new_tokens)
    logits_BV = model(ids_BL, attention_mask=mask_BL, cache=cache, logits_to_keep=1).logits[:, -1]

    outputs: list[list[int]] = [[] for _ in range(B)]
    rows = list(range(B))  # the prompt row of each row of the batch still decoding
    for step in range(sampling.max_new_tokens):
        token_B = next_tokens(logits_BV, sampling, generator)
        last_step = step == sampling.max_new_tokens - 1
        still_running = []
        for position, (row, token) in enumerate(zip(rows, token_B.tolist())):
            running = token != eos_token_id
            if running:
                outputs[row].append(token)
                stop_here = on_token is not None and bool(on_token(row, token))
                running = not (last_step or stop_here)
            if running:
                still_running.append(position)
            elif on_token is not None:
                on_token(row, None)
        if not still_running:
            break
        if len(still_running) < len(rows):
            keep = torch.tensor(still_running, device=device)
            cache.reorder(keep)
            token_B = token_B.index_select(0, keep)
            rows = [rows[position] for position in still_running]
        logits_BV = model(token_B[:, None], cache=cache).logits[:, -1]
    return outputs
