"""Guided decoding inside the standard ``transformers`` ``generate``.

A `LogitsProcessor` only sees ``input_ids`` and the LM's scores, but the advantage needs the
last hidden state. `ILQLLogitsProcessor` therefore puts a forward hook on the LM's trunk that
keeps the last position's hidden state of every forward pass; when transformers calls the
processor right after that forward, it turns the LM scores into guided scores with the same
`Guide` that `ilql.generation.generate` uses. transformers applies its own repetition
penalty and ``min_new_tokens`` before custom processors and temperature / top-k / top-p
after them: the order of ilql's own loop, so both give the same tokens for the same seed::

    with ILQLLogitsProcessor(model, beta=4) as guided:
        torch.manual_seed(0)
        out = model.base_model.generate(ids, attention_mask=mask, logits_processor=[guided],
                                        do_sample=True, top_k=20, max_new_tokens=32, streamer=...)

`hf_generate(model, ids, beta=4, **hf_kwargs)` does exactly this.
"""

from __future__ import annotations

from typing import Optional

import torch
from transformers import LogitsProcessor

from .errors import ConfigError
from .generation import Guide, mask_logits


class ILQLLogitsProcessor(LogitsProcessor):
    """Replaces LM scores by guided scores. Use it as a context manager (or call `remove()`)
    so the hook on the trunk goes away afterwards.

    beta, weighting, advantage_clip: as in `ilql.generation.generate`.
    logit_mask: optional bool [vocab, vocab]; ``logit_mask[last_token]`` forbids next tokens.
    behaviour_top_k / behaviour_top_p: filter the behaviour policy before the advantage is
        added (the original ILQL's ``filter_on="behaviour"``); for trlx's order pass top_k /
        top_p to ``generate`` as usual instead.
    heads_dtype: e.g. "bfloat16": the heads run on a copy in that dtype (see `generate`).
    """

    def __init__(
        self,
        model,
        beta: float = 1,
        weighting: str = "exp",
        advantage_clip: Optional[float] = None,
        logit_mask: Optional[torch.Tensor] = None,
        behaviour_top_k: Optional[int] = None,
        behaviour_top_p: Optional[float] = None,
        heads_dtype: Optional[str] = None,
    ):
        behaviour = behaviour_top_k is not None or behaviour_top_p is not None
        self.guide = Guide(model, beta, weighting, advantage_clip, "behaviour" if behaviour else "guided",
                           behaviour_top_k, behaviour_top_p, heads_dtype)
        self.logit_mask = logit_mask
        self._hidden: Optional[torch.Tensor] = None
        self._handle = model.base_model.base_model.register_forward_hook(self._keep_last_hidden)

    def _keep_last_hidden(self, module, args, output) -> None:
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        self._hidden = hidden[:, -1].detach()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._hidden is None or self._hidden.shape[0] != scores.shape[0]:
            raise ConfigError(
                "ILQLLogitsProcessor saw no hidden state for this batch: use it with the generate() "
                "of the same model's base_model, and do not call remove() before generating"
            )
        logits = mask_logits(scores.float(), self.logit_mask, input_ids[:, -1])
        return self.guide(self._hidden, logits)[0]

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._hidden = None

    def __enter__(self) -> "ILQLLogitsProcessor":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def hf_generate(model, input_ids, beta: float = 1, weighting: str = "exp", advantage_clip=None, logit_mask=None,
                behaviour_top_k=None, behaviour_top_p=None, heads_dtype=None, **generate_kwargs):
    """``model.base_model.generate(...)`` with guided scores; `generate_kwargs` are the usual
    transformers arguments (do_sample, temperature, top_k, top_p, streamer, stopping_criteria,
    stop_strings + tokenizer, repetition_penalty, min_new_tokens, num_beams, ...). With
    ``num_beams > 1`` it sets ``renormalize_logits=True`` (unless given), which makes
    transformers' beam search rank beams like ``ilql``'s own `beam_search`. Note that
    transformers samples with ``top_k=50`` unless given another value (0 turns it off)."""
    processors = list(generate_kwargs.pop("logits_processor", None) or [])
    if generate_kwargs.get("num_beams", 1) > 1:
        # beams add up step scores: they must be the guided policy's normalised log-probs,
        # as in `ilql.search.beam_search`
        generate_kwargs.setdefault("renormalize_logits", True)
    with ILQLLogitsProcessor(model, beta, weighting, advantage_clip, logit_mask, behaviour_top_k,
                             behaviour_top_p, heads_dtype) as guided:
        was_training = model.training
        model.eval()
        try:
            return model.base_model.generate(input_ids, logits_processor=[guided, *processors], **generate_kwargs)
        finally:
            model.train(was_training)
