"""ilql_loss against values worked out by hand on a tiny case (2 real actions + 1 padding)."""

import math

import pytest
import torch

from ilql.loss import ilql_loss

GAMMA, TAU, BETA, CQL, AWAC = 0.9, 0.7, 2.0, 0.1, 1.0


def case(requires_grad=False):
    t = lambda x: torch.tensor(x, dtype=torch.float32, requires_grad=requires_grad)  # noqa: E731
    return dict(
        logits=t([[[0.0, 1.0], [2.0, 0.0], [3.0, 3.0]]]),
        qs=[t([[[1.0, 2.0], [0.5, -1.0], [7.0, 7.0]]]), t([[[0.0, 1.0], [1.5, 0.0], [7.0, 7.0]]])],
        target_qs=[torch.tensor([[0.8, -0.5, 5.0]]), torch.tensor([[1.2, -0.7, 5.0]])],
        vs=t([[0.5, -0.2, 0.3, 9.0]]),
        actions=torch.tensor([[0, 1, 0]]),
        rewards=torch.tensor([[0.0, 1.0, 0.0]]),
        dones=torch.tensor([[1, 1, 0, 0]]),
    )


def lse(a, b):
    return math.log(math.exp(a) + math.exp(b))


# by hand: TD targets y0 = 0 + 0.9 * V(s1) = -0.18 ; y1 = 1 + 0.9 * V(s2) * 0 = 1
Y = [-0.18, 1.0]
LOSS_Q1 = ((1.0 - Y[0]) ** 2 + (-1.0 - Y[1]) ** 2) / 2
LOSS_Q2 = ((0.0 - Y[0]) ** 2 + (0.0 - Y[1]) ** 2) / 2
# u = min target Q - V: 0.8 - 0.5 = 0.3 (weight tau) ; -0.7 + 0.2 = -0.5 (weight 1 - tau)
U = [0.3, -0.5]
LOSS_V = (TAU * 0.3**2 + (1 - TAU) * 0.5**2) / 2
LOSS_CQL = ((lse(1, 2) - 1) + (lse(0.5, -1) + 1)) / 2 + ((lse(0, 1) - 0) + (lse(1.5, 0) - 0)) / 2
LOSS_AWAC = (math.exp(BETA * U[0]) * (lse(0, 1) - 0) + math.exp(BETA * U[1]) * (lse(2, 0) - 0)) / 2


def run(**overrides):
    kwargs = dict(tau=TAU, gamma=GAMMA, cql_scale=CQL, awac_scale=AWAC, beta=BETA)
    kwargs.update(overrides)
    return ilql_loss(**case(), **kwargs)


def test_every_term_matches_hand_computation():
    loss, stats = run()
    assert stats["losses/loss_q1"].item() == pytest.approx(LOSS_Q1, rel=1e-5)
    assert stats["losses/loss_q2"].item() == pytest.approx(LOSS_Q2, rel=1e-5)
    assert stats["losses/loss_q"].item() == pytest.approx(LOSS_Q1 + LOSS_Q2, rel=1e-5)
    assert stats["losses/loss_v"].item() == pytest.approx(LOSS_V, rel=1e-5)
    assert stats["losses/loss_cql"].item() == pytest.approx(LOSS_CQL, rel=1e-5)
    assert stats["losses/loss_awac"].item() == pytest.approx(LOSS_AWAC, rel=1e-5)
    total = LOSS_Q1 + LOSS_Q2 + LOSS_V + CQL * LOSS_CQL + AWAC * LOSS_AWAC
    assert loss.item() == pytest.approx(total, rel=1e-5)


def test_stats_report_means_over_real_actions():
    _, stats = run()
    assert stats["values/v"].item() == pytest.approx((0.5 - 0.2) / 2)
    assert stats["values/q1"].item() == pytest.approx((1.0 - 1.0) / 2)
    assert stats["values/q2"].item() == pytest.approx(0.0)
    assert stats["values/target_q"].item() == pytest.approx((0.8 - 0.7) / 2)
    assert stats["values/awac_weight"].item() == pytest.approx((math.exp(0.6) + math.exp(-1.0)) / 2, rel=1e-6)
    assert all(not v.requires_grad for v in stats.values())


def test_beta_zero_is_behaviour_cloning_and_scales_apply():
    _, stats = run(beta=0.0)
    assert stats["losses/loss_awac"].item() == pytest.approx((lse(0, 1) + lse(2, 0)) / 2, rel=1e-6)
    loss, _ = run(cql_scale=0.0, awac_scale=0.0)
    assert loss.item() == pytest.approx(LOSS_Q1 + LOSS_Q2 + LOSS_V, rel=1e-5)


def test_padding_never_contributes():
    base, _ = run()
    c = case()
    c["qs"][0][0, 2] = 1e3
    c["logits"][0, 2] = -1e3
    c["vs"][0, 3] = -1e3
    c["rewards"][0, 2] = 1e3
    c["target_qs"][0][0, 2] = 1e3
    loss, _ = ilql_loss(**c, tau=TAU, gamma=GAMMA, cql_scale=CQL, awac_scale=AWAC, beta=BETA)
    assert loss.item() == pytest.approx(base.item(), rel=1e-6)


def test_gradients_stop_at_next_state_values_and_targets():
    c = case(requires_grad=True)
    total, _ = ilql_loss(**c, tau=TAU, gamma=GAMMA, cql_scale=0.0, awac_scale=0.0, beta=BETA)
    total.backward()
    # d loss / d V(s0) comes only from the expectile term: -2 * tau * u0 / n
    assert c["vs"].grad[0, 0].item() == pytest.approx(-2 * TAU * U[0] / 2, rel=1e-5)
    # V(s1) is V(s) of action 1 (expectile) and V(s') of action 0, detached in the TD target
    assert c["vs"].grad[0, 1].item() == pytest.approx(-2 * (1 - TAU) * U[1] / 2, rel=1e-5)
    assert c["vs"].grad[0, 2].item() == 0.0 and c["vs"].grad[0, 3].item() == 0.0
    # d loss / d Q1(s0, a0) = 2 (Q - y) / n
    assert c["qs"][0].grad[0, 0, 0].item() == pytest.approx(2 * (1.0 - Y[0]) / 2, rel=1e-5)


def test_awac_weights_are_constants():
    c = case(requires_grad=True)
    loss, _ = ilql_loss(**c, tau=TAU, gamma=GAMMA, cql_scale=0.0, awac_scale=1.0, beta=BETA)
    loss.backward()
    p0 = math.exp(0) / (math.exp(0) + math.exp(1))
    w0 = math.exp(BETA * U[0])
    assert c["logits"].grad[0, 0, 0].item() == pytest.approx(w0 * (p0 - 1) / 2, rel=1e-5)
    # V's gradient is the expectile term's alone, even though the weights depend on V
    assert c["vs"].grad[0, 0].item() == pytest.approx(-2 * TAU * U[0] / 2, rel=1e-5)
