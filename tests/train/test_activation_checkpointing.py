import copy

import pytest
import torch

from attnres_train.model import build_model
from attnres_train.train.activation_checkpointing import apply_activation_checkpointing

TINY = dict(
    vocab_size=40, hidden_size=32, num_layers=2, hybrid_ratio=1, linear_num_heads=2, linear_head_dim=16,
    linear_chunk_size=8, mla_num_heads=2, mla_kv_lora_rank=16, mla_qk_nope_head_dim=16, mla_v_head_dim=16,
    num_experts=4, top_k=2, expert_ffn_dim=16, attnres_block_size=2, moe_aux_loss_coef=0.01,
)


@pytest.mark.parametrize("impl", ["torch", "fused"])  # fused: the pre-norm comes in from the AttnRes merge
def test_checkpointed_model_gives_identical_loss_gradients_and_moe_counts(impl):
    torch.manual_seed(0)
    plain = build_model({**TINY, "attnres_impl": impl}).train()
    wrapped = copy.deepcopy(plain)
    assert apply_activation_checkpointing(wrapped) == 4
    ids = torch.randint(0, 40, (2, 24))
    doc_ids = (torch.arange(24) >= 10).long().expand(2, -1)
    losses = []
    for model in (plain, wrapped):
        out = model(ids, doc_ids=doc_ids)
        loss = out.logits.float().logsumexp(-1).mean() + out.aux_loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    for (name, p), q in zip(plain.named_parameters(), wrapped.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=name)
    for a, b in zip(plain.moe_layers(), wrapped.moe_layers()):
        assert torch.equal(a.tokens_per_expert, b.tokens_per_expert)
