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

Two implementations of the same equations:

- `ilql_loss` is the readable reference: it takes the LM logits and the Q heads over the whole
  vocabulary ([B, A, V] tensors) and is what the tests check everything else against.
- `ilql_loss_chunked` takes the inputs of the vocabulary-sized output layers instead
  (`VocabHeadInputs`) and computes the two cross entropies (CQL and AWAC) chunk by chunk over
  positions with `linear_cross_entropy`, so memory is bounded by ``chunk_size x V`` rather than
  ``B x A x V``. The TD, expectile and AWAC-weight terms only need Q at the taken action, a dot
  product per position. Gradients agree with `ilql_loss` to float rounding.

Both accumulate the losses in float32, whatever dtype the model computes in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

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
    mask = dones[:, :-1].float()  # real actions
    n = mask.sum().clamp(min=1)
    vocab = logits.shape[-1]

    def masked_mean(x: torch.Tensor) -> torch.Tensor:
        return (x * mask).sum() / n

    def cross_entropy(x: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(x.reshape(-1, vocab).float(), actions.reshape(-1), reduction="none").view_as(mask)

    q_taken = [q.gather(-1, actions.unsqueeze(-1)).squeeze(-1) for q in qs]
    terms = _value_terms(q_taken, target_qs, vs, rewards, dones, masked_mean, tau=tau, gamma=gamma, beta=beta)

    # cross entropy of a Q head over the vocabulary = logsumexp_a Q(s, a) - Q(s, a_t)
    loss_cql = sum(masked_mean(cross_entropy(q)) for q in qs)
    loss_awac = masked_mean(terms["awac_weight"] * cross_entropy(logits))
    return _combine(terms, loss_cql, loss_awac, masked_mean, cql_scale=cql_scale, awac_scale=awac_scale)


def _value_terms(q_taken, target_qs, vs, rewards, dones, masked_mean, *, tau: float, gamma: float, beta: float) -> Dict:
    """TD losses of the Q heads, the expectile V loss and the (detached) AWAC weights, in float32."""
    vs = vs.float()
    v = vs[:, :-1]
    v_next = vs[:, 1:].detach() * dones[:, 1:].float()
    td_target = rewards.float() + gamma * v_next
    q_taken = [q.float() for q in q_taken]
    loss_qs = [masked_mean((q - td_target) ** 2) for q in q_taken]

    target_q = torch.stack([t.detach().float() for t in target_qs]).min(dim=0).values
    u = target_q - v
    expectile_weight = torch.where(u >= 0, tau, 1 - tau)
    loss_v = masked_mean(expectile_weight * u**2)
    awac_weight = torch.exp(beta * u.detach())
    return dict(q_taken=q_taken, loss_qs=loss_qs, loss_v=loss_v, v=v, target_q=target_q, u=u, awac_weight=awac_weight)


def _combine(terms, loss_cql, loss_awac, masked_mean, *, cql_scale: float, awac_scale: float):
    """The total loss and the statistics, shared by both implementations."""
    loss_qs, loss_v, awac_weight = terms["loss_qs"], terms["loss_v"], terms["awac_weight"]
    loss = sum(loss_qs) + loss_v + cql_scale * loss_cql + awac_scale * loss_awac
    v, target_q, u, q_taken = terms["v"], terms["target_q"], terms["u"], terms["q_taken"]
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


# ------------------------------------------------------------------------ the chunked path
@dataclass
class VocabHeadInputs:
    """What `ilql_loss_chunked` needs instead of [B, A, V] tensors: the input of every
    vocabulary-sized output layer at the action states, and that layer's parameters.

    lm_hs: [B, A, H] input of the LM head; lm_weight [V, H], lm_bias [V] or None;
        lm_softcap: final logit soft-capping (``cap * tanh(z / cap)``, Gemma) or None.
    q_hs: per Q head, [B, A, H'] input of its last linear layer; q_weights [V, H'], q_biases [V].
    target_qs: per target Q head, its value of the taken action, [B, A].
    vs: V at the states, [B, A + 1].
    """

    lm_hs: torch.Tensor
    lm_weight: torch.Tensor
    lm_bias: Optional[torch.Tensor]
    q_hs: List[torch.Tensor]
    q_weights: List[torch.Tensor]
    q_biases: List[Optional[torch.Tensor]]
    target_qs: List[torch.Tensor]
    vs: torch.Tensor
    lm_softcap: Optional[float] = None


class _LinearCrossEntropy(torch.autograd.Function):
    """``sum_t w_t * CE(softcap(h_t @ W^T + b), y_t)`` over row chunks, never holding more than
    one [chunk, V] block of logits.

    The loss is linear in the per-row cross entropies with weights known in advance, so the
    gradient of each chunk is computed right after its logits (softmax - onehot, scaled by w)
    and accumulated; backward only rescales by the incoming scalar. That is three matmuls per
    chunk, the same as autograd on the full logits, and no recomputation."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, row_weights, chunk_size, softcap):
        device = h.device.type
        # under autocast, the matmuls run in the autocast dtype; everything else in float32
        mm_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        with torch.autocast(device, enabled=False):
            w = weight.detach().to(mm_dtype)
            b = None if bias is None else bias.detach().float()
            grad_h = torch.zeros_like(h) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
            grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=h.device) if need_b else None
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for start in range(0, h.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                hc = h[rows].detach().to(mm_dtype)
                z = (hc @ w.T).float()
                if b is not None:
                    z += b
                capped = torch.tanh(z / softcap) if softcap else None
                logits = capped * softcap if softcap else z
                y = targets[rows].unsqueeze(-1)
                wc = row_weights[rows].float().unsqueeze(-1)
                taken = logits.gather(-1, y)
                # logsumexp by hand, leaving exp(logits - max) in the logits buffer for the gradient
                top = logits.amax(-1, keepdim=True)
                g = logits.sub_(top).exp_()
                sum_exp = g.sum(-1, keepdim=True)
                total += (wc * (top + sum_exp.log() - taken)).sum()
                if not (need_h or need_w or need_b):
                    continue
                # d CE / d logits = w * (softmax - onehot)
                g.mul_(wc / sum_exp)
                g.scatter_add_(-1, y, -wc)
                if softcap:
                    g.mul_(1 - capped * capped)
                if need_b:
                    grad_b += g.sum(0)
                g = g.to(mm_dtype)
                if need_h:
                    grad_h[rows] = (g @ w).to(h.dtype)
                if need_w and g.dtype == grad_w.dtype:
                    grad_w.addmm_(g.T, hc)  # no [V, H] temporary per chunk
                elif need_w:
                    grad_w += g.T @ hc
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        scale = lambda g, dtype=None: None if g is None else (g * grad_out).to(dtype or g.dtype)  # noqa: E731
        return scale(grad_h), scale(grad_w, w_dtype), scale(grad_b, b_dtype), None, None, None, None


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    row_weights: torch.Tensor,
    chunk_size: int = 256,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """``sum_t row_weights[t] * cross_entropy(h[t] @ weight.T + bias, targets[t])`` in float32,
    in memory bounded by ``chunk_size x V``. `h` is [..., H]; `targets`, `row_weights` match
    its leading dims; `row_weights` is treated as a constant (no gradient)."""
    hidden = h.shape[-1]
    return _LinearCrossEntropy.apply(
        h.reshape(-1, hidden),
        weight,
        bias,
        targets.reshape(-1),
        row_weights.detach().reshape(-1),
        int(chunk_size),
        softcap,
    )


def _taken_value(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], actions: torch.Tensor):
    """``(h @ weight.T + bias).gather(-1, actions)`` with one weight row per position."""
    out = (h.float() * weight[actions].float()).sum(-1)
    return out + bias[actions].float() if bias is not None else out


def ilql_loss_chunked(
    *,
    inputs: VocabHeadInputs,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    dones: torch.Tensor,
    tau: float,
    gamma: float,
    cql_scale: float,
    awac_scale: float,
    beta: float,
    chunk_size: int = 256,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """`ilql_loss` from the inputs of the vocabulary-sized layers, in bounded memory.

    Same arguments and results as `ilql_loss`, except that `inputs` replaces logits, qs,
    target_qs and vs; the CQL and AWAC cross entropies run `chunk_size` positions at a time."""
    mask = dones[:, :-1].float()
    n = mask.sum().clamp(min=1)

    def masked_mean(x: torch.Tensor) -> torch.Tensor:
        return (x * mask).sum() / n

    q_taken = [_taken_value(h, w, b, actions) for h, w, b in zip(inputs.q_hs, inputs.q_weights, inputs.q_biases)]
    terms = _value_terms(q_taken, inputs.target_qs, inputs.vs, rewards, dones, masked_mean, tau=tau, gamma=gamma, beta=beta)

    row_weights = mask / n  # the masked mean, as per-row weights of the summed cross entropy
    loss_cql = sum(
        linear_cross_entropy(h, w, b, actions, row_weights, chunk_size)
        for h, w, b in zip(inputs.q_hs, inputs.q_weights, inputs.q_biases)
    )
    loss_awac = linear_cross_entropy(
        inputs.lm_hs, inputs.lm_weight, inputs.lm_bias, actions, terms["awac_weight"] * row_weights,
        chunk_size, inputs.lm_softcap,
    )
    return _combine(terms, loss_cql, loss_awac, masked_mean, cql_scale=cql_scale, awac_scale=awac_scale)
