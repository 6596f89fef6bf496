"""The ILQL loss (Snell et al. 2022, "Offline RL for Natural Language Generation with Implicit
Language Q Learning"), as one pure function.

Notation, per episode: actions a_t at action states s_t (t = 0..A-1), the state after the
last action s_A, rewards r_t, ``nonterminal(s)`` = 1 except at the terminal state (``dones``).
Every sum runs over real (non-padding) actions and is divided by their count N.

    Q loss     L_Q   = sum_i sum_t (Q_i(s_t, a_t) - y_t)^2 / N,
                       y_t = r_t + gamma * V(s_{t+1}) * nonterminal(s_{t+1})   (V detached)
    V loss     L_V   = sum_t |tau - 1[u_t < 0]| * u_t^2 / N,
                       u_t = min_i targetQ_i(s_t, a_t) - V(s_t)                 (expectile tau)
    CQL        L_CQL = sum_i sum_t (logsumexp_a Q_i(s_t, a) - Q_i(s_t, a_t)) / N
    AWAC       L_AW  = sum_t w_t * (-log pi(a_t | s_t)) / N,  w_t = exp(beta * u_t)  (detached)

    loss = L_Q + L_V + cql_scale * L_CQL + awac_scale * L_AW
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F


def ilql_loss(
    *,
    logits: torch.Tensor,
    qs: Sequence[torch.Tensor],
    target_qs: Sequence[torch.Tensor],
    vs: torch.Tensor,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    dones: torch.Tensor,
    tau: float,
    gamma: float,
    cql_scale: float,
    awac_scale: float,
    beta: float,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Compute the ILQL loss and its statistics.

    Args:
        logits: LM logits at the action states, [B, A, V].
        qs: each Q head at the action states over the vocabulary, [B, A, V].
        target_qs: each target Q head's value of the taken action, [B, A].
        vs: V at the states (action states plus the final state), [B, A + 1].
        actions: the taken tokens, [B, A]; rewards: [B, A];
        dones: [B, A + 1], 1 for non-terminal states, 0 for terminal states and padding.

    Returns the scalar loss and a flat dict of detached scalar tensors.
    """
    mask = dones[:, :-1].to(vs.dtype)  # real actions
    n = mask.sum().clamp(min=1)
    vocab = logits.shape[-1]

    def masked_mean(x: torch.Tensor) -> torch.Tensor:
        return (x * mask).sum() / n

    def cross_entropy(x: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(x.reshape(-1, vocab).float(), actions.reshape(-1), reduction="none").view_as(mask)

    v = vs[:, :-1]
    v_next = vs[:, 1:].detach() * dones[:, 1:].to(vs.dtype)
    td_target = rewards + gamma * v_next
    q_taken = [q.gather(-1, actions.unsqueeze(-1)).squeeze(-1) for q in qs]
    loss_qs = [masked_mean((q - td_target) ** 2) for q in q_taken]

    target_q = torch.stack([t.detach() for t in target_qs]).min(dim=0).values
    u = target_q - v
    expectile_weight = torch.where(u >= 0, tau, 1 - tau)
    loss_v = masked_mean(expectile_weight * u**2)

    # cross entropy of a Q head over the vocabulary = logsumexp_a Q(s, a) - Q(s, a_t)
    loss_cql = sum(masked_mean(cross_entropy(q)) for q in qs)

    awac_weight = torch.exp(beta * u.detach())
    loss_awac = masked_mean(awac_weight * cross_entropy(logits))

    loss = sum(loss_qs) + loss_v + cql_scale * loss_cql + awac_scale * loss_awac

    stats = {
        "losses/loss": loss,
        "losses/loss_q": sum(loss_qs),
        "losses/loss_v": loss_v,
        "losses/loss_cql": loss_cql,
        "losses/loss_awac": loss_awac,
        "values/v": masked_mean(v),
        "values/target_q": masked_mean(target_q),
        "values/advantage": masked_mean(u),
        "values/awac_weight": masked_mean(awac_weight),
    }
    for i, q in enumerate(q_taken):
        stats[f"values/q{i + 1}"] = masked_mean(q)
        stats[f"losses/loss_q{i + 1}"] = loss_qs[i]
    return loss, {k: v.detach() for k, v in stats.items()}
