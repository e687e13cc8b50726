"""model/moe.py: router semantics on hand-made scores, balance losses, grouped experts, whole layer.

Router tests set `router.weight` to the identity and feed the desired logits as the input, so
F.linear(x, I) = x and every score is known by hand.

    PYTHONPATH=platform .venv/bin/python -m pytest tests/unit/test_moe.py
"""

import math

import pytest
import torch
import torch.nn.functional as F

from raymoe.config import config_from_dict
from raymoe.model.moe import MoE, GroupedExperts, TopKRouter, grouped_mm, permute, unpermute


def _cfg(**model):
    """A model config whose width equals the expert count, so logits can be fed in as inputs."""
    base = {"num_experts": 4, "top_k": 2, "num_heads": 1, "num_layers": 1}
    base.update(model)
    base.setdefault("hidden_size", base["num_experts"])
    return config_from_dict({"model": base}).model


def _router(**model) -> TopKRouter:
    router = TopKRouter(_cfg(**model))
    with torch.no_grad():
        router.weight.copy_(torch.eye(router.num_experts))
    return router


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def _softmax(row: list[float]) -> list[float]:
    e = [math.exp(z) for z in row]
    return [v / sum(e) for v in e]


def _chosen(routing) -> list[list[int]]:
    return [sorted(r) for r in routing.expert_TK.tolist()]


# ----------------------------------------------------------------------------- selection and weights


def test_top_k_picks_the_k_largest_scores():
    router = _router(num_experts=6, top_k=3)
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 2.5, 0.0], [5.0, -5.0, 4.0, 0.0, 1.0, 4.5]])
    routing = router(logits)
    assert _chosen(routing) == [[1, 3, 4], [0, 2, 5]]
    # Slots come best first.
    assert routing.expert_TK.tolist() == [[1, 4, 3], [0, 5, 2]]


def test_softmax_weights_are_chosen_probabilities_renormalized_over_the_k():
    router = _router(score_func="softmax", norm_topk_prob=True)
    row = [2.0, 1.0, 0.0, -1.0]
    routing = router(torch.tensor([row]))
    p = _softmax(row)
    assert routing.expert_TK.tolist() == [[0, 1]]
    expected = [p[0] / (p[0] + p[1]), p[1] / (p[0] + p[1])]
    torch.testing.assert_close(routing.weight_TK, torch.tensor([expected]), atol=1e-6, rtol=0)


def test_softmax_weights_without_normalization_are_the_raw_probabilities():
    router = _router(score_func="softmax", norm_topk_prob=False)
    row = [2.0, 1.0, 0.0, -1.0]
    routing = router(torch.tensor([row]))
    p = _softmax(row)
    torch.testing.assert_close(routing.weight_TK, torch.tensor([[p[0], p[1]]]), atol=1e-6, rtol=0)


def test_sigmoid_weights_without_normalization_are_the_raw_sigmoids():
    router = _router(score_func="sigmoid", norm_topk_prob=False)
    row = [0.5, -2.0, 1.5, 0.0]
    routing = router(torch.tensor([row]))
    assert routing.expert_TK.tolist() == [[2, 0]]
    expected = [_sigmoid(1.5), _sigmoid(0.5)]
    torch.testing.assert_close(routing.weight_TK, torch.tensor([expected]), atol=1e-6, rtol=0)


def test_sigmoid_weights_with_normalization_sum_to_one_over_the_chosen():
    router = _router(score_func="sigmoid", norm_topk_prob=True)
    row = [0.5, -2.0, 1.5, 0.0]
    routing = router(torch.tensor([row]))
    s2, s0 = _sigmoid(1.5), _sigmoid(0.5)
    torch.testing.assert_close(routing.weight_TK, torch.tensor([[s2 / (s2 + s0), s0 / (s2 + s0)]]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_route_scale_multiplies_the_weights(score_func, norm):
    x = torch.tensor([[0.5, -2.0, 1.5, 0.0], [3.0, 0.0, 0.1, -0.2]])
    plain = _router(score_func=score_func, norm_topk_prob=norm)(x)
    scaled = _router(score_func=score_func, norm_topk_prob=norm, route_scale=2.5)(x)
    assert torch.equal(plain.expert_TK, scaled.expert_TK)
    torch.testing.assert_close(scaled.weight_TK, 2.5 * plain.weight_TK, atol=1e-6, rtol=0)


def test_expert_bias_changes_the_choice_but_weights_come_from_unbiased_scores():
    router = _router(score_func="sigmoid", norm_topk_prob=True)
    row = [2.0, 1.0, 0.0, -1.0]
    assert router(torch.tensor([row])).expert_TK.tolist() == [[0, 1]]

    # Biased choice scores: sig(-1) + 1 = 1.27 beats sig(2) = 0.88, so expert 3 comes first.
    router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0]))
    routing = router(torch.tensor([row]))
    assert routing.expert_TK.tolist() == [[3, 0]]
    s3, s0 = _sigmoid(-1.0), _sigmoid(2.0)
    torch.testing.assert_close(routing.weight_TK, torch.tensor([[s3 / (s3 + s0), s0 / (s3 + s0)]]), atol=1e-6, rtol=0)


def test_group_limit_excludes_the_best_expert_when_its_group_is_weak():
    # 4 groups of 2; sigmoid scores per group: [0.95, 0.05] sum 1.00, [0.7, 0.5] sum 1.20,
    # [0.6, 0.45] sum 1.05, [0.1, 0.1] sum 0.20. Best 2 groups: 1 and 2. Expert 0 has the single
    # highest score (and its group the highest max) but its group's pair sum is only third.
    probs = [0.95, 0.05, 0.7, 0.5, 0.6, 0.45, 0.1, 0.1]
    x = torch.tensor([[_logit(p) for p in probs]])
    kw = dict(num_experts=8, top_k=2, score_func="sigmoid", norm_topk_prob=True)

    ungrouped = _router(**kw)(x)
    assert ungrouped.expert_TK.tolist() == [[0, 2]]

    routing = _router(**kw, num_expert_groups=4, top_k_groups=2)(x)
    assert routing.expert_TK.tolist() == [[2, 4]]
    torch.testing.assert_close(routing.weight_TK, torch.tensor([[0.7 / 1.3, 0.6 / 1.3]]), atol=1e-6, rtol=0)


def test_group_score_is_the_sum_of_the_two_best_not_of_all():
    # 2 groups of 3, one allowed. Group 0 [0.60, 0.59, 0.58]: best two 1.19, all 1.77.
    # Group 1 [0.90, 0.40, 0.05]: best two 1.30, all 1.35. Best-two picks group 1.
    probs = [0.60, 0.59, 0.58, 0.90, 0.40, 0.05]
    x = torch.tensor([[_logit(p) for p in probs]])
    router = _router(num_experts=6, top_k=2, score_func="sigmoid", num_expert_groups=2, top_k_groups=1)
    assert router(x).expert_TK.tolist() == [[3, 4]]


def test_gate_threshold_skips_chosen_experts_whose_normalized_weight_is_below_it():
    # K=3 softmax; normalized chosen weights 0.5, 0.35, 0.15. Threshold 0.2 applies before route_scale.
    p = [0.5, 0.35, 0.15]
    row = [math.log(v) for v in p] + [math.log(0.01)]
    router = _router(top_k=3, gate_threshold=0.2, route_scale=2.0)
    routing = router(torch.tensor([row]))
    assert routing.expert_TK.tolist() == [[0, 1, 2]]
    assert routing.keep_TK.tolist() == [[True, True, False]]
    # The kept weights are not renormalized after the skip.
    torch.testing.assert_close(routing.weight_TK, torch.tensor([[1.0, 0.7, 0.0]]), atol=1e-6, rtol=0)
    assert routing.num_dropped.item() == 0  # a skip is not a capacity drop

    no_threshold = _router(top_k=3, route_scale=2.0)(torch.tensor([row]))
    assert no_threshold.keep_TK.all()
    torch.testing.assert_close(no_threshold.weight_TK, torch.tensor([[1.0, 0.7, 0.3]]), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- capacity

# Four tokens, K=2 of E=4: every token picks expert 0 first, then 1, 2, 1, 3.
_CAP_LOGITS = torch.tensor(
    [
        [3.0, 2.0, 0.0, -1.0],
        [3.0, 0.0, 2.0, -1.0],
        [3.0, 2.0, -1.0, 0.0],
        [3.0, -1.0, 0.0, 2.0],
    ]
)


@pytest.mark.parametrize(
    "capacity_factor, capacity, keep",
    [
        # capacity = ceil(cf * T * K / E) = ceil(cf * 2)
        (1.0, 2, [[True, True], [True, True], [False, True], [False, True]]),
        (1.1, 3, [[True, True], [True, True], [True, True], [False, True]]),  # ceil, not round
        (0.5, 1, [[True, True], [False, True], [False, False], [False, True]]),
    ],
)
def test_capacity_keeps_earlier_tokens_first_and_counts_drops(capacity_factor, capacity, keep):
    routing = _router(capacity_factor=capacity_factor)(_CAP_LOGITS)
    assert routing.expert_TK.tolist() == [[0, 1], [0, 2], [0, 1], [0, 3]]
    keep_t = torch.tensor(keep)
    assert routing.keep_TK.tolist() == keep
    assert routing.num_dropped.item() == (~keep_t).sum().item()
    kept_per_expert = torch.bincount(routing.expert_TK[keep_t], minlength=4)
    assert kept_per_expert.max().item() <= capacity
    # Dropped slots weigh nothing; balancing still sees every chosen slot.
    assert (routing.weight_TK[~keep_t] == 0).all() and (routing.weight_TK[keep_t] > 0).all()
    assert routing.tokens_per_expert_E.tolist() == [4, 2, 1, 1]


def test_dropless_routing_drops_nothing_however_imbalanced():
    routing = _router(capacity_factor=None)(_CAP_LOGITS)
    assert routing.keep_TK.all()
    assert routing.num_dropped.item() == 0
    assert routing.tokens_per_expert_E.tolist() == [4, 2, 1, 1]


def test_capacity_counts_only_slots_the_gate_threshold_kept():
    # Token 0 skips its second choice (expert 1); that slot must not use expert 1's capacity 1.
    rows = torch.tensor(
        [
            [math.log(0.9), math.log(0.05), math.log(0.04), math.log(0.01)],  # 0 then 1 (w=0.053 < 0.1)
            [math.log(0.05), math.log(0.5), math.log(0.44), math.log(0.01)],  # 1 then 2, both kept
        ]
    )
    router = _router(gate_threshold=0.1, capacity_factor=0.5)  # capacity ceil(0.5*2*2/4) = 1
    routing = router(rows)
    assert routing.expert_TK.tolist() == [[0, 1], [1, 2]]
    assert routing.keep_TK.tolist() == [[True, False], [True, True]]
    assert routing.num_dropped.item() == 0


# ----------------------------------------------------------------------------- bias update


def test_update_bias_moves_overloaded_down_and_underloaded_up_by_exactly_rate():
    router = _router(balance={"bias_update_rate": 0.01})
    start = torch.tensor([0.1, -0.2, 0.3, 0.0])
    router.expert_bias.copy_(start)
    router.update_bias(torch.tensor([5, 1, 3, 3]))  # mean 3
    torch.testing.assert_close(router.expert_bias, start + torch.tensor([-0.01, 0.01, 0.0, 0.0]), atol=1e-7, rtol=0)


def test_update_bias_with_zero_rate_changes_nothing():
    router = _router(balance={"bias_update_rate": 0.0})
    router.update_bias(torch.tensor([8, 0, 0, 0]))
    assert torch.equal(router.expert_bias, torch.zeros(4))


def test_update_bias_does_not_change_selection_weights():
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    router = _router(score_func="sigmoid", balance={"bias_update_rate": 0.5})
    before = router(x)
    router.update_bias(torch.tensor([0, 0, 4, 0]))  # bias becomes [+.5, +.5, -.5, +.5]
    after = router(x)
    assert torch.equal(before.expert_TK, after.expert_TK)
    torch.testing.assert_close(before.weight_TK, after.weight_TK)


# ----------------------------------------------------------------------------- balance losses

_LOSS_LOGITS = [
    [1.0, 0.5, -0.5, 0.0],
    [0.2, 2.0, 0.1, -1.0],
    [-0.3, 0.4, 1.5, 0.9],
    [0.0, -1.0, 0.3, 2.2],
    [1.7, 1.6, -0.2, 0.1],
    [0.5, -0.4, 0.6, 0.45],
]
# Loads are uneven (4, 3, 3, 2 of 12 slots): with perfectly even loads the batch aux loss of
# softmax scores is a constant and has no gradient.


def _hand_routing(rows, score_func, k):
    """Scores, normalized affinities and the chosen experts, in plain Python."""
    scores = [_softmax(r) if score_func == "softmax" else [_sigmoid(z) for z in r] for r in rows]
    probs = [[s / sum(row) for s in row] for row in scores]
    chosen = [sorted(range(len(row)), key=lambda i: -row[i])[:k] for row in scores]
    return probs, chosen


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_aux_loss_is_coef_times_E_times_sum_of_f_times_P(score_func):
    coef, E, K = 0.3, 4, 2
    router = _router(score_func=score_func, balance={"aux_loss_coef": coef}).train()
    loss = router(torch.tensor(_LOSS_LOGITS)).aux_loss

    probs, chosen = _hand_routing(_LOSS_LOGITS, score_func, K)
    T = len(_LOSS_LOGITS)
    f = [sum(i in c for c in chosen) / (T * K) for i in range(E)]
    P = [sum(p[i] for p in probs) / T for i in range(E)]
    expected = coef * E * sum(f[i] * P[i] for i in range(E))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_seq_aux_loss_averages_per_sequence_balance_over_the_batch(score_func):
    alpha, E, K, B, S = 0.2, 4, 2, 2, 3
    router = _router(score_func=score_func, balance={"seq_aux_loss_coef": alpha}).train()
    loss = router(torch.tensor(_LOSS_LOGITS), batch_size=B).aux_loss

    probs, chosen = _hand_routing(_LOSS_LOGITS, score_func, K)
    per_seq = []
    for b in range(B):
        p_seq, c_seq = probs[b * S : (b + 1) * S], chosen[b * S : (b + 1) * S]
        f = [E / (K * S) * sum(i in c for c in c_seq) for i in range(E)]
        P = [sum(p[i] for p in p_seq) / S for i in range(E)]
        per_seq.append(sum(f[i] * P[i] for i in range(E)))
    expected = alpha * sum(per_seq) / B
    assert loss.item() == pytest.approx(expected, rel=1e-5)

    # The two sequences differ, so treating the batch as one sequence gives another number.
    pooled = router(torch.tensor(_LOSS_LOGITS), batch_size=1).aux_loss
    assert abs(pooled.item() - expected) > 1e-3


def test_z_loss_is_coef_times_mean_squared_logsumexp():
    coef = 0.05
    router = _router(balance={"z_loss_coef": coef}).train()
    loss = router(torch.tensor(_LOSS_LOGITS)).aux_loss
    lse = [math.log(sum(math.exp(z) for z in row)) for row in _LOSS_LOGITS]
    expected = coef * sum(v * v for v in lse) / len(lse)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_enabled_balance_losses_add_up():
    x = torch.tensor(_LOSS_LOGITS)
    parts = [{"aux_loss_coef": 0.3}, {"seq_aux_loss_coef": 0.2}, {"z_loss_coef": 0.05}]
    separate = sum(_router(balance=b).train()(x, batch_size=2).aux_loss.item() for b in parts)
    together = _router(balance={k: v for b in parts for k, v in b.items()}).train()(x, batch_size=2).aux_loss
    assert together.item() == pytest.approx(separate, rel=1e-6)


def test_balance_losses_are_zero_in_eval_mode():
    router = _router(balance={"aux_loss_coef": 0.3, "seq_aux_loss_coef": 0.2, "z_loss_coef": 0.05}).eval()
    assert router(torch.tensor(_LOSS_LOGITS), batch_size=2).aux_loss.item() == 0.0


def test_balance_losses_are_zero_when_every_coef_is_zero():
    router = _router(balance={"bias_update_rate": 0.001}).train()
    assert router(torch.tensor(_LOSS_LOGITS), batch_size=2).aux_loss.item() == 0.0


@pytest.mark.parametrize("balance", [{"aux_loss_coef": 0.3}, {"seq_aux_loss_coef": 0.2}, {"z_loss_coef": 0.05}])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_each_balance_loss_sends_gradient_to_the_router_weight(balance, score_func):
    router = _router(score_func=score_func, balance=balance).train()
    router(torch.tensor(_LOSS_LOGITS), batch_size=2).aux_loss.backward()
    assert router.weight.grad is not None
    assert router.weight.grad.abs().sum().item() > 1e-6


# ----------------------------------------------------------------------------- grouped experts


def test_grouped_mm_fallback_equals_per_segment_matmuls_with_empty_experts():
    torch.manual_seed(0)
    counts = torch.tensor([2, 0, 3, 1, 0])
    x = torch.randn(6, 5)
    w = torch.randn(5, 5, 7)
    out = grouped_mm(x, w, counts)
    expert_of_row = [0, 0, 2, 2, 2, 3]
    expected = torch.stack([x[n] @ w[e] for n, e in enumerate(expert_of_row)])
    assert out.shape == (6, 7)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_on_cpu_equals_the_per_segment_matmuls_forward_and_backward(dtype):
    """Aligned shapes take torch._grouped_mm on CPU; its results and gradients are the per-segment
    loop's exactly, even for an expanded upstream gradient (out.sum()), which its backward refuses
    without the contiguity hook."""
    from raymoe.model.moe import grouped_mm_segments

    torch.manual_seed(0)
    counts = torch.tensor([7, 0, 12, 1, 0, 20])
    x = torch.randn(40, 16, dtype=dtype, requires_grad=True)
    w = torch.randn(6, 16, 8, dtype=dtype, requires_grad=True)
    results = []
    for fn in (grouped_mm, grouped_mm_segments):
        out = fn(x, w, counts)
        gx, gw = torch.autograd.grad(out.sum(), (x, w))
        results.append((out, gx, gw))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("hidden", [8, 2])  # 8: torch._grouped_mm and its backward; 2 (unaligned): the segment loop
def test_grouped_mm_as_an_opaque_op_has_the_eager_gradients(hidden):
    """Under torch.compile grouped_mm is the custom op raymoe::grouped_mm, whose backward is its own
    (raymoe::grouped_mm_backward): gradients the same as autograd through the eager products."""
    from raymoe.model.moe import _grouped_mm_opaque

    torch.manual_seed(0)
    counts = torch.tensor([7, 0, 12, 1, 0, 20])
    x = torch.randn(40, 16, requires_grad=True)
    w = torch.randn(6, 16, hidden, requires_grad=True)
    g = torch.randn(40, hidden)
    results = []
    for fn in (grouped_mm, _grouped_mm_opaque):
        out = fn(x, w, counts)
        results.append((out, *torch.autograd.grad(out, (x, w), g)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert results[1][2][1].abs().sum() == 0 and results[1][2][4].abs().sum() == 0  # experts with no rows


def test_grouped_mm_with_no_rows_returns_an_empty_result():
    out = grouped_mm(torch.zeros(0, 3), torch.randn(2, 3, 4), torch.tensor([0, 0]))
    assert out.shape == (0, 4)


def _swiglu_ref(x_D, w1, w3, w2):
    return (F.silu(x_D @ w1) * (x_D @ w3)) @ w2


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "routing_weights"])
def test_grouped_experts_forward_and_gradients_equal_a_per_token_reference(weighted):
    torch.manual_seed(0)
    E, D, Fh = 4, 6, 5
    counts = torch.tensor([3, 0, 1, 4])
    expert_of_row = [0, 0, 0, 2, 3, 3, 3, 3]
    experts = GroupedExperts(E, D, Fh)
    with torch.no_grad():
        for w in (experts.w13, experts.w2):
            w.normal_(0, 0.5)
    x = torch.randn(len(expert_of_row), D, requires_grad=True)
    grad_out = torch.randn(len(expert_of_row), D)
    weight = (torch.rand(len(expert_of_row)) + 0.1).requires_grad_() if weighted else None

    out = experts(x, counts, weight)
    out.backward(grad_out)

    # the reference keeps gate and up as separate matrices, the layout before they were fused
    ws = [w.detach().clone().requires_grad_() for w in (*experts.w13.chunk(2, dim=-1), experts.w2)]
    x_ref = x.detach().clone().requires_grad_()
    w_ref = weight.detach().clone().requires_grad_() if weighted else None
    # the reference weights each expert's output, as the combine did before the weight moved inside
    ref = torch.stack([_swiglu_ref(x_ref[n], ws[0][e], ws[1][e], ws[2][e]) * (w_ref[n] if weighted else 1)
                       for n, e in enumerate(expert_of_row)])
    ref.backward(grad_out)

    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    if weighted:
        torch.testing.assert_close(weight.grad, w_ref.grad, atol=1e-5, rtol=1e-5)
    for got, want in zip((*experts.w13.grad.chunk(2, dim=-1), experts.w2.grad), ws):
        torch.testing.assert_close(got, want.grad, atol=1e-5, rtol=1e-5)
        assert (got[1] == 0).all()  # the expert with no tokens gets no gradient


def test_permute_then_unpermute_with_identity_experts_gives_weighted_sum_of_kept_slots():
    router = _router(capacity_factor=1.0)
    routing = router(_CAP_LOGITS)
    x = torch.arange(16, dtype=torch.float32).view(4, 4)
    x_ND, counts_E, token_N, weight_N = permute(x, routing, 4)
    assert counts_E.tolist() == [2, 2, 1, 1]  # expert 0 lost two slots to capacity
    assert token_N.tolist() == [0, 1, 0, 2, 1, 3]  # sorted by expert, earlier tokens first
    assert torch.equal(x_ND, x[token_N])
    y = unpermute(x_ND, token_N, weight_N, 4)
    expected = x * (routing.weight_TK * routing.keep_TK).sum(-1, keepdim=True)
    torch.testing.assert_close(y, expected)


# ----------------------------------------------------------------------------- whole layer


def _random_moe(**model):
    cfg = _cfg(**{"num_experts": 4, "top_k": 2, "hidden_size": 8, "expert_intermediate_size": 6, **model})
    torch.manual_seed(0)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.5)
    return moe


def _naive_moe(moe, x_BSD):
    """For each token: sum over its kept chosen experts of weight * expert(x), plus the shared expert."""
    B, S, D = x_BSD.shape
    x_TD = x_BSD.reshape(B * S, D)
    routing = moe.router(x_TD, batch_size=B)
    e = moe.experts
    rows = []
    for t in range(B * S):
        y = torch.zeros(D)
        for k in range(routing.expert_TK.shape[1]):
            if routing.keep_TK[t, k]:
                i = routing.expert_TK[t, k]
                y = y + routing.weight_TK[t, k] * _swiglu_ref(x_TD[t], *e.w13[i].chunk(2, dim=-1), e.w2[i])
        if moe.shared is not None:
            y = y + moe.shared(x_TD[t])
        rows.append(y)
    return torch.stack(rows).view(B, S, D), routing


@pytest.mark.parametrize(
    "model",
    [
        {},
        {"score_func": "sigmoid", "route_scale": 2.5, "num_shared_experts": 2},
        {"capacity_factor": 0.75, "gate_threshold": 0.3},
        {"num_shared_experts": 0, "norm_topk_prob": False},
    ],
    ids=["softmax", "sigmoid_scaled_2shared", "capacity_and_threshold", "no_shared_raw"],
)
def test_moe_forward_and_gradients_equal_a_naive_per_token_reference(model):
    moe = _random_moe(**model).train()
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    grad_out = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(2))

    x1 = x.clone().requires_grad_()
    y, aux, stats = moe(x1)
    y.backward(grad_out)
    grads = {n: p.grad.clone() for n, p in moe.named_parameters()}
    moe.zero_grad()

    x2 = x.clone().requires_grad_()
    y_ref, routing = _naive_moe(moe, x2)
    y_ref.backward(grad_out)

    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)
    for n, p in moe.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-5, msg=f"gradient of {n}")
    assert stats.num_slots == 2 * 5 * moe.top_k
    assert stats.tokens_per_expert.sum().item() == stats.num_slots
    assert stats.num_dropped.item() == routing.num_dropped.item()
    if "capacity_factor" in model:
        assert not routing.keep_TK.all()  # the case really exercises skipped/dropped slots


def test_group_limited_routing_keeps_each_token_on_at_most_top_k_groups_expert_ranks():
    """DeepSeek's node-limited routing: with expert groups laid onto expert ranks (groups a
    multiple of the expert degree), a token's experts live on at most top_k_groups ranks."""
    from raymoe.parallel.mesh import Mesh

    cfg = config_from_dict({"model": {"hidden_size": 32, "num_experts": 16, "top_k": 4, "score_func": "sigmoid",
                                      "num_expert_groups": 8, "top_k_groups": 2}}).model
    router = TopKRouter(cfg)
    torch.nn.init.normal_(router.weight)
    router.expert_bias.normal_(0, 0.5)
    expert_TK = router(torch.randn(512, 32)).expert_TK
    for expert_degree in (2, 4, 8):
        mesh = Mesh(world_size=expert_degree, rank=0, expert_degree=expert_degree, num_experts=16)
        rank_TK = expert_TK // mesh.experts_per_rank
        ranks_per_token = torch.tensor([len(set(r.tolist())) for r in rank_TK])
        assert int(ranks_per_token.max()) <= 2, expert_degree
    # Without the limit the same router spreads tokens over more ranks.
    free = config_from_dict({"model": {"hidden_size": 32, "num_experts": 16, "top_k": 4, "score_func": "sigmoid"}}).model
    unlimited = TopKRouter(free)
    unlimited.weight.data.copy_(router.weight.data)
    spread = unlimited(torch.randn(512, 32)).expert_TK // 2
    assert max(len(set(r.tolist())) for r in spread) > 2


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_padding_loads_no_expert_and_enters_no_balance_loss(score_func):
    """Packed sft rows end in padding: it is routed (outputs discarded) but its slots are not kept,
    take no capacity, and count in neither the loads the bias moves on nor any balance loss."""
    balance = {"aux_loss_coef": 0.01, "seq_aux_loss_coef": 0.001, "z_loss_coef": 0.001}
    router = _router(num_experts=8, top_k=2, score_func=score_func, capacity_factor=1.0, balance=balance)
    router.train()
    x = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    pad = torch.zeros(4, 8)
    pad[:, 0] = 9.0  # padding all prefers expert 0: counted, it would skew every statistic
    valid = torch.tensor([True] * 12 + [False] * 4)
    padded = router(torch.cat([x, pad]), batch_size=1, valid_T=valid)
    alone = router(x, batch_size=1)
    assert torch.equal(padded.tokens_per_expert_E, alone.tokens_per_expert_E)
    assert not padded.keep_TK[12:].any() and torch.equal(padded.keep_TK[:12], alone.keep_TK)
    assert int(padded.num_dropped) == int(alone.num_dropped)
    torch.testing.assert_close(padded.aux_loss, alone.aux_loss)
    unmasked = router(torch.cat([x, pad]), batch_size=1)
    assert int(unmasked.tokens_per_expert_E[0]) == int(alone.tokens_per_expert_E[0]) + 4  # what the mask removes


@pytest.mark.parametrize("model", [{}, {"capacity_factor": 0.75, "gate_threshold": 0.3}], ids=["dropless", "capacity_and_threshold"])
def test_inference_on_a_few_tokens_computes_every_expert_and_matches_the_per_token_reference(model, monkeypatch):
    """Decode-sized batches under inference take GroupedExperts.forward_dense (every expert for
    every token, unchosen ones weighted 0); the result is the per-token reference's."""
    moe = _random_moe(**model).eval()
    moe.padded = False  # the padded path has its own test below
    x = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(3))
    calls = []
    monkeypatch.setattr(GroupedExperts, "forward", lambda *a: calls.append("grouped") or pytest.fail("took the grouped path"))
    with torch.inference_mode():
        assert moe._dense_is_faster(4)
        y, _, stats = moe(x)
    y_ref, routing = _naive_moe(moe, x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    assert stats.tokens_per_expert.sum().item() == 4 * moe.top_k
    # Training, many tokens, or a single token (few experts touched) keep the grouped GEMM.
    assert not moe._dense_is_faster(4)
    with torch.inference_mode():
        assert not moe._dense_is_faster(moe.dense_max_tokens + 1)
    wide = _random_moe(num_experts=16, top_k=2).eval()
    with torch.inference_mode():  # one token touches 2 of 16 experts: reading all 16 would cost more
        assert not wide._dense_is_faster(1) and wide._dense_is_faster(8)


@pytest.mark.parametrize("model", [{}, {"capacity_factor": 0.75, "gate_threshold": 0.3}], ids=["dropless", "capacity_and_threshold"])
def test_inference_pads_each_experts_tokens_into_one_batch_and_matches_the_per_token_reference(model, monkeypatch):
    """Where the padding is small, inference gathers each expert's tokens into [E, C, D] (C = the
    largest load) and takes three batched GEMMs; dropped and thresholded slots weigh 0 there, and
    the result is the per-token reference's."""
    moe = _random_moe(num_experts=8, top_k=2, **model).eval()
    x = torch.randn(2, 24, 8, generator=torch.Generator().manual_seed(5))
    taken = []
    for name in ("forward", "forward_dense"):
        monkeypatch.setattr(GroupedExperts, name, lambda *a, _n=name: pytest.fail(f"took {_n}"))
    real = GroupedExperts.forward_padded
    monkeypatch.setattr(GroupedExperts, "forward_padded", lambda self, x, w, c: taken.append(c) or real(self, x, w, c))
    with torch.inference_mode():
        y, _, stats = moe(x)
    y_ref, routing = _naive_moe(moe, x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    kept = routing.weight_TK > 0
    loads = torch.zeros(8, dtype=torch.long).scatter_add_(0, routing.expert_TK[kept], torch.ones_like(routing.expert_TK[kept]))
    assert taken == [int(loads.max())]  # every kept slot fits: C is the largest load
    if model:
        assert int(stats.num_dropped) > 0 or not bool(routing.keep_TK.all())  # the case has slots weighted 0


def test_the_padded_path_is_chosen_only_where_its_rows_beat_the_dense_and_grouped_ones():
    """E * C padded rows against 0.7 x the dense path's T * E and the grouped GEMM's T * K + 40 E
    (the rule fitted in bench/dense_experts.py); training and a switched-off model never pad."""
    moe = MoE(_cfg(num_experts=16, top_k=4, hidden_size=8, expert_intermediate_size=8)).eval()
    with torch.inference_mode():
        assert moe._padded_is_faster(16, 10)  # 160 rows <= 0.7 * 256 (measured 332 us against dense 397)
        assert not moe._padded_is_faster(4, 3)  # 48 > 0.7 * 64: dense (measured 251 against 227 at C 2)
        assert moe._padded_is_faster(512, 143)  # 2,288 <= 2,048 + 640: balanced prefill
        assert not moe._padded_is_faster(512, 300)  # 4,800 > 2,688: a skewed load takes the grouped GEMM
        moe.padded = False
        assert not moe._padded_is_faster(16, 10)


def test_inference_on_a_skewed_load_keeps_the_grouped_gemm(monkeypatch):
    """Every token preferring the same experts makes C = T: padding would multiply the work."""
    moe = _random_moe(num_experts=8, top_k=2).eval()
    moe.router.expert_bias.copy_(torch.tensor([50.0, 50.0] + [0.0] * 6))
    monkeypatch.setattr(GroupedExperts, "forward_padded", lambda *a: pytest.fail("padded a skewed load"))
    x = torch.randn(1, 64, 8, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        y, _, _ = moe(x)
    torch.testing.assert_close(y, _naive_moe(moe, x)[0], atol=1e-5, rtol=1e-5)
