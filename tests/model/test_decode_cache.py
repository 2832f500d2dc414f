"""Incremental decoding with ``DecodeCache``: every mixer x residual combination gives, token by token and with
left-padded batches, what a full forward of each sequence alone gives; linear layers keep constant-size state."""

import itertools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from attnres_train.model import build_model

LINEAR = ("kda", "gdn")
FULL = ("mla", "gqa")
RESIDUALS = ("standard", "full_attnres", "block_attnres")
COMBINATIONS = list(itertools.product(LINEAR, FULL, RESIDUALS))
VOCAB = 64


def tiny_config(linear: str, full: str, residual: str, **overrides) -> dict:
    cfg = dict(
        vocab_size=VOCAB, hidden_size=32, num_layers=4, hybrid_ratio=1, linear_mixer=linear, full_mixer=full,
        linear_num_heads=2, linear_head_dim=8, linear_chunk_size=4, linear_num_v_heads=4, linear_expand_v=1.5,
        mla_num_heads=2, mla_kv_lora_rank=12, mla_qk_nope_head_dim=8, mla_qk_rope_head_dim=4, mla_use_rope=True,
        mla_v_head_dim=6, gqa_num_heads=4, gqa_num_kv_heads=2, gqa_head_dim=8, gqa_rope_fraction=0.5,
        mlp="moe", first_dense_layers=1, ffn_dim=32, num_experts=4, top_k=2, expert_ffn_dim=16,
        residual=residual, attnres_block_size=3,
        init_std=0.3,  # large weights: logits far from uniform, so an argmax tie cannot hide a wrong state
    )
    cfg.update(overrides)
    return cfg


def tiny_model(linear="kda", full="mla", residual="block_attnres", seed=0, **overrides):
    torch.manual_seed(seed)
    return build_model(tiny_config(linear, full, residual, **overrides)).eval()


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def random_prompts(lengths, seed=1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("linear,full,residual", COMBINATIONS)
@torch.no_grad()
def test_greedy_decoding_with_a_cache_equals_the_full_forward_argmax(linear, full, residual):
    model = tiny_model(linear, full, residual)
    prompts = random_prompts([3, 9, 6])
    ids, mask = left_padded(prompts)
    # max_length below what is needed: the attention caches must grow mid-generation.
    cache = model.new_cache(len(prompts), max_length=8)
    prefill_logits = model(ids, attention_mask=mask, cache=cache).logits
    generated = [[] for _ in prompts]
    step_logits = [[] for _ in prompts]
    logits_BV = prefill_logits[:, -1]
    for _ in range(7):
        next_B = logits_BV.argmax(-1)
        for row in range(len(prompts)):
            generated[row].append(int(next_B[row]))
            step_logits[row].append(logits_BV[row])
        logits_BV = model(next_B[:, None], cache=cache).logits[:, -1]

    for row, prompt in enumerate(prompts):
        sequence = torch.tensor([prompt + generated[row]])
        full_logits = model(sequence).logits[0]
        n = len(prompt)
        # Every prompt position of the padded prefill equals the forward of the prompt alone.
        torch.testing.assert_close(prefill_logits[row, -n:], full_logits[:n], atol=1e-4, rtol=1e-4)
        # Every generated token is the argmax of the full forward at its position, with the same logits.
        reference = full_logits[n - 1 : n - 1 + len(generated[row])]
        assert reference.argmax(-1).tolist() == generated[row]
        torch.testing.assert_close(torch.stack(step_logits[row]), reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("linear,full,residual", COMBINATIONS)
@torch.no_grad()
def test_prefill_in_chunks_then_decode_equals_the_full_forward_logits(linear, full, residual):
    model = tiny_model(linear, full, residual, seed=2)
    sequence = torch.tensor(random_prompts([24], seed=3))
    reference = model(sequence).logits
    cache = model.new_cache(1, max_length=32)
    pieces, start = [], 0
    for size in (9, 1, 5, 2, 1, 6):  # chunks longer and shorter than the delta rule's chunk of 4
        pieces.append(model(sequence[:, start : start + size], cache=cache).logits)
        start += size
    assert start == sequence.shape[1] and cache.columns == start
    torch.testing.assert_close(torch.cat(pieces, dim=1), reference, atol=1e-4, rtol=1e-4)  # fp32 chunk order


@torch.no_grad()
def test_linear_layer_state_and_decode_flops_do_not_depend_on_the_context():
    model = tiny_model(layer_pattern="LLLL")
    flops = []
    for context in (8, 96):
        cache = model.new_cache(2, max_length=context + 1)
        sizes_before = cache.state_numel()
        model(torch.randint(0, VOCAB, (2, context)), cache=cache)
        assert cache.state_numel() == sizes_before  # nothing accumulates per token
        with FlopCounterMode(display=False) as counter:
            model(torch.randint(0, VOCAB, (2, 1)), cache=cache)
        flops.append(counter.get_total_flops())
    assert flops[0] == flops[1] > 0

    attention = tiny_model(layer_pattern="FFFF")
    flops = []
    for context in (8, 96):
        cache = attention.new_cache(2, max_length=context + 1)
        attention(torch.randint(0, VOCAB, (2, context)), cache=cache)
        with FlopCounterMode(display=False) as counter:
            attention(torch.randint(0, VOCAB, (2, 1)), cache=cache)
        flops.append(counter.get_total_flops())
    assert flops[1] > flops[0]  # the counter does see attention grow: the flat line above means something


@torch.no_grad()
def test_reordering_the_cache_continues_the_selected_rows():
    model = tiny_model("gdn", "gqa", "full_attnres")
    prompts = random_prompts([5, 8], seed=4)
    ids, mask = left_padded(prompts)
    cache = model.new_cache(2, max_length=16)
    model(ids, attention_mask=mask, cache=cache)
    cache.reorder(torch.tensor([1, 1, 0]))  # beam-search style: rows repeated and swapped
    next_ids = torch.tensor([[7], [9], [11]])
    logits = model(next_ids, cache=cache).logits[:, -1]
    for row, (source, token) in enumerate(zip((1, 1, 0), (7, 9, 11))):
        reference = model(torch.tensor([prompts[source] + [token]])).logits[0, -1]
        torch.testing.assert_close(logits[row], reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_attention_mask_without_a_cache_equals_each_row_alone(side):
    model = tiny_model("kda", "gqa", "block_attnres")
    prompts = random_prompts([4, 10, 7], seed=5)
    ids, mask = left_padded(prompts)
    if side == "right":
        ids = torch.stack([torch.roll(r, -int((m == 0).sum())) for r, m in zip(ids, mask)])
        mask = torch.stack([torch.roll(m, -int((m == 0).sum())) for m in mask])
    logits = model(ids, attention_mask=mask).logits
    for row, prompt in enumerate(prompts):
        reference = model(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(logits[row][mask[row].bool()], reference, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_bad_masks_and_arguments_are_refused_with_a_reason():
    model = tiny_model()
    cache = model.new_cache(2, max_length=8)
    with pytest.raises(ValueError, match="left-padded"):
        model(torch.zeros(2, 3, dtype=torch.long), attention_mask=torch.tensor([[1, 0, 1], [1, 1, 1]]), cache=cache)
    with pytest.raises(ValueError, match="new_tokens=3"):
        model(torch.zeros(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 5), cache=cache)
    with pytest.raises(ValueError, match="rows but the cache holds 2"):
        model(torch.zeros(3, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="doc_ids"):
        model(torch.zeros(2, 3, dtype=torch.long), doc_ids=torch.zeros(2, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="between real tokens"):
        model(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.tensor([[1, 0, 0, 1]]))
    model(torch.zeros(2, 2, dtype=torch.long), attention_mask=torch.tensor([[0, 1], [1, 1]]), cache=cache)
    with pytest.raises(ValueError, match="already holds real tokens"):
        model(torch.zeros(2, 1, dtype=torch.long), attention_mask=torch.tensor([[0], [1]]), cache=cache)
