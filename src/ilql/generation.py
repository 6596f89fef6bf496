"""Advantage-guided decoding.

At every step, for the last position's hidden state h:

    scores = log_softmax(logits(h)) + beta * (min_i targetQ_i(h, .) - V(h))

then an optional ``logit_mask[last_token]`` removes forbidden tokens, top-k keeps the k best
scores, and the next token is ``argmax`` (temperature 0) or sampled from
``softmax(scores / temperature)``. beta = 0 is the plain LM; larger beta seeks reward.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def top_k_mask(scores: torch.Tensor, k: Optional[int]) -> torch.Tensor:
    """Keep the k highest scores per row, set the rest to -inf (k <= 0 or None keeps all)."""
    if not k or k <= 0 or k >= scores.shape[-1]:
        return scores
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, float("-inf"))


def guided_scores(model, hs: torch.Tensor, beta: float, logit_mask=None, last_tokens=None) -> torch.Tensor:
    """Log-probabilities of the behaviour policy shifted by beta times the advantage."""
    logits = model.lm_logits(hs).float()
    if logit_mask is not None:
        logits = logits.masked_fill(logit_mask[last_tokens].to(torch.bool), float("-inf"))
    scores = F.log_softmax(logits, dim=-1)
    if beta != 0:
        scores = scores + beta * model.ilql_heads.advantage(hs).float()
    return scores


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    position_ids: Optional[torch.Tensor] = None,
    past_key_values=None,
    beta: float = 1,
    max_new_tokens: int = 32,
    max_length: int = 1024,
    temperature: float = 1,
    top_k: Optional[int] = 20,
    logit_mask: Optional[torch.Tensor] = None,
    pad_token_id: Optional[int] = None,
    eos_token_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Generate continuations of a (left-padded) batch; returns prompt + new tokens.

    Position ids follow the attention mask (``cumsum(mask) - 1``), so left padding does not
    shift positions. Rows that emitted EOS are filled with `pad_token_id` until every row is
    done or `max_new_tokens` (capped so the total stays within `max_length`) is reached.
    With `past_key_values` holding the first tokens of `input_ids`, only the rest are fed."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    config = model.config
    eos_token_id = config.eos_token_id if eos_token_id is None else eos_token_id
    if isinstance(eos_token_id, (list, tuple)):
        eos_token_id = eos_token_id[0]
    pad_token_id = config.pad_token_id if pad_token_id is None else pad_token_id
    if pad_token_id is None:
        pad_token_id = eos_token_id
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    if past_key_values is None:
        from transformers import DynamicCache

        past_key_values = DynamicCache(config=config)

    was_training = model.training
    model.eval()
    try:
        samples = input_ids
        past = past_key_values.get_seq_length()
        step_ids, step_positions = input_ids[:, past:], position_ids[:, past:]
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max(0, min(max_new_tokens, max_length - input_ids.shape[1]))):
            hs, past_key_values = model.hidden_states(
                step_ids, attention_mask, step_positions, past_key_values, use_cache=True
            )
            scores = guided_scores(model, hs[:, -1], beta, logit_mask, samples[:, -1])
            scores = top_k_mask(scores, top_k)
            if temperature == 0:
                next_ids = scores.argmax(dim=-1)
            else:
                probs = F.softmax(scores / temperature, dim=-1)
                next_ids = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            next_ids = next_ids.masked_fill(finished, pad_token_id)
            samples = torch.cat([samples, next_ids[:, None]], dim=1)
            attention_mask = torch.cat([attention_mask, (~finished).long()[:, None]], dim=1)
            step_positions = step_positions[:, -1:] + 1
            step_ids = next_ids[:, None]
            if eos_token_id is not None:
                finished = finished | (next_ids == eos_token_id)
                if bool(finished.all()):
                    break
        return samples
    finally:
        model.train(was_training)
