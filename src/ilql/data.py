"""Samples and rewards -> episodes -> padded batches.

A sample is a plain string (one output after BOS), a ``[prompt, completion]`` pair, or a
dialogue ``[prompt_1, output_1, prompt_2, output_2, ...]``. Output tokens are actions: the
action at input position ``t + 1`` is chosen in the state whose hidden vector sits at position
``t``. An episode stores, as compact integer arrays:

- ``input_ids``: all tokens, an EOS appended to the last output;
- ``actions_ixs``: the positions t whose hidden state chooses an output token (at t + 1);
- ``states_ixs``: ``actions_ixs`` plus the last position (the state after the final action);
- ``rewards``: one per action, the sample's reward on its last action;
- ``dones``: one per state, 1 while the episode goes on and 0 at the terminal state (trlx's
  convention: it multiplies V(s') in the TD target).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .errors import DataError, DataTypeError

Sample = Union[str, Sequence[str]]


@dataclass
class Segment:
    is_output: bool
    tokens: List[int]


@dataclass
class Episode:
    input_ids: np.ndarray
    actions_ixs: np.ndarray
    states_ixs: np.ndarray
    rewards: np.ndarray
    dones: np.ndarray


def validate_samples(samples: Any, rewards: Any) -> Tuple[List[List[str]], np.ndarray]:
    """Check every sample and reward before any work; return dialogues and float64 rewards.

    Plain strings become ``[None, text]`` (the prompt is BOS, filled in at tokenization)."""
    if isinstance(samples, (str, bytes)) or not isinstance(samples, Sequence):
        raise DataTypeError(f"samples must be a list of samples, got {type(samples).__name__}")
    if isinstance(rewards, (str, bytes)) or not hasattr(rewards, "__len__"):
        raise DataTypeError(f"rewards must be a list of numbers, got {type(rewards).__name__}")
    if len(samples) == 0:
        raise DataError("the dataset is empty: give at least one sample")
    if len(samples) != len(rewards):
        raise DataError(f"got {len(samples)} samples but {len(rewards)} rewards: give one reward per sample")

    dialogues = []
    for i, sample in enumerate(samples):
        if isinstance(sample, str):
            dialogue = [None, sample]
        elif isinstance(sample, (list, tuple)):
            dialogue = list(sample)
            if len(dialogue) == 0 or len(dialogue) % 2:
                raise DataError(
                    f"sample {i}: a dialogue needs an even number of segments alternating prompt and "
                    f"output, got {len(dialogue)}"
                )
        else:
            raise DataTypeError(
                f"sample {i}: expected a string or a list of strings [prompt, output, ...], "
                f"got {type(sample).__name__}"
            )
        for j, text in enumerate(dialogue):
            if text is None and j == 0 and isinstance(sample, str):
                continue
            if not isinstance(text, str):
                raise DataTypeError(f"sample {i}, segment {j}: expected a string, got {type(text).__name__}")
            if j % 2 == 1 and text == "":
                raise DataError(f"sample {i}, segment {j}: the output is empty; every output needs text")
        dialogues.append(dialogue)

    values = np.empty(len(rewards), dtype=np.float64)
    for i, r in enumerate(rewards):
        if isinstance(r, torch.Tensor) and r.numel() == 1:
            r = r.item()
        if isinstance(r, np.generic):
            r = r.item()
        if isinstance(r, bool) or not isinstance(r, numbers.Real):
            raise DataTypeError(f"reward {i}: expected a number, got {type(r).__name__} ({r!r})")
        if not math.isfinite(r):
            raise DataError(f"reward {i}: expected a finite number, got {r!r}")
        values[i] = float(r)
    return dialogues, values


def standardize(rewards: np.ndarray) -> np.ndarray:
    """Zero mean, unit (sample) variance, as trlx does; a constant or single reward is only
    centred, never divided by zero."""
    if len(rewards) < 2:
        return rewards.copy()
    std = rewards.std(ddof=1)
    centred = rewards - rewards.mean()
    return centred / (std + np.finfo(np.float64).eps) if std > 0 else centred


def tokenize_dialogue(dialogue: List[Optional[str]], tokenizer, max_length: int, index: int = 0) -> List[Segment]:
    """Tokenize one validated dialogue into segments that fit in `max_length` tokens.

    EOS goes after the last output; truncation follows ``tokenizer.truncation_side``; a
    dialogue that starts with an output gets BOS (or EOS when there is no BOS) as its prompt,
    because the first action needs a state before it."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos_token: set one (it ends every output)")
    segments = []
    for j, text in enumerate(dialogue):
        tokens = [] if text is None else list(tokenizer(text, add_special_tokens=False).input_ids)
        if j % 2 == 1 and not tokens:
            raise DataError(f"sample {index}, segment {j}: the output tokenizes to no tokens")
        segments.append(Segment(is_output=j % 2 == 1, tokens=tokens))
    if not segments[-1].tokens or segments[-1].tokens[-1] != eos:
        segments[-1].tokens.append(eos)

    total = sum(len(s.tokens) for s in segments)
    if total > max_length:
        segments = _truncate(segments, max_length, tokenizer.truncation_side)
    segments = [s for s in segments if s.tokens]
    if not any(s.is_output for s in segments):
        raise DataError(
            f"sample {index}: no output token is left after truncation to train.seq_length={max_length} "
            f"(the sample has {total} tokens, truncated on the {tokenizer.truncation_side}); "
            "shorten the prompt or raise seq_length"
        )
    if segments[0].is_output:
        if sum(len(s.tokens) for s in segments) >= max_length:
            # make room for the BOS state
            if tokenizer.truncation_side == "left":
                segments[0].tokens = segments[0].tokens[1:]
            else:
                segments[-1].tokens = segments[-1].tokens[:-1]
            segments = [s for s in segments if s.tokens]
            if not any(s.is_output for s in segments):
                raise DataError(
                    f"sample {index}: no output token is left after truncation to "
                    f"train.seq_length={max_length}; raise seq_length"
                )
        segments.insert(0, Segment(is_output=False, tokens=[bos]))
    return segments


def _truncate(segments: List[Segment], max_length: int, side: str) -> List[Segment]:
    order = segments if side == "right" else segments[::-1]
    kept, budget = [], max_length
    for seg in order:
        take = max(0, min(len(seg.tokens), budget))
        tokens = seg.tokens[:take] if side == "right" else seg.tokens[len(seg.tokens) - take :]
        kept.append(Segment(seg.is_output, tokens))
        budget -= take
    return kept if side == "right" else kept[::-1]


def segments_to_episode(segments: List[Segment], reward: float) -> Episode:
    input_ids, actions = [], []
    for seg in segments:
        if seg.is_output:
            start = len(input_ids)
            actions.extend(range(start - 1, start + len(seg.tokens) - 1))
        input_ids.extend(seg.tokens)
    actions_ixs = np.asarray(actions, dtype=np.int64)
    states_ixs = np.append(actions_ixs, len(input_ids) - 1)
    rewards = np.zeros(len(actions_ixs), dtype=np.float32)
    rewards[-1] = reward
    dones = np.ones(len(states_ixs), dtype=np.int64)
    dones[-1] = 0
    return Episode(
        input_ids=np.asarray(input_ids, dtype=np.int64),
        actions_ixs=actions_ixs,
        states_ixs=states_ixs,
        rewards=rewards,
        dones=dones,
    )


def make_episodes(
    samples: Sequence[Sample],
    rewards: Sequence[float],
    tokenizer,
    max_length: int,
    standardize_rewards: bool = True,
) -> List[Episode]:
    """Validate, tokenize and index a dataset. Raises `DataError`/`DataTypeError` naming the
    sample before any training starts."""
    dialogues, values = validate_samples(samples, rewards)
    if standardize_rewards:
        values = standardize(values)
    return [
        segments_to_episode(tokenize_dialogue(d, tokenizer, max_length, index=i), float(r))
        for i, (d, r) in enumerate(zip(dialogues, values))
    ]


@dataclass
class ILQLBatch:
    """A right-padded batch. Index tensors are padded with 0 and masked by ``dones``/``rewards``."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    actions_ixs: torch.Tensor  # [B, A]
    states_ixs: torch.Tensor  # [B, A + 1]
    actions: torch.Tensor  # [B, A] token taken at each action position
    rewards: torch.Tensor  # [B, A]
    dones: torch.Tensor  # [B, A + 1], 1 = non-terminal state, 0 = terminal or padding

    def to(self, device) -> "ILQLBatch":
        return ILQLBatch(**{k: v.to(device, non_blocking=True) for k, v in self.__dict__.items()})

    @property
    def action_mask(self) -> torch.Tensor:
        """1 at real (non-padding) actions: every real action is taken in a non-terminal state."""
        return self.dones[:, :-1]


def _pad(arrays: List[np.ndarray], value, dtype) -> torch.Tensor:
    out = np.full((len(arrays), max(len(a) for a in arrays)), value, dtype=dtype)
    for row, a in zip(out, arrays):
        row[: len(a)] = a
    return torch.from_numpy(out)


class ILQLCollator:
    """Pads a list of episodes into an `ILQLBatch`."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, episodes: List[Episode]) -> ILQLBatch:
        actions = [e.input_ids[e.actions_ixs + 1] for e in episodes]
        return ILQLBatch(
            input_ids=_pad([e.input_ids for e in episodes], self.pad_token_id, np.int64),
            attention_mask=_pad([np.ones(len(e.input_ids), np.int64) for e in episodes], 0, np.int64),
            actions_ixs=_pad([e.actions_ixs for e in episodes], 0, np.int64),
            states_ixs=_pad([e.states_ixs for e in episodes], 0, np.int64),
            actions=_pad(actions, 0, np.int64),
            rewards=_pad([e.rewards for e in episodes], 0.0, np.float32),
            dones=_pad([e.dones for e in episodes], 0, np.int64),
        )


def validate_prompts(prompts: Any, name: str = "eval_prompts") -> List[str]:
    if prompts is None:
        return []
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise DataTypeError(f"{name} must be a list of strings, got {type(prompts).__name__}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise DataTypeError(f"{name}[{i}]: expected a string, got {type(p).__name__}")
    return list(prompts)


def load_jsonl(path) -> Tuple[List[Sample], List[float]]:
    """Read samples and rewards from a JSONL file: each line an object with ``reward`` and one
    of ``text`` (a string), ``prompt`` + ``completion``, or ``dialogue`` (a list of strings)."""
    import json

    samples, rewards = [], []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {line_no}: expected a JSON object, got {type(row).__name__}")
            if "reward" not in row:
                raise DataError(f"{path}, line {line_no}: column 'reward' is missing")
            if "text" in row:
                sample = row["text"]
            elif "prompt" in row and "completion" in row:
                sample = [row["prompt"], row["completion"]]
            elif "dialogue" in row:
                sample = row["dialogue"]
            else:
                raise DataError(
                    f"{path}, line {line_no}: expected column 'text', 'prompt'+'completion' or 'dialogue', "
                    f"got {sorted(row)}"
                )
            samples.append(sample)
            rewards.append(row["reward"])
    try:
        validate_samples(samples, rewards)
    except (DataError, DataTypeError) as e:
        raise type(e)(f"{path}: {e}") from None
    return samples, rewards
