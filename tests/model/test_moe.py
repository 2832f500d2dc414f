"""MoE, grouped GEMM and SwiGLU against slow, independent per-token references.

Tensor suffixes: B batch, T sequence, D hidden, N tokens, E experts, K top_k, F expert width, M rows.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from attnres_train.model import grouped_gemm
from attnres_train.model.grouped_gemm import grouped_mm, native_grouped_mm_available
from attnres_train.model.mlp import SwiGLU
from attnres_train.model.moe import MoE

needs_native = pytest.mark.skipif(not native_grouped_mm_available(), reason="torch._grouped_mm not in this build")


def make_moe(dtype=torch.float64, seed=0, **overrides) -> MoE:
    torch.manual_seed(seed)
    kwargs = dict(hidden_size=16, num_experts=6, top_k=2, expert_ffn_dim=8, num_shared_experts=1)
    kwargs.update(overrides)
    moe = MoE(**kwargs)
    moe.reset_parameters(init_std=0.3)  # large enough that routing is far from ties
    return moe.to(dtype)


def reference_moe(moe: MoE, x_BTD: torch.Tensor) -> tuple[torch.Tensor, list[list[int]]]:
    """Token by token: explicit scores, biased top-k by sorting, each chosen expert's SwiGLU, weighted sum."""
    with torch.no_grad():
        return _reference_moe(moe, x_BTD)


def _reference_moe(moe: MoE, x_BTD: torch.Tensor) -> tuple[torch.Tensor, list[list[int]]]:
    x_ND = x_BTD.reshape(-1, moe.hidden_size).double()
    outputs, chosen = [], []
    for x_D in x_ND:
        logits_E = moe.gate.weight.double() @ x_D
        scores_E = torch.sigmoid(logits_E) if moe.router_score == "sigmoid" else torch.softmax(logits_E, dim=0)
        biased_E = scores_E + moe.expert_bias.double()
        experts = sorted(range(moe.num_experts), key=lambda e: -float(biased_E[e]))[: moe.top_k]
        chosen.append(sorted(experts))
        total = sum(float(scores_E[e]) for e in experts)
        y_D = torch.zeros_like(x_D)
        for e in experts:
            h_F = F.silu(x_D @ moe.w_gate[e].double()) * (x_D @ moe.w_up[e].double())
            y_D = y_D + (float(scores_E[e]) / total) * moe.routed_scaling_factor * (h_F @ moe.w_down[e].double())
        if moe.shared_experts is not None:
            s = moe.shared_experts
            h = F.silu(s.gate_proj.weight.double() @ x_D) * (s.up_proj.weight.double() @ x_D)
            y_D = y_D + s.down_proj.weight.double() @ h
        outputs.append(y_D)
    return torch.stack(outputs).view(x_BTD.shape), chosen


# ---------------------------------------------------------------------------------------------------- MoE
@pytest.mark.parametrize("router_score", ["sigmoid", "softmax"])
@pytest.mark.parametrize("num_shared_experts", [0, 1, 2])
def test_moe_matches_per_token_reference(router_score, num_shared_experts):
    moe = make_moe(router_score=router_score, num_shared_experts=num_shared_experts, routed_scaling_factor=1.7)
    with torch.no_grad():
        moe.expert_bias.copy_(torch.tensor([0.0, 0.05, -0.05, 0.1, 0.0, -0.1]))
    x_BTD = torch.randn(3, 5, 16, dtype=torch.float64)
    moe.train()
    y_BTD, aux = moe(x_BTD)
    expected_BTD, chosen = reference_moe(moe, x_BTD)
    torch.testing.assert_close(y_BTD, expected_BTD, rtol=1e-10, atol=1e-12)
    assert aux is None
    # Dropless: every token counted for exactly top_k distinct routed experts, the same ones as the reference.
    counts_E = torch.zeros(moe.num_experts)
    for experts in chosen:
        assert len(set(experts)) == moe.top_k
        counts_E[experts] += 1
    torch.testing.assert_close(moe.tokens_per_expert, counts_E)
    assert moe.tokens_per_expert.sum() == 15 * moe.top_k


def test_route_scores_and_combine_weights_sigmoid_and_softmax():
    x_ND = torch.randn(7, 16, dtype=torch.float64)
    for router_score, score_fn in [("sigmoid", torch.sigmoid), ("softmax", lambda z: torch.softmax(z, -1))]:
        moe = make_moe(router_score=router_score, routed_scaling_factor=2.5)
        scores_NE, ids_NK, weights_NK = moe.route(x_ND)
        expected_scores = score_fn(x_ND @ moe.gate.weight.T)
        torch.testing.assert_close(scores_NE, expected_scores)
        assert torch.equal(ids_NK.sort(-1).values, expected_scores.topk(2, -1).indices.sort(-1).values)
        torch.testing.assert_close(weights_NK.sum(-1), torch.full((7,), 2.5, dtype=torch.float64))
        # A bf16 module still routes in fp32.
        bf16_scores_NE, _, bf16_weights_NK = moe.bfloat16().route(x_ND.bfloat16())
        assert bf16_scores_NE.dtype == torch.float32 and bf16_weights_NK.dtype == torch.float32


def test_expert_bias_changes_selection_not_combine_weights():
    moe = make_moe(num_experts=6, top_k=2)
    x_ND = torch.randn(20, 16, dtype=torch.float64)
    scores_NE, ids_NK, _ = moe.route(x_ND)
    favoured = int(scores_NE.mean(0).argmin())  # the expert the router likes least
    assert (ids_NK == favoured).any(-1).float().mean() < 1
    with torch.no_grad():
        moe.expert_bias[favoured] = 10.0
    biased_scores_NE, ids_NK, weights_NK = moe.route(x_ND)
    assert (ids_NK == favoured).any(-1).all()  # selected for every token
    torch.testing.assert_close(biased_scores_NE, scores_NE)  # the scores themselves are unbiased
    selected_NK = scores_NE.gather(1, ids_NK)
    torch.testing.assert_close(weights_NK, selected_NK / selected_NK.sum(-1, keepdim=True))
    assert (weights_NK < 1).all()  # a bias of 10 would dominate if it leaked into the weights


def test_routed_scaling_factor_scales_routed_output_only():
    x_BTD = torch.randn(2, 4, 16, dtype=torch.float64)
    base = make_moe(num_shared_experts=0, routed_scaling_factor=1.0)
    scaled = make_moe(num_shared_experts=0, routed_scaling_factor=2.446)
    torch.testing.assert_close(scaled(x_BTD)[0], 2.446 * base(x_BTD)[0])


def test_shared_experts_always_applied():
    moe = make_moe(num_shared_experts=2)
    assert moe.shared_experts.ffn_dim == 2 * moe.expert_ffn_dim
    x_BTD = torch.randn(2, 3, 16, dtype=torch.float64)
    with torch.no_grad():
        moe.w_down.zero_()  # routed experts now contribute nothing
    y_BTD, _ = moe(x_BTD)
    shared = moe.shared_experts
    hidden_BTF = F.silu(F.linear(x_BTD, shared.gate_proj.weight)) * F.linear(x_BTD, shared.up_proj.weight)
    shared_BTD = F.linear(hidden_BTF, shared.down_proj.weight)
    torch.testing.assert_close(y_BTD, shared_BTD)
    assert shared_BTD.abs().min() > 0


def test_gradients_reach_router_and_exactly_the_used_experts():
    moe = make_moe(num_experts=8, top_k=2)
    with torch.no_grad():
        moe.expert_bias[5] = -10.0  # expert 5 is never chosen
    x_BTD = torch.randn(2, 6, 16, dtype=torch.float64, requires_grad=True)
    y_BTD, _ = moe(x_BTD)
    y_BTD.pow(2).sum().backward()
    used = moe.tokens_per_expert > 0
    assert not used[5] and used.sum() >= 3
    assert moe.gate.weight.grad.abs().sum() > 0
    assert x_BTD.grad.abs().sum() > 0
    for weight in (moe.w_gate, moe.w_up, moe.w_down):
        per_expert = weight.grad.abs().sum(dim=(1, 2))
        assert (per_expert[used] > 0).all() and (per_expert[~used] == 0).all()
    for p in moe.shared_experts.parameters():
        assert p.grad.abs().sum() > 0


def test_aux_loss_value_gradient_and_disabled_cases():
    moe = make_moe(aux_loss_coef=0.01)
    x_BTD = torch.randn(3, 8, 16, dtype=torch.float64)
    _, aux = moe(x_BTD)
    # Hand reference: per row sum_i f_i P_i, f_i = E/(K T) * count_i, P_i = mean_t s_ti / sum_j s_tj.
    expected = 0.0
    for row_TD in x_BTD:
        with torch.no_grad():
            scores_TE, ids_TK, _ = moe.route(row_TD)
        counts_E = torch.bincount(ids_TK.reshape(-1), minlength=6).float()
        f_E = counts_E * 6 / (2 * 8)
        p_E = (scores_TE / scores_TE.sum(-1, keepdim=True)).mean(0)
        expected += float((f_E * p_E).sum()) / 3
    assert aux is not None and aux.dim() == 0 and aux.item() > 0
    assert aux.item() == pytest.approx(0.01 * expected, rel=1e-5)
    aux.backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0

    assert make_moe(aux_loss_coef=0.0)(x_BTD)[1] is None
    moe.eval()
    assert moe(x_BTD)[1] is None


def test_update_expert_bias_moves_toward_balance_without_autograd():
    moe = make_moe(num_experts=4, top_k=1, bias_update_rate=0.01)
    x_BTD = torch.randn(2, 10, 16, dtype=torch.float64, requires_grad=True)
    y_BTD, _ = moe(x_BTD)
    y_BTD.sum().backward()
    counts_E = moe.tokens_per_expert.clone()
    before = moe.load_statistics()
    assert torch.equal(moe.tokens_per_expert, counts_E)  # load_statistics does not reset
    torch.testing.assert_close(before["load_fraction"], counts_E / 20)
    assert before["max_to_mean_load"] == pytest.approx(float(counts_E.max() / counts_E.mean()))
    assert before["max_violation"] == pytest.approx(before["max_to_mean_load"] - 1)

    with torch.enable_grad():
        stats = moe.update_expert_bias()
    expected_bias = 0.01 * torch.sign(counts_E.mean() - counts_E)
    torch.testing.assert_close(moe.expert_bias, expected_bias)
    assert moe.expert_bias.grad_fn is None and not moe.expert_bias.requires_grad
    assert torch.equal(stats["tokens_per_expert"], counts_E)
    assert moe.tokens_per_expert.sum() == 0

    # Counts passed in (the all-reduced global ones) are used instead of the local buffer.
    global_E = torch.tensor([1.0, 1.0, 1.0, 9.0])
    moe.update_expert_bias(global_E)
    torch.testing.assert_close(moe.expert_bias, expected_bias + 0.01 * torch.tensor([1.0, 1.0, 1.0, -1.0]))
    with pytest.raises(ValueError, match="global_tokens_per_expert"):
        moe.update_expert_bias(torch.ones(3))


def test_bias_updates_balance_a_skewed_router():
    moe = make_moe(num_experts=4, top_k=1, bias_update_rate=0.01, num_shared_experts=0)
    with torch.no_grad():
        moe.gate.weight.mul_(0.1)
        moe.gate.weight[0, 0] = 3.0  # tokens with x_0 > 0 all go to expert 0
    x_BTD = torch.randn(4, 64, 16, dtype=torch.float64)
    x_BTD[..., 0] = x_BTD[..., 0].abs()
    violations = []
    with torch.no_grad():
        for _ in range(80):
            moe(x_BTD)
            violations.append(moe.update_expert_bias()["max_violation"])
    assert violations[0] > 2.5  # nearly everything on one of four experts (3 = all on one)
    # Sign updates with a fixed step oscillate around balance rather than converge; judge the average.
    assert sum(violations[-20:]) / 20 < 0.6


def test_counts_only_in_training_and_not_during_checkpoint_recompute():
    moe = make_moe()
    x_BTD = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    moe.eval()
    moe(x_BTD)
    assert moe.tokens_per_expert.sum() == 0
    moe.train()
    y_BTD = checkpoint(lambda x: moe(x)[0], x_BTD, use_reentrant=False)
    y_BTD.sum().backward()  # recomputes the forward
    assert moe.tokens_per_expert.sum() == 10 * moe.top_k


def test_routing_state_stays_fp32_and_bias_is_checkpointed():
    moe = make_moe(dtype=torch.float32)
    with torch.no_grad():
        moe.expert_bias.fill_(1.0 + 1e-3)  # not representable in bf16
    moe = moe.bfloat16()
    assert moe.w_gate.dtype == torch.bfloat16
    assert moe.expert_bias.dtype == torch.float32 and moe.tokens_per_expert.dtype == torch.float32
    assert torch.all(moe.expert_bias == 1.0 + 1e-3)
    state = moe.state_dict()
    assert "expert_bias" in state and "tokens_per_expert" not in state and "gate.weight" in state
    y_BTD, _ = moe(torch.randn(2, 3, 16, dtype=torch.bfloat16))
    assert y_BTD.dtype == torch.bfloat16 and torch.isfinite(y_BTD).all()


def test_autocast_routes_in_fp32_and_runs_experts_in_bf16():
    moe = make_moe(dtype=torch.float32)
    x_BTD = torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores_NE, _, weights_NK = moe.route(x_BTD.view(-1, 16))
        y_BTD, _ = moe(x_BTD)
    assert scores_NE.dtype == torch.float32 and weights_NK.dtype == torch.float32
    assert y_BTD.dtype == torch.bfloat16
    expected, _ = reference_moe(moe, x_BTD)
    torch.testing.assert_close(y_BTD.double(), expected, rtol=5e-2, atol=5e-2 * float(expected.abs().max()))


def test_flops_and_parameter_counts_match_hand_formulas():
    D, E, K, Fw, S = 16, 6, 2, 8, 2
    moe = make_moe(hidden_size=D, num_experts=E, top_k=K, expert_ffn_dim=Fw, num_shared_experts=S)
    assert moe.forward_flops_per_token(128) == 2 * D * E + K * 3 * 2 * D * Fw + 3 * 2 * D * S * Fw
    assert moe.active_parameters() == D * E + K * 3 * D * Fw + S * 3 * D * Fw
    assert moe.total_parameters() == D * E + E * 3 * D * Fw + S * 3 * D * Fw
    assert moe.total_parameters() == sum(p.numel() for p in moe.parameters())
    no_shared = make_moe(num_shared_experts=0)
    assert no_shared.shared_experts is None
    assert no_shared.forward_flops_per_token(1) == 2 * 16 * 6 + 2 * 6 * 16 * 8


@pytest.mark.parametrize(
    "overrides, argument",
    [
        (dict(top_k=7), "top_k"),
        (dict(top_k=0), "top_k"),
        (dict(num_experts=0), "num_experts"),
        (dict(router_score="relu"), "router_score"),
        (dict(num_shared_experts=-1), "num_shared_experts"),
        (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
        (dict(bias_update_rate=-1.0), "bias_update_rate"),
        (dict(aux_loss_coef=-0.1), "aux_loss_coef"),
    ],
)
def test_bad_arguments_raise_clear_errors(overrides, argument):
    kwargs = dict(hidden_size=16, num_experts=6, top_k=2, expert_ffn_dim=8)
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=f"MoE {argument}="):
        MoE(**kwargs)


def test_bad_input_shape_raises():
    moe = make_moe()
    with pytest.raises(ValueError, match="hidden_size=16"):
        moe(torch.randn(2, 3, 15, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[batch, seq"):
        moe(torch.randn(6, 16, dtype=torch.float64))


@needs_native
def test_moe_native_and_loop_paths_agree_fp32():
    x_BTD = torch.randn(2, 9, 16)
    results = []
    for impl in ("native", "loop"):
        moe = make_moe(dtype=torch.float32, grouped_mm_impl=impl)
        x = x_BTD.clone().requires_grad_()
        y, _ = moe(x)
        y.pow(2).sum().backward()
        results.append((y, x.grad, moe.w_gate.grad, moe.w_down.grad, moe.gate.weight.grad))
    for native, loop in zip(*results):
        torch.testing.assert_close(native, loop, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- grouped GEMM
def reference_grouped_mm(x_MK, w_EKN, sizes):
    rows, start = [], 0
    for e, size in enumerate(sizes):
        rows.append(x_MK[start : start + size].double() @ w_EKN[e].double())
        start += size
    return torch.cat(rows)


SIZES = [3, 0, 5, 1, 0, 7]  # includes empty groups


@pytest.mark.parametrize("impl", ["loop", pytest.param("native", marks=needs_native)])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_grouped_mm_forward_and_backward_match_reference(impl, dtype, tol):
    torch.manual_seed(0)
    K, N = 16, 24
    x_MK = torch.randn(sum(SIZES), K).to(dtype).requires_grad_()
    w_EKN = (torch.randn(len(SIZES), K, N) / 4).to(dtype).requires_grad_()
    sizes_E = torch.tensor(SIZES)
    y_MN = grouped_mm(x_MK, w_EKN, sizes_E, impl=impl)
    assert y_MN.dtype == dtype and y_MN.shape == (16, N)

    x64 = x_MK.detach().double().requires_grad_()
    w64 = w_EKN.detach().double().requires_grad_()
    expected = reference_grouped_mm(x64, w64, SIZES)
    # bf16: relative to the output scale (inputs are rounded to bf16 but the product accumulates in fp32).
    scale = float(expected.detach().abs().max())
    torch.testing.assert_close(y_MN.double(), expected.detach(), rtol=tol, atol=tol * scale)

    # y.sum()'s gradient has zero strides, which torch._grouped_mm's backward rejects unless made contiguous.
    y_MN.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(x_MK.grad.double(), x64.grad, rtol=tol, atol=tol * float(x64.grad.abs().max()))
    torch.testing.assert_close(w_EKN.grad.double(), w64.grad, rtol=tol, atol=tol * float(w64.grad.abs().max()))
    assert w_EKN.grad[1].abs().sum() == 0 and w_EKN.grad[4].abs().sum() == 0  # empty groups get no gradient


@needs_native
def test_grouped_mm_native_equals_loop_tightly_in_fp32():
    torch.manual_seed(1)
    x_MK = torch.randn(16, 32, requires_grad=True)
    w_EKN = torch.randn(6, 32, 8, requires_grad=True)
    sizes_E = torch.tensor(SIZES)
    grad_MN = torch.randn(16, 8)
    outs = []
    for impl in ("native", "loop"):
        y = grouped_mm(x_MK, w_EKN, sizes_E, impl=impl)
        outs.append((y, *torch.autograd.grad(y, (x_MK, w_EKN), grad_MN)))
    for native, loop in zip(*outs):
        torch.testing.assert_close(native, loop, rtol=1e-5, atol=1e-5)


def test_grouped_mm_path_selection(monkeypatch):
    calls = []
    real = getattr(torch, "_grouped_mm", None)

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", spy, raising=False)
    sizes_E = torch.tensor([2, 2])
    aligned = (torch.randn(4, 8), torch.randn(2, 8, 4))
    grouped_mm(*aligned, sizes_E, impl="loop")
    assert not calls
    monkeypatch.setenv(grouped_gemm.ENV_VAR, "loop")
    grouped_mm(*aligned, sizes_E)
    assert not calls
    monkeypatch.setenv(grouped_gemm.ENV_VAR, "auto")
    # float64 and widths whose rows are not 16-byte aligned fall back to the loop in auto mode.
    grouped_mm(torch.randn(4, 8, dtype=torch.float64), torch.randn(2, 8, 4, dtype=torch.float64), sizes_E)
    grouped_mm(torch.randn(4, 5), torch.randn(2, 5, 3), sizes_E)
    assert not calls
    if real is not None:
        grouped_mm(*aligned, sizes_E)
        assert calls
        with pytest.raises(ValueError, match="impl='native'"):
            grouped_mm(torch.randn(4, 5), torch.randn(2, 5, 3), sizes_E, impl="native")
    monkeypatch.setenv(grouped_gemm.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=grouped_gemm.ENV_VAR):
        grouped_mm(*aligned, sizes_E)


def test_grouped_mm_bad_inputs():
    x_MK, w_EKN = torch.randn(4, 8), torch.randn(2, 8, 4)
    with pytest.raises(ValueError, match="sum to M=4"):
        grouped_mm(x_MK, w_EKN, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="group_sizes"):
        grouped_mm(x_MK, w_EKN, torch.tensor([4]))
    with pytest.raises(ValueError, match=r"w: expected a 3-D \[E, K=8"):
        grouped_mm(x_MK, torch.randn(2, 7, 4), torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="impl="):
        grouped_mm(x_MK, w_EKN, torch.tensor([2, 2]), impl="cuda")


# ---------------------------------------------------------------------------------------------------- SwiGLU
def test_swiglu_matches_formula_and_counts():
    torch.manual_seed(0)
    mlp = SwiGLU(12, 20).double()
    x_BTD = torch.randn(2, 3, 12, dtype=torch.float64)
    y_BTD, aux = mlp(x_BTD)
    W1, W3, W2 = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    expected = (torch.sigmoid(x_BTD @ W1.T) * (x_BTD @ W1.T) * (x_BTD @ W3.T)) @ W2.T
    torch.testing.assert_close(y_BTD, expected)
    assert aux is None
    assert mlp.forward_flops_per_token(64) == 3 * 2 * 12 * 20
    assert mlp.active_parameters() == mlp.total_parameters() == 3 * 12 * 20
    assert all(m.bias is None for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    with pytest.raises(ValueError, match="ffn_dim"):
        SwiGLU(12, 0)


# ---------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_grouped_mm_cuda_native_matches_loop(dtype, tol):
    torch.manual_seed(0)
    sizes_E = torch.tensor([130, 0, 257, 64, 1, 300], device="cuda")
    x_MK = torch.randn(int(sizes_E.sum()), 128, device="cuda", dtype=dtype, requires_grad=True)
    w_EKN = (torch.randn(6, 128, 256, device="cuda") / 8).to(dtype).requires_grad_()
    grad_MN = torch.randn(x_MK.shape[0], 256, device="cuda", dtype=dtype)
    outs = []
    for impl in ("native", "loop"):
        y = grouped_mm(x_MK, w_EKN, sizes_E, impl=impl)
        outs.append((y, *torch.autograd.grad(y, (x_MK, w_EKN), grad_MN)))
    for native, loop in zip(*outs):
        scale = float(loop.float().abs().max())
        torch.testing.assert_close(native.float(), loop.float(), rtol=tol, atol=tol * scale)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_moe_cuda_bf16_matches_cpu_fp32_run_of_the_same_weights():
    # Same bf16-rounded weights and inputs on both sides, router in fp32 on both: identical expert choices.
    moe = make_moe(dtype=torch.bfloat16, hidden_size=64, expert_ffn_dim=32, num_experts=8, top_k=2)
    x_BTD = torch.randn(2, 16, 64).bfloat16()
    reference = copy.deepcopy(moe).float()
    expected, _ = reference(x_BTD.float())
    gpu = moe.cuda()
    y_BTD, _ = gpu(x_BTD.cuda())
    y_BTD.float().sum().backward()
    scale = float(expected.detach().abs().max())
    torch.testing.assert_close(y_BTD.float().cpu(), expected, rtol=5e-2, atol=5e-2 * scale)
    assert torch.equal(gpu.tokens_per_expert.cpu(), reference.tokens_per_expert)
    assert gpu.expert_bias.dtype == torch.float32 and gpu.gate.weight.grad is not None
