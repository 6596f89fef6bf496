"""Search over guided scores: beam search and best-of-N re-ranking.

Both return a `GenerationOutput` with one sequence per prompt. They are reached through
``generate(..., num_beams=K)`` and ``generate(..., best_of=N)``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .generation import (
    RANK_BY,
    GenerationOutput,
    Guide,
    _preprocess,
    _prepare,
    _Stats,
    _StopStrings,
    is_eos,
    sample,
    top_k_mask,
    top_p_mask,
)


@torch.no_grad()
def beam_search(
    model, input_ids, attention_mask=None, *, num_beams: int = 4, beta=1, max_new_tokens=32, max_length=1024,
    top_k=None, top_p=None, logit_mask=None, pad_token_id=0, eos_token_id=None, min_new_tokens=0,
    repetition_penalty=1.0, advantage_clip=None, weighting="exp", filter_on="guided", stop_sequences=None,
    tokenizer=None, heads_dtype=None,
) -> GenerationOutput:
    """Keep the `num_beams` prefixes with the highest summed log-probability under the guided
    policy ``log_softmax(guided scores)`` (after the same filters as sampling; temperature
    does not change the ranking and is ignored). A finished beam keeps its score and competes
    with the open ones; the best beam per prompt is returned, so ``num_beams=1`` is greedy."""
    rows, width = input_ids.shape
    k = num_beams
    attention_mask, position_ids, cache = _prepare(model, input_ids, attention_mask, None, None)
    samples = input_ids.repeat_interleave(k, 0)
    step_positions = position_ids.repeat_interleave(k, 0)
    guide = Guide(model, beta, weighting, advantage_clip, filter_on, top_k, top_p, heads_dtype)
    stop_strings = _StopStrings(stop_sequences, tokenizer, width)
    stats = _Stats(rows * k, input_ids.device)
    # only the first copy of each prompt is live at the start, so the K beams differ
    beam_scores = torch.full((rows, k), float("-inf"), device=input_ids.device)
    beam_scores[:, 0] = 0
    finished = torch.zeros(rows * k, dtype=torch.bool, device=input_ids.device)
    was_training = model.training
    model.eval()
    try:
        # the prompt runs once; its cache is then copied for the K beams
        hs, cache = model.hidden_states(input_ids, attention_mask, position_ids, cache, use_cache=True)
        cache.batch_repeat_interleave(k)
        attention_mask = attention_mask.repeat_interleave(k, 0)
        h = hs[:, -1].repeat_interleave(k, 0)
        for n_new in range(max(0, min(max_new_tokens, max_length - width))):
            if n_new > 0:
                hs, cache = model.hidden_states(step_ids, attention_mask, step_positions, cache, use_cache=True)
                h = hs[:, -1]
            raw = model.lm_logits(h).float()
            logits = _preprocess(raw, samples, n_new, logit_mask, repetition_penalty, min_new_tokens, eos_token_id)
            scores, advantage = guide(h, logits)
            if filter_on == "guided":
                scores = top_p_mask(top_k_mask(scores, top_k), top_p)
            step_logp = F.log_softmax(scores, dim=-1)
            # a finished beam may only continue with padding, at no cost
            pad_only = torch.full_like(step_logp[:1], float("-inf"))
            pad_only[0, pad_token_id] = 0
            step_logp = torch.where(finished[:, None], pad_only, step_logp)
            vocab = step_logp.shape[-1]
            total = (beam_scores.reshape(-1, 1) + step_logp).view(rows, k * vocab)
            beam_scores, flat = total.topk(k, dim=-1)
            source = (torch.arange(rows, device=flat.device)[:, None] * k + flat // vocab).view(-1)
            next_ids = (flat % vocab).view(-1)

            _beam_stats(stats, guide, h, raw, advantage, finished, source, next_ids)
            finished = finished[source]
            samples = torch.cat([samples[source], next_ids[:, None]], dim=1)
            attention_mask = torch.cat([attention_mask[source], (~finished).long()[:, None]], dim=1)
            cache.reorder_cache(source)
            finished = finished | is_eos(next_ids, eos_token_id)
            finished = stop_strings(samples, finished)
            step_positions = step_positions[source][:, -1:] + 1
            step_ids = next_ids[:, None]
            if bool(finished.all()):
                break
        best = torch.arange(rows, device=samples.device) * k + beam_scores.argmax(-1)
        stats.select(best)
        return stats.output(samples[best])
    finally:
        model.train(was_training)


def _beam_stats(stats, guide, h, raw, advantage, finished, source, next_ids) -> None:
    """Add the chosen tokens' statistics to the beams they extend, then re-index the beams."""
    raw_logp = F.log_softmax(raw, dim=-1)[source]
    if isinstance(advantage, tuple):
        advantage = tuple(a[source] for a in advantage)
    elif advantage is not None:
        advantage = advantage[source]
    adv = guide.chosen_advantage(h[source], advantage, next_ids)
    stats.select(source)
    stats.add(~finished[source], next_ids, raw_logp, adv, None, greedy=True)


@torch.no_grad()
def best_of_n(
    model, input_ids, attention_mask=None, *, n: int = 4, rank_by: str = "advantage", rank_weight: float = 1.0,
    generator: Optional[torch.Generator] = None, **kwargs,
) -> GenerationOutput:
    """Draw `n` samples per prompt (rows ``i * n ... i * n + n - 1`` of one batched call) and
    keep the one with the highest rank score: summed advantage ("advantage"), behaviour
    log-probability ("logprob") or ``advantage + rank_weight * logprob`` ("mix")."""
    if rank_by not in RANK_BY:
        raise ConfigError(f"rank_by must be one of {', '.join(RANK_BY)}, got {rank_by!r}")
    rows = input_ids.shape[0]
    mask = None if attention_mask is None else attention_mask.repeat_interleave(n, 0)
    out = sample(model, input_ids.repeat_interleave(n, 0), mask, generator=generator, with_stats=True, **kwargs)
    score = rank_scores(out, rank_by, rank_weight).view(rows, n)
    best = torch.arange(rows, device=score.device) * n + score.argmax(-1)
    return GenerationOutput(
        out.sequences[best], out.advantage[best], out.behaviour_logprob[best], out.kl[best], out.num_new_tokens[best]
    )


def rank_scores(out: GenerationOutput, rank_by: str = "advantage", rank_weight: float = 1.0) -> torch.Tensor:
    if rank_by == "advantage":
        return out.advantage
    if rank_by == "logprob":
        return out.behaviour_logprob
    return out.advantage + rank_weight * out.behaviour_logprob
