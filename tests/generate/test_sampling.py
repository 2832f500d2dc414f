"""``generate`` and ``next_tokens``: greedy equals the full forward's argmax, sampling honours temperature, top-p,
seed and EOS, bad arguments are refused with the field named."""

import pytest
import torch

from attnres_train.generate import GenerationError, SamplingConfig, generate, next_tokens
from attnres_train.generate.cli import TextStream
from attnres_train.data.tokenizer import ByteTokenizer
from attnres_train.model import build_model

VOCAB = 48


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, hidden_size=32, num_layers=3, hybrid_ratio=2, linear_mixer="gdn", full_mixer="gqa",
               linear_num_heads=2, linear_head_dim=8, linear_chunk_size=4, gqa_num_heads=2, gqa_num_kv_heads=1,
               gqa_head_dim=8, gqa_rope_fraction=0.5, mlp="dense", ffn_dim=32, residual="block_attnres",
               attnres_block_size=2, init_std=0.3)
    return build_model(cfg).eval()


def full_forward_greedy(model, prompt, steps):
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@torch.no_grad()
def test_greedy_batched_generation_equals_the_argmax_of_full_forwards(model):
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [40]]
    out = generate(model, prompts, SamplingConfig(max_new_tokens=6, temperature=0.0))
    assert out == [full_forward_greedy(model, p, 6) for p in prompts]


@torch.no_grad()
def test_eos_ends_a_row_and_is_not_returned(model):
    prompt = [4, 9, 2]
    greedy = full_forward_greedy(model, prompt, 5)
    eos = greedy[2]
    events = []
    out = generate(model, [prompt], SamplingConfig(max_new_tokens=5, temperature=0.0), eos_token_id=eos,
                   on_token=lambda row, token: events.append((row, token)))
    assert out == [greedy[: greedy.index(eos)]]
    assert events == [(0, t) for t in out[0]] + [(0, None)]



@torch.no_grad()
def test_on_token_can_end_one_row_early_and_the_row_leaves_the_batch(model):
    prompts = [[4, 9, 2], [7, 7]]
    greedy = [full_forward_greedy(model, p, 5) for p in prompts]
    events = []

    def stop_row_one_at_its_second_token(row, token):
        events.append((row, token))
        return row == 1 and sum(1 for r, t in events if r == 1 and t is not None) == 2

    batch_sizes = []
    hook = model.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    try:
        out = generate(model, prompts, SamplingConfig(max_new_tokens=5, temperature=0.0),
                       on_token=stop_row_one_at_its_second_token)
    finally:
        hook.remove()
    assert out == [greedy[0], greedy[1][:2]]
    assert [t for r, t in events if r == 1] == greedy[1][:2] + [None]
    # prefill and the first decode step with both rows; once row 1 has ended, row 0 decodes alone
    assert batch_sizes == [2, 2, 1, 1, 1]


@torch.no_grad()
def test_sampling_is_reproducible_per_seed_and_top_p_near_zero_is_greedy(model):
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    sampled = SamplingConfig(max_new_tokens=8, temperature=1.5, seed=7)
    first = generate(model, prompts, sampled)
    assert generate(model, prompts, sampled) == first
    others = [generate(model, prompts, SamplingConfig(max_new_tokens=8, temperature=1.5, seed=s)) for s in (8, 9)]
    assert any(o != first for o in others)
    nucleus_of_one = SamplingConfig(max_new_tokens=8, temperature=1.5, top_p=1e-6, seed=7)
    assert generate(model, prompts, nucleus_of_one) == generate(model, prompts, SamplingConfig(8, temperature=0))


def test_top_p_draws_only_from_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    draws = {int(next_tokens(logits, SamplingConfig(temperature=1.0, top_p=0.7), generator)) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 < 0.7 needs the second token; the mass before the third is 0.8 >= 0.7


@pytest.mark.parametrize("kwargs,field", [
    (dict(temperature=-0.5), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(max_new_tokens=0), "max_new_tokens"),
])
def test_bad_sampling_settings_name_the_field(kwargs, field):
    with pytest.raises(GenerationError, match=field):
        SamplingConfig(**kwargs)


def test_empty_prompt_is_refused(model):
    with pytest.raises(GenerationError, match="prompt #2 is empty"):
        generate(model, [[1], []], SamplingConfig(max_new_tokens=1))


def test_text_stream_holds_back_an_incomplete_utf8_character():
    stream = TextStream(ByteTokenizer())
    pieces = [stream.push(b) for b in "aé€".encode("utf-8")]
    assert pieces == ["a", "", "é", "", "", "€"]
    assert stream.push(0xC3) == "" and stream.flush() == "\ufffd"
