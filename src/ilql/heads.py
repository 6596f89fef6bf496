"""ILQL heads on the LM's last hidden state: V, one or two Q heads and their target copies.

Each head is a two-layer MLP (hidden -> 2 * hidden -> out), as in the ILQL paper and trlx.
Target Q heads are never trained by the optimizer; they follow the Q heads by Polyak averaging
``target <- alpha * q + (1 - alpha) * target`` (see `sync_target_q_heads`).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn


def make_head(hidden_size: int, out_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(hidden_size, 2 * hidden_size),
        nn.ReLU(),
        nn.Linear(2 * hidden_size, out_size),
    )


def head_body(head: nn.Sequential, hs: torch.Tensor) -> Tuple[torch.Tensor, nn.Linear]:
    """The input of the head's last (linear) layer, and that layer."""
    *body, last = head
    h = hs
    for layer in body:
        h = layer(h)
    return h, last


def head_at_actions(head: nn.Sequential, hs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """``head(hs).gather(-1, actions)`` without computing the other vocabulary columns.

    The last layer is linear, so the value of one action is a dot product with one row of its
    weight: O(hidden) per position instead of O(hidden * vocab)."""
    h, last = head_body(head, hs)
    if hasattr(last, "at_actions"):  # a vocabulary-parallel layer (ilql.parallel) picks its own rows
        return last.at_actions(h, actions)
    weight = last.weight[actions]  # [..., 2h]
    out = (h.unsqueeze(-2) @ weight.unsqueeze(-1)).squeeze(-1).squeeze(-1)
    return out + last.bias[actions] if last.bias is not None else out


class ILQLHeads(nn.Module):
    def __init__(self, hidden_size: int, vocab_size: int, two_qs: bool = True, alpha: float = 0.99):
        super().__init__()
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        self.two_qs = two_qs
        self.alpha = alpha
        n_qs = 2 if two_qs else 1
        self.v_head = make_head(hidden_size, 1)
        self.q_heads = nn.ModuleList(make_head(hidden_size, vocab_size) for _ in range(n_qs))
        self.target_q_heads = nn.ModuleList(make_head(hidden_size, vocab_size) for _ in range(n_qs))
        for target, q in zip(self.target_q_heads, self.q_heads):
            target.load_state_dict(q.state_dict())
            target.requires_grad_(False)

    def forward(
        self, states_hs: torch.Tensor, actions_hs: torch.Tensor, actions: Optional[torch.Tensor] = None
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor], torch.Tensor]:
        """Q over the vocabulary at action states, target Q and V.

        With `actions`, the target Q heads are evaluated only at the taken actions (shape
        [..., A]), which is all the losses need; without, over the vocabulary."""
        qs = [q(actions_hs) for q in self.q_heads]
        with torch.no_grad():
            if actions is None:
                target_qs = [t(actions_hs) for t in self.target_q_heads]
            else:
                target_qs = [head_at_actions(t, actions_hs, actions) for t in self.target_q_heads]
        vs = self.v_head(states_hs).squeeze(-1)
        return qs, target_qs, vs

    def loss_features(self, states_hs: torch.Tensor, actions_hs: torch.Tensor, actions: torch.Tensor):
        """What the chunked loss needs: each Q head's last-layer input and that layer (so that
        no [..., V] tensor is built here), target Q at the taken actions, and V."""
        q_bodies = [head_body(q, actions_hs) for q in self.q_heads]
        with torch.no_grad():
            target_qs = [head_at_actions(t, actions_hs, actions) for t in self.target_q_heads]
        vs = self.v_head(states_hs).squeeze(-1)
        return q_bodies, target_qs, vs

    def advantage(self, hs: torch.Tensor) -> torch.Tensor:
        """``min_i targetQ_i(s, .) - V(s)`` over the vocabulary: what guided decoding adds."""
        q = self.target_q_heads[0](hs)
        for head in self.target_q_heads[1:]:
            q = torch.minimum(q, head(hs))
        return q - self.v_head(hs)

    @torch.no_grad()
    def sync_target_q_heads(self, alpha: Optional[float] = None) -> None:
        """Polyak averaging: ``target <- alpha * q + (1 - alpha) * target``."""
        alpha = self.alpha if alpha is None else alpha
        for target, q in zip(self.target_q_heads, self.q_heads):
            for t_param, q_param in zip(target.parameters(), q.parameters()):
                t_param.lerp_(q_param.detach(), alpha)
