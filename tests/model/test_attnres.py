"""Attention Residuals: checked against a direct, slow transcription of the paper's equations.

The transcription below loops over sublayers, sources and tokens with no shared code from the model: it only
borrows the sublayer functions f_l (mixer / MLP with their pre-norms) as black boxes, because what AttnRes
defines is how those outputs are wired, not the sublayers themselves.
"""

import math

import pytest
import torch

from attnres_train.model import build_model

BASE = dict(
    vocab_size=50,
    hidden_size=32,
    num_layers=3,
    hybrid_ratio=1,
    linear_mixer="kda",
    full_mixer="gqa",
    linear_num_heads=2,
    linear_head_dim=16,
    linear_chunk_size=8,
    gqa_num_heads=2,
    gqa_num_kv_heads=1,
    gqa_head_dim=16,
    gqa_rope_fraction=0.5,
    mlp="dense",
    ffn_dim=48,
)


def _model(**overrides):
    torch.manual_seed(0)
    model = build_model({**BASE, **overrides}).double()
    return model


def _randomise_attnres(model, seed=1):
    """Non-zero queries and key-norm weights, so the softmax is not uniform and key norms matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "attnres" in name and name.endswith("query"):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
            elif "attnres" in name and "key_norm_weight" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _paper_rmsnorm(v, weight, eps):
    # RMSNorm(v) = v / sqrt(mean(v^2) + eps) * g, per token
    out = torch.empty_like(v)
    for b in range(v.shape[0]):
        for t in range(v.shape[1]):
            vec = v[b, t]
            out[b, t] = vec / math.sqrt(float((vec * vec).mean()) + eps) * weight
    return out


def _paper_mix(sources, attnres, eps):
    """h = sum_i softmax_i(w . RMSNorm(v_i)) v_i, token by token."""
    q = attnres.query
    g = attnres.key_norm_weight
    keys = [_paper_rmsnorm(v, g, eps) for v in sources]
    B, T, D = sources[0].shape
    h = torch.zeros(B, T, D, dtype=sources[0].dtype)
    for b in range(B):
        for t in range(T):
            logits = torch.stack([(q * k[b, t]).sum() for k in keys])  # no 1/sqrt(d)
            alpha = torch.exp(logits - logits.max())
            alpha = alpha / alpha.sum()
            for i, v in enumerate(sources):
                h[b, t] += alpha[i] * v[b, t]  # raw values
    return h


def _sublayers(model):
    out = []
    for layer in model.layers:
        out.append((layer.mixer_attnres, lambda h, layer=layer: layer.mixer_sublayer(h, None)))
        out.append((layer.mlp_attnres, lambda h, layer=layer: layer.mlp_sublayer(h)[0]))
    return out


def paper_full_attnres(model, input_ids):
    eps = model.config.norm_eps
    v = [model.embed_tokens(input_ids)]  # v_0 = embedding
    for attnres, f in _sublayers(model):
        h = _paper_mix(v, attnres, eps)
        v.append(f(h))  # output before any residual add
    h = _paper_mix(v, model.final_attnres, eps)
    return model.lm_head(model.final_norm(h))


def paper_block_attnres(model, input_ids, block_size):
    eps = model.config.norm_eps
    blocks = [model.embed_tokens(input_ids)]  # b_0 = embedding
    partial = None
    for l, (attnres, f) in enumerate(_sublayers(model)):
        sources = blocks + ([partial] if partial is not None else [])
        out = f(_paper_mix(sources, attnres, eps))
        partial = out if partial is None else partial + out
        if (l + 1) % block_size == 0:
            blocks.append(partial)  # b_n = plain sum of the block's outputs
            partial = None
    sources = blocks + ([partial] if partial is not None else [])
    h = _paper_mix(sources, model.final_attnres, eps)
    return model.lm_head(model.final_norm(h))


def test_zero_init_gives_uniform_depth_weights():
    model = _model(residual="block_attnres", attnres_block_size=2)
    ids = torch.randint(0, 50, (2, 12))
    out = model(ids, return_diagnostics=True)
    assert len(out.depth_weights) == 2 * model.config.num_layers + 1
    for weights in out.depth_weights:
        n = weights.numel()
        torch.testing.assert_close(weights, torch.full((n,), 1.0 / n, dtype=weights.dtype))


def test_init_pass_keeps_queries_zero():
    model = _model(residual="full_attnres")
    _randomise_attnres(model)
    model.reset_parameters()
    queries = [p for n, p in model.named_parameters() if n.endswith("attnres.query") or "attnres.query" in n]
    assert len(queries) == 2 * model.config.num_layers + 1
    assert all(torch.count_nonzero(q) == 0 for q in queries)


def test_full_attnres_matches_paper_transcription():
    model = _model(residual="full_attnres")
    _randomise_attnres(model)
    ids = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        expected = paper_full_attnres(model, ids)
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("block_size", [2, 4, 5])
def test_block_attnres_matches_paper_transcription(block_size):
    # 6 sublayers: block_size 4 and 5 leave a shorter last block
    model = _model(residual="block_attnres", attnres_block_size=block_size)
    _randomise_attnres(model, seed=block_size)
    ids = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        expected = paper_block_attnres(model, ids, block_size)
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_block_size_one_equals_full():
    full = _model(residual="full_attnres")
    block = _model(residual="block_attnres", attnres_block_size=1)
    _randomise_attnres(full)
    block.load_state_dict(full.state_dict())
    ids = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(block(ids).logits, full(ids).logits, rtol=1e-12, atol=1e-12)


def test_block_attnres_differs_from_standard_residual():
    """Guards the test above against a wiring that ignores the residual mode."""
    attn = _model(residual="block_attnres", attnres_block_size=2)
    std = _model(residual="standard")
    std.load_state_dict(attn.state_dict(), strict=False)
    ids = torch.randint(0, 50, (1, 8))
    with torch.no_grad():
        assert not torch.allclose(attn(ids).logits, std(ids).logits)


@pytest.mark.parametrize("residual", ["full_attnres", "block_attnres"])
def test_gradients_reach_every_pseudo_query(residual):
    model = _model(residual=residual, attnres_block_size=2)
    ids = torch.randint(0, 50, (2, 10))
    model(ids).logits.pow(2).mean().backward()
    queries = {n: p for n, p in model.named_parameters() if "attnres" in n and n.endswith("query")}
    assert len(queries) == 2 * model.config.num_layers + 1
    # The very first sublayer mixes a single source (the embedding): its softmax is constant 1, so its
    # query's gradient is zero by the equations. Every other query must receive gradient.
    first = queries.pop("layers.0.mixer_attnres.query")
    assert first.grad is not None and torch.count_nonzero(first.grad) == 0
    for name, q in queries.items():
        assert q.grad is not None and torch.count_nonzero(q.grad) > 0, name


def test_no_source_is_detached():
    """The embedding (b_0) must receive gradient through every AttnRes path, including the final mix."""
    model = _model(residual="block_attnres", attnres_block_size=2)
    ids = torch.randint(0, 50, (1, 6))
    emb = model.embed_tokens(ids).detach().requires_grad_(True)
    stream = model.residual.begin(emb)
    for layer in model.layers:
        layer(stream, model.residual, None, [])
    h = model.residual.final(stream, model.final_attnres)
    (g,) = torch.autograd.grad(h.sum(), emb)
    assert torch.count_nonzero(g) > 0


def test_diagnostics_report_hidden_rms_per_sublayer():
    model = _model(residual="standard")
    out = model(torch.randint(0, 50, (1, 8)), return_diagnostics=True)
    assert out.sublayer_input_rms.shape == (2 * model.config.num_layers,)
    assert torch.all(out.sublayer_input_rms > 0)
