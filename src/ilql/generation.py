"""Advantage-guided decoding.

Each step turns the last position's hidden state h into next-token scores in a fixed order
(the same order `transformers` applies its processors, so `ilql.logits_process` reproduces
this loop exactly inside ``model.generate``):

1. behaviour logits ``logits(h)``; ``logit_mask[last_token]`` removes forbidden tokens,
   `repetition_penalty` penalises tokens already in the sequence, and EOS is forbidden until
   `min_new_tokens` tokens exist;
2. ``log_softmax``, then, with ``filter_on="behaviour"`` (the original ILQL), top-k / top-p
   keep the behaviour policy's best tokens;
3. the guidance term: ``beta * A`` (``weighting="exp"``, i.e. ``pi_beta * exp(beta * A)``) or
   ``beta * sign(A)`` (``weighting="sign"``), with ``A = min_i targetQ_i - V`` optionally
   clipped to ``[-advantage_clip, advantage_clip]``;
4. division by `temperature`, then, with ``filter_on="guided"`` (trlx, the default), top-k
   and top-p on the guided scores;
5. ``argmax`` (temperature 0) or a draw from ``softmax(scores)``.

Only the target Q heads and V run (never the trained Q heads), on the last position only,
with a KV cache; in behaviour-filter mode the Q heads run only at the kept candidates.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .errors import ConfigError

WEIGHTINGS = ("exp", "sign")
FILTER_STAGES = ("guided", "behaviour")
RANK_BY = ("advantage", "logprob", "mix")
SAMPLE_OVER = ("vocab", "candidates")
HEADS_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class GenerationOutput:
    """Sequences (prompt + new tokens) and per-sample statistics of the generated tokens.

    advantage: summed ``A(s, a)`` of the chosen tokens (unclipped).
    behaviour_logprob: summed ``log pi_beta(a | s)`` under the plain LM (beta = 0, no processing).
    kl: sum over steps of ``KL(pi_guided(.|s) || pi_beta(.|s))`` along the sampled path, an
        unbiased estimate of the sequence-level KL of the guided policy to the behaviour policy
        (for greedy or beam decoding pi_guided is a point mass, so the step term is ``-log pi_beta(a)``).
    num_new_tokens: generated tokens up to and including EOS / the stop string.
    """

    sequences: torch.Tensor
    advantage: torch.Tensor
    behaviour_logprob: torch.Tensor
    kl: torch.Tensor
    num_new_tokens: torch.Tensor


# ---------------------------------------------------------------------------- validation
def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and abs(x) != float("inf")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {expected}, got {value!r}")


# one checker per decoding argument that a config or the CLI may set
_CHECKS = {
    "beta": (lambda v: _is_real(v), "a finite number"),
    "max_new_tokens": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "min_new_tokens": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "max_length": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "temperature": (lambda v: _is_real(v) and v >= 0, "a finite number >= 0 (0 = greedy)"),
    "top_k": (lambda v: v is None or (_is_int(v) and v >= 0), "None or an integer >= 0 (0 = off)"),
    "top_p": (lambda v: v is None or (_is_real(v) and 0 < v <= 1), "None or a number in (0, 1]"),
    "repetition_penalty": (lambda v: _is_real(v) and v > 0, "a positive number (1 = off)"),
    "advantage_clip": (lambda v: v is None or (_is_real(v) and v > 0), "None or a positive number"),
    "weighting": (lambda v: v in WEIGHTINGS, f"one of {', '.join(WEIGHTINGS)}"),
    "filter_on": (lambda v: v in FILTER_STAGES, f"one of {', '.join(FILTER_STAGES)}"),
    "num_beams": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "best_of": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "rank_by": (lambda v: v in RANK_BY, f"one of {', '.join(RANK_BY)}"),
    "rank_weight": (lambda v: _is_real(v), "a finite number"),
    "sample_over": (lambda v: v in SAMPLE_OVER, f"one of {', '.join(SAMPLE_OVER)}"),
    "heads_dtype": (lambda v: v in (None, *HEADS_DTYPES), f"None or one of {', '.join(HEADS_DTYPES)}"),
    "stop_sequences": (
        lambda v: v is None or (isinstance(v, (list, tuple)) and all(isinstance(s, str) and s for s in v)),
        "None or a list of non-empty strings",
    ),
    "eos_token_id": (
        lambda v: v is None or _is_int(v) or (isinstance(v, (list, tuple)) and v and all(map(_is_int, v))),
        "None, a token id or a list of token ids",
    ),
    "pad_token_id": (lambda v: v is None or _is_int(v), "None or a token id"),
    "return_dict": (lambda v: isinstance(v, bool), "true or false"),
}
GEN_KWARGS = tuple(_CHECKS)


# arguments whose single value is already a list: for these only a list of lists is a sweep
LIST_VALUED = ("stop_sequences", "eos_token_id")


def swept_values(key: str, value: Any) -> Optional[list]:
    """The values a `gen_kwargs` entry sweeps over, or None when it is one setting: any list
    is a sweep (``beta=[0, 1]``), except for list-valued arguments, where a list of lists is."""
    if not isinstance(value, (list, tuple)):
        return None
    if key in LIST_VALUED and not (value and all(isinstance(v, (list, tuple)) for v in value)):
        return None
    return list(value)


def check_gen_kwargs(kwargs: Dict[str, Any], prefix: str = "gen_kwargs", sweep: bool = False) -> None:
    """Raise `ConfigError` naming ``prefix.key`` for an unknown key or a bad value.

    With ``sweep=True`` each value of a sweep (see `swept_values`) is checked on its own."""
    for key, value in kwargs.items():
        if key not in _CHECKS:
            raise ConfigError(f"unknown decoding argument {prefix}.{key}; allowed: {', '.join(GEN_KWARGS)}")
        ok, expected = _CHECKS[key]
        values = (swept_values(key, value) if sweep else None) or [value]
        for item in values:
            _check(ok(item), f"{prefix}.{key}", expected, item)


# ------------------------------------------------------------------------- score filters
def top_k_mask(scores: torch.Tensor, k: Optional[int]) -> torch.Tensor:
    """Keep the k highest scores per row, set the rest to -inf (k <= 0 or None keeps all)."""
    if not k or k <= 0 or k >= scores.shape[-1]:
        return scores
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, float("-inf"))


def top_p_mask(scores: torch.Tensor, p: Optional[float]) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of best tokens whose probability
    (``softmax(scores)``) reaches `p`; the best token always stays."""
    if p is None or p >= 1:
        return scores
    ascending, order = torch.sort(scores, dim=-1)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1 - p)
    drop[..., -1] = False
    return scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def penalize_repetitions(scores: torch.Tensor, sequences: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on every token id present in `sequences` (prompt included):
    negative scores are multiplied by `penalty`, positive ones divided."""
    if penalty == 1:
        return scores
    seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, sequences.clamp(0, scores.shape[-1] - 1), True)
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalized, scores)


def forbid_eos(scores: torch.Tensor, eos_ids: Union[None, int, Sequence[int]]) -> torch.Tensor:
    """Set the scores of every EOS id (ids outside the vocabulary are ignored) to -inf."""
    eos_ids = [i for i in _as_tuple(eos_ids) if 0 <= i < scores.shape[-1]]
    if not eos_ids:
        return scores
    vocab = torch.arange(scores.shape[-1], device=scores.device)
    return torch.where(torch.isin(vocab, torch.tensor(eos_ids, device=scores.device)), float("-inf"), scores)


def _as_tuple(eos_ids) -> tuple:
    if eos_ids is None:
        return ()
    return (eos_ids,) if isinstance(eos_ids, int) else tuple(eos_ids)


def is_eos(ids: torch.Tensor, eos_ids: Union[None, int, Sequence[int]]) -> torch.Tensor:
    eos_ids = _as_tuple(eos_ids)
    if not eos_ids:
        return torch.zeros_like(ids, dtype=torch.bool)
    if len(eos_ids) == 1:
        return ids == eos_ids[0]
    return torch.isin(ids, torch.tensor(eos_ids, device=ids.device))


# --------------------------------------------------------------------------- the guidance
def _head_at_candidates(head, hs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``head(hs).gather(-1, candidates)`` for hs [B, H] and candidates [B, C]: the last layer
    runs only for the C candidate rows of its weight."""
    *body, last = head
    z = hs
    for layer in body:
        z = layer(z)
    out = (last.weight[candidates] @ z.unsqueeze(-1)).squeeze(-1)
    return out + last.bias[candidates] if last.bias is not None else out


def _cast_heads(heads, dtype: torch.dtype):
    """Copies of V and the target Q heads in `dtype`, kept on `heads` (not as submodules, so
    never saved or trained) until a parameter changes (in-place updates bump its version) or
    moves, so repeated generate calls between training steps pay the cast once."""
    params = [p for m in (heads.v_head, *heads.target_q_heads) for p in m.parameters()]
    key = (dtype, tuple((p.data_ptr(), p._version) for p in params))
    cached = heads.__dict__.get("_cast_for_decoding")
    if cached is None or cached[0] != key:
        copies = (copy.deepcopy(heads.v_head).to(dtype), [copy.deepcopy(t).to(dtype) for t in heads.target_q_heads])
        heads.__dict__["_cast_for_decoding"] = cached = (key, copies)
    return cached[1]


class Guide:
    """Steps 2-3 of the module docstring: behaviour log-probs plus the advantage term.

    Shared by `generate`, `beam_search` and the transformers `LogitsProcessor`, so that every
    path computes exactly the same scores."""

    def __init__(
        self,
        model,
        beta: float = 1,
        weighting: str = "exp",
        advantage_clip: Optional[float] = None,
        filter_on: str = "guided",
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        heads_dtype: Optional[str] = None,
    ):
        check_gen_kwargs(dict(beta=beta, weighting=weighting, advantage_clip=advantage_clip,
                              filter_on=filter_on, top_k=top_k, top_p=top_p, heads_dtype=heads_dtype))
        self.model = model
        self.beta = beta
        self.weighting = weighting
        self.advantage_clip = advantage_clip
        self.filter_on = filter_on
        self.top_k = top_k
        self.top_p = top_p
        heads = model.ilql_heads
        self.v_head, self.target_heads = heads.v_head, list(heads.target_q_heads)
        dtype = getattr(torch, heads_dtype) if heads_dtype else None
        if dtype is not None and dtype != heads.v_head[0].weight.dtype:
            self.v_head, self.target_heads = _cast_heads(heads, dtype)
        self.heads_dtype = self.v_head[0].weight.dtype

    def advantage(self, hs: torch.Tensor, candidates: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``min_i targetQ_i - V`` over the vocabulary, or at `candidates` ([B, C] token ids)."""
        hs = hs.to(self.heads_dtype)
        q = None
        for head in self.target_heads:
            qi = head(hs) if candidates is None else _head_at_candidates(head, hs, candidates)
            q = qi if q is None else torch.minimum(q, qi)
        return (q - self.v_head(hs)).float()

    def chosen_advantage(self, hs, advantage: Optional[torch.Tensor], chosen: torch.Tensor) -> torch.Tensor:
        """A(s, a) of the chosen tokens [B] (computed at those tokens only when beta was 0)."""
        if advantage is None:
            return self.advantage(hs, chosen[:, None]).squeeze(-1)
        if isinstance(advantage, tuple):  # (candidates, their advantage): the chosen is one of them
            candidates, values = advantage
            slot = (candidates == chosen[:, None]).float().argmax(-1, keepdim=True)
            return values.gather(-1, slot).squeeze(-1)
        return advantage.gather(-1, chosen[:, None]).squeeze(-1)

    def guidance(self, advantage: torch.Tensor) -> torch.Tensor:
        if self.advantage_clip is not None:
            advantage = advantage.clamp(-self.advantage_clip, self.advantage_clip)
        if self.weighting == "sign":
            advantage = torch.sign(advantage)
        return self.beta * advantage

    def __call__(self, hs: torch.Tensor, logits: torch.Tensor):
        """Guided scores [B, V] and the advantage that went into them: [B, V], or in
        behaviour-filter mode a (candidates [B, C], advantage [B, C]) pair; None when beta is 0."""
        logp = F.log_softmax(logits, dim=-1)
        if self.filter_on != "behaviour":
            if self.beta == 0:
                return logp, None
            advantage = self.advantage(hs)
            return logp + self.guidance(advantage), advantage
        vocab = logp.shape[-1]
        if self.top_p is None and self.top_k and 0 < self.top_k < vocab:
            # top-k alone: a fixed number of candidates, no host sync
            kept_scores, candidates = logp.topk(self.top_k, dim=-1)
        else:
            kept = top_p_mask(top_k_mask(logp, self.top_k), self.top_p)
            if self.beta == 0:
                return kept, None
            # the heads run only at the kept tokens: at most max(kept per row) columns
            n_keep = int(torch.isfinite(kept).sum(-1).max())
            kept_scores, candidates = kept.topk(n_keep, dim=-1)
        if self.beta != 0:
            cand_adv = self.advantage(hs, candidates)
            kept_scores = kept_scores + self.guidance(cand_adv)
        scores = torch.full_like(logp, float("-inf")).scatter_(-1, candidates, kept_scores)
        return scores, ((candidates, cand_adv) if self.beta != 0 else None)


def mask_logits(logits: torch.Tensor, logit_mask: Optional[torch.Tensor], last_tokens: torch.Tensor) -> torch.Tensor:
    if logit_mask is None:
        return logits
    return logits.masked_fill(logit_mask[last_tokens].to(device=logits.device, dtype=torch.bool), float("-inf"))


def guided_scores(model, hs: torch.Tensor, beta: float, logit_mask=None, last_tokens=None) -> torch.Tensor:
    """Log-probabilities of the behaviour policy shifted by beta times the advantage."""
    logits = mask_logits(model.lm_logits(hs).float(), logit_mask, last_tokens)
    return Guide(model, beta=beta)(hs, logits)[0]


# ------------------------------------------------------------------------------ decoding
class _Stats:
    """Running per-row sums of the reported statistics (only when asked for)."""

    def __init__(self, rows: int, device):
        zeros = lambda: torch.zeros(rows, device=device)  # noqa: E731
        self.advantage, self.logprob, self.kl = zeros(), zeros(), zeros()
        self.count = torch.zeros(rows, dtype=torch.long, device=device)

    def add(self, active, chosen, raw_logp, chosen_adv, final_scores, greedy: bool, support=None) -> None:
        """`final_scores` are the scores the token was drawn from, over the whole vocabulary
        or over the token ids `support` [B, C] (the rest had probability 0)."""
        index = chosen[:, None]
        chosen_logp = raw_logp.gather(-1, index).squeeze(-1)
        if greedy:
            kl = -chosen_logp
        else:
            if support is not None:
                raw_logp = raw_logp.gather(-1, support)
            q_logp = F.log_softmax(final_scores, dim=-1)
            terms = torch.where(torch.isfinite(q_logp), q_logp.exp() * (q_logp - raw_logp), 0.0)
            kl = terms.sum(-1)
        on = active.float()
        self.advantage += on * chosen_adv
        self.logprob += on * chosen_logp
        self.kl += on * kl
        self.count += active.long()

    def select(self, index: torch.Tensor) -> None:
        for name in ("advantage", "logprob", "kl", "count"):
            setattr(self, name, getattr(self, name)[index])

    def output(self, sequences: torch.Tensor) -> GenerationOutput:
        return GenerationOutput(sequences, self.advantage, self.logprob, self.kl, self.count)


class _StopStrings:
    """Marks rows whose generated text contains a stop string (needs the tokenizer)."""

    def __init__(self, stop_sequences, tokenizer, prompt_len: int):
        if stop_sequences and tokenizer is None:
            raise ConfigError("stop_sequences needs tokenizer= to decode the generated tokens")
        self.stops = [s for s in (stop_sequences or []) if s]
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        # a new match ends in the newest token, so it lies within the last few tokens: a
        # character takes at most 4 byte-level tokens
        self.window = 4 * max(map(len, self.stops), default=0) + 4

    def __call__(self, samples: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
        if not self.stops:
            return finished
        rows = (~finished).nonzero().flatten().tolist()
        start = max(self.prompt_len, samples.shape[1] - self.window)
        texts = self.tokenizer.batch_decode(samples[rows, start:], skip_special_tokens=True)
        hit = [r for r, t in zip(rows, texts) if any(s in t for s in self.stops)]
        if hit:
            finished = finished.clone()
            finished[hit] = True
        return finished


def _resolve_special_ids(config, eos_token_id, pad_token_id):
    """EOS ids as a tuple (None: never stop at a token) and the pad id (default: the first EOS)."""
    eos_token_id = config.eos_token_id if eos_token_id is None else eos_token_id
    eos_ids = None if eos_token_id is None else tuple(
        eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    )
    pad_token_id = config.pad_token_id if pad_token_id is None else pad_token_id
    if pad_token_id is None:
        pad_token_id = eos_ids[0] if eos_ids else 0
    return eos_ids, pad_token_id


def _preprocess(logits, samples, n_new, logit_mask, repetition_penalty, min_new_tokens, eos_token_id):
    """Step 1: mask, repetition penalty, no EOS before `min_new_tokens`."""
    logits = mask_logits(logits, logit_mask, samples[:, -1])
    logits = penalize_repetitions(logits, samples, repetition_penalty)
    if n_new < min_new_tokens:
        logits = forbid_eos(logits, eos_token_id)
    return logits


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
    eos_token_id: Optional[Union[int, Sequence[int]]] = None,
    generator: Optional[torch.Generator] = None,
    *,
    top_p: Optional[float] = None,
    min_new_tokens: int = 0,
    repetition_penalty: float = 1.0,
    advantage_clip: Optional[float] = None,
    weighting: str = "exp",
    filter_on: str = "guided",
    stop_sequences: Optional[Sequence[str]] = None,
    tokenizer=None,
    num_beams: int = 1,
    best_of: int = 1,
    rank_by: str = "advantage",
    rank_weight: float = 1.0,
    sample_over: str = "vocab",
    heads_dtype: Optional[str] = None,
    return_dict: bool = False,
):
    """Generate continuations of a (left-padded) batch; returns prompt + new tokens, or a
    `GenerationOutput` with per-sample statistics when ``return_dict=True``.

    Decoding controls (see the module docstring for their order): beta, weighting ("exp" or
    "sign"), advantage_clip, temperature (0 = greedy), top_k (0/None = off), top_p,
    filter_on ("guided": top-k/top-p after adding the advantage, as trlx; "behaviour": on the
    behaviour policy before it, as the original ILQL), repetition_penalty, logit_mask
    ([vocab, vocab] bool, ``logit_mask[last_token]`` marks forbidden next tokens),
    min_new_tokens, stop_sequences (with `tokenizer`; a row stops once its text contains one).

    Search: ``num_beams > 1`` runs beam search over the normalised guided scores (see
    `beam_search`); ``sample_over="candidates"`` draws among the top-k survivors only (same
    distribution, much less random-number work, not transformers' random stream; the default
    "vocab" reproduces transformers' sampling exactly); ``heads_dtype="bfloat16"`` runs the V and
    target Q heads on a bfloat16 copy (faster on CPUs with bf16 units and on GPUs; the
    advantage then carries bf16 rounding); ``best_of = N`` draws N samples per prompt and keeps the best by `rank_by`:
    "advantage" (summed A), "logprob" (behaviour log-probability) or "mix"
    (``advantage + rank_weight * logprob``).

    Position ids follow the attention mask (``cumsum(mask) - 1``), so left padding does not
    shift positions. Rows that finished are filled with `pad_token_id` until every row is done
    or `max_new_tokens` (capped so the total stays within `max_length`) is reached. With
    `past_key_values` holding the first tokens of `input_ids`, only the rest are fed."""
    check_gen_kwargs(dict(
        beta=beta, max_new_tokens=max_new_tokens, max_length=max_length, temperature=temperature, top_k=top_k,
        top_p=top_p, min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty,
        advantage_clip=advantage_clip, weighting=weighting, filter_on=filter_on, num_beams=num_beams,
        best_of=best_of, rank_by=rank_by, rank_weight=rank_weight, stop_sequences=stop_sequences,
        sample_over=sample_over, heads_dtype=heads_dtype,
    ))
    eos_token_id, pad_token_id = _resolve_special_ids(model.config, eos_token_id, pad_token_id)
    _check_inputs(model, input_ids, attention_mask, logit_mask)
    common = dict(
        beta=beta, max_new_tokens=max_new_tokens, max_length=max_length, top_k=top_k, top_p=top_p,
        logit_mask=logit_mask, pad_token_id=pad_token_id, eos_token_id=eos_token_id,
        min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty, advantage_clip=advantage_clip,
        weighting=weighting, filter_on=filter_on, stop_sequences=stop_sequences, tokenizer=tokenizer,
        heads_dtype=heads_dtype,
    )
    if num_beams > 1 or best_of > 1:
        if past_key_values is not None:
            raise ConfigError("num_beams / best_of do not take past_key_values; pass the whole prompt")
        if num_beams > 1 and best_of > 1:
            raise ConfigError(f"choose num_beams ({num_beams}) or best_of ({best_of}), not both")
    if num_beams > 1:
        from .search import beam_search

        out = beam_search(model, input_ids, attention_mask, num_beams=num_beams, **common)
    elif best_of > 1:
        from .search import best_of_n

        out = best_of_n(model, input_ids, attention_mask, n=best_of, rank_by=rank_by, rank_weight=rank_weight,
                        temperature=temperature, generator=generator, sample_over=sample_over, **common)
    else:
        out = sample(model, input_ids, attention_mask, position_ids, past_key_values, temperature=temperature,
                     generator=generator, with_stats=return_dict, sample_over=sample_over, **common)
    return out if return_dict else out.sequences


def _choose(scores, greedy, top_k, top_p, filter_on, sample_over, generator):
    """Step 4's filters (guided mode) and step 5. Returns the chosen ids, the scores they were
    drawn from and those scores' token ids (None: the whole vocabulary).

    ``sample_over="candidates"`` (with top-k) draws among the k survivors only: the same
    distribution as a draw over the vocabulary, without a random number per vocabulary entry
    (what ``torch.multinomial`` spends most of its time on), but a different random stream
    than transformers' sampling."""
    if sample_over == "candidates" and not greedy and top_k and 0 < top_k < scores.shape[-1]:
        scores, support = scores.topk(top_k, dim=-1)
        if filter_on == "guided":
            scores = top_p_mask(scores, top_p)
        pick = torch.multinomial(F.softmax(scores, dim=-1), 1, generator=generator)
        return support.gather(-1, pick).squeeze(-1), scores, support
    if filter_on == "guided":
        scores = top_p_mask(top_k_mask(scores, top_k), top_p)
    if greedy:
        return scores.argmax(dim=-1), scores, None
    return torch.multinomial(F.softmax(scores, dim=-1), 1, generator=generator).squeeze(-1), scores, None


def _check_inputs(model, input_ids, attention_mask, logit_mask) -> None:
    """Shapes and token ids, checked before any forward pass."""
    from .errors import DataError, DataTypeError

    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        raise DataTypeError(f"input_ids must be an integer tensor [batch, length], got {_describe(input_ids)}")
    if input_ids.shape[1] == 0:
        raise DataError("input_ids is empty: every row needs at least one token (e.g. BOS)")
    vocab = model.ilql_heads.vocab_size
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
        raise DataError(f"input_ids hold ids outside the vocabulary [0, {vocab}): "
                        f"min {int(input_ids.min())}, max {int(input_ids.max())}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise DataError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}")
    if logit_mask is not None and (logit_mask.dim() != 2 or tuple(logit_mask.shape) != (vocab, vocab)):
        raise ConfigError(f"logit_mask must be a [{vocab}, {vocab}] tensor, got shape {tuple(logit_mask.shape)}")


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def _prepare(model, input_ids, attention_mask, position_ids, past_key_values):
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    if past_key_values is None:
        from transformers import DynamicCache

        past_key_values = DynamicCache(config=model.config)
    return attention_mask, position_ids, past_key_values


@torch.no_grad()
def sample(
    model, input_ids, attention_mask=None, position_ids=None, past_key_values=None, *, beta=1, max_new_tokens=32,
    max_length=1024, temperature=1, top_k=20, top_p=None, logit_mask=None, pad_token_id=0, eos_token_id=None,
    generator=None, min_new_tokens=0, repetition_penalty=1.0, advantage_clip=None, weighting="exp",
    filter_on="guided", stop_sequences=None, tokenizer=None, with_stats=True, sample_over="vocab", heads_dtype=None,
) -> GenerationOutput:
    """The sampling / greedy loop behind `generate` (one candidate per row)."""
    attention_mask, position_ids, past_key_values = _prepare(
        model, input_ids, attention_mask, position_ids, past_key_values
    )
    guide = Guide(model, beta, weighting, advantage_clip, filter_on, top_k, top_p, heads_dtype)
    stop_strings = _StopStrings(stop_sequences, tokenizer, input_ids.shape[1])
    greedy = temperature == 0
    rows, device = input_ids.shape[0], input_ids.device
    stats = _Stats(rows, device) if with_stats else None
    was_training = model.training
    model.eval()
    try:
        samples = input_ids
        past = past_key_values.get_seq_length()
        step_ids, step_positions = input_ids[:, past:], position_ids[:, past:]
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        for n_new in range(max(0, min(max_new_tokens, max_length - input_ids.shape[1]))):
            hs, past_key_values = model.hidden_states(
                step_ids, attention_mask, step_positions, past_key_values, use_cache=True
            )
            h = hs[:, -1]
            raw = model.lm_logits(h).float()
            logits = _preprocess(raw, samples, n_new, logit_mask, repetition_penalty, min_new_tokens, eos_token_id)
            scores, advantage = guide(h, logits)
            if not greedy and temperature != 1:
                scores = scores / temperature
            next_ids, scores, support = _choose(scores, greedy, top_k, top_p, filter_on, sample_over, generator)
            if stats is not None:
                chosen_adv = guide.chosen_advantage(h, advantage, next_ids)
                stats.add(~finished, next_ids, F.log_softmax(raw, dim=-1), chosen_adv, scores, greedy, support)
            next_ids = next_ids.masked_fill(finished, pad_token_id)
            samples = torch.cat([samples, next_ids[:, None]], dim=1)
            attention_mask = torch.cat([attention_mask, (~finished).long()[:, None]], dim=1)
            step_positions = step_positions[:, -1:] + 1
            step_ids = next_ids[:, None]
            finished = finished | is_eos(next_ids, eos_token_id)
            finished = stop_strings(samples, finished)
            # the one host sync per step: stopping needs it
            if (eos_token_id or stop_strings.stops) and bool(finished.all()):
                break
        if stats is None:
            stats = _Stats(0, device)
            return GenerationOutput(samples, stats.advantage, stats.logprob, stats.kl, stats.count)
        return stats.output(samples)
    finally:
        model.train(was_training)
