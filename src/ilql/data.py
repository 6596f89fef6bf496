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

A reward is one of:

- a number: it sits on the last action (the EOS that ends the last output);
- a list of numbers, one per output segment (per-turn rewards): each sits on the last action
  of its segment (for the last segment, its EOS);
- ``TokenRewards(values)``: one value per output token as the tokenizer splits the outputs
  (the EOS that ilql appends gets 0).

When truncation cuts away actions that carry rewards, their rewards move to the nearest kept
action, so an episode's return (the sum of its rewards) survives truncation. Standardization
makes the returns zero-mean and unit-variance: every reward is divided by the returns' std and
the mean is subtracted on the final action; a scalar reward thus behaves exactly as in trlx.
"""

from __future__ import annotations

import math
import numbers
import os
from array import array
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .errors import DataError, DataTypeError

Sample = Union[str, Sequence[str]]

# dialogues are tokenized this many at a time: batched calls are fast, and the token lists of
# one chunk are all that is held as Python objects
ENCODE_CHUNK = 4096


class TokenRewards:
    """Per-token rewards of one sample: one value per output token, in order over all its output
    segments, as ``tokenizer(output, add_special_tokens=False)`` splits them (the EOS that ilql
    appends to the last output gets 0). The wrapper tells them apart from per-turn lists."""

    def __init__(self, values: Any):
        self.values = values

    def __repr__(self) -> str:
        return f"TokenRewards({np.asarray(self.values).tolist()!r})"


Reward = Union[float, np.ndarray, TokenRewards]


@dataclass
class Segment:
    is_output: bool
    tokens: List[int]
    rewards: Optional[np.ndarray] = None  # float64, one per token of an output; None for prompts


@dataclass
class Episode:
    input_ids: np.ndarray
    actions_ixs: np.ndarray
    states_ixs: np.ndarray
    rewards: np.ndarray
    dones: np.ndarray


FLOAT32_MAX = float(np.finfo(np.float32).max)


def _number(r: Any, where: str) -> float:
    if isinstance(r, torch.Tensor) and r.numel() == 1:
        r = r.item()
    if isinstance(r, np.generic):
        r = r.item()
    if isinstance(r, bool) or not isinstance(r, numbers.Real):
        raise DataTypeError(f"{where}: expected a number, got {type(r).__name__} ({r!r})")
    try:
        value = float(r)
    except OverflowError:  # an int beyond float range
        raise DataError(f"{where}: expected a finite number, got an integer of {int(r).bit_length()} bits") from None
    if not math.isfinite(value):
        raise DataError(f"{where}: expected a finite number, got {r!r}")
    if abs(value) > FLOAT32_MAX:  # rewards train in float32: this one would become inf there
        raise DataError(f"{where}: {value!r} is outside the float32 range (|reward| <= {FLOAT32_MAX:.4g}); rescale the rewards")
    return value


def _numbers(values: Any, where: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    if isinstance(values, np.ndarray) and values.ndim != 1:
        raise DataError(f"{where}: expected a flat list of numbers, got an array of shape {values.shape}")
    return np.asarray([_number(v, f"{where}[{k}]") for k, v in enumerate(values)], dtype=np.float64)


def validate_reward(reward: Any, index: int, n_outputs: int) -> Reward:
    """One sample's reward as a float, a float64 array (one per output segment) or
    `TokenRewards` holding a float64 array."""
    where = f"reward {index}"
    if isinstance(reward, TokenRewards):
        values = _numbers(reward.values, f"{where} (per token)")
        if len(values) == 0:
            raise DataError(f"{where}: TokenRewards is empty; give one value per output token")
        return TokenRewards(values)
    if isinstance(reward, torch.Tensor):  # a one-element tensor stays a scalar
        reward = reward.item() if reward.numel() == 1 else reward.detach().cpu().numpy()
    if isinstance(reward, np.ndarray) and reward.ndim == 0:
        reward = reward.item()
    if isinstance(reward, (list, tuple, np.ndarray)):
        values = _numbers(reward, where)
        if len(values) != n_outputs:
            raise DataError(
                f"{where}: got {len(values)} per-turn rewards but sample {index} has {n_outputs} output "
                f"segment(s); give one reward per output segment (or TokenRewards for one per token)"
            )
        return values
    return _number(reward, where)


def as_dialogue(sample: Sample) -> List[Optional[str]]:
    """A checked sample as a dialogue: a plain string becomes ``[None, text]`` (the prompt is
    BOS, filled in at tokenization)."""
    return [None, sample] if isinstance(sample, str) else list(sample)


def check_samples(samples: Any, rewards: Any) -> Union[np.ndarray, List[Reward]]:
    """Check every sample and reward before any work, keeping no per-sample copies (a dataset
    may be large); return the rewards: a float64 array when every reward is a number, else a
    list of `Reward`."""
    if isinstance(samples, (str, bytes)) or not isinstance(samples, Sequence):
        raise DataTypeError(f"samples must be a list of samples, got {type(samples).__name__}")
    if isinstance(rewards, (str, bytes)) or not hasattr(rewards, "__len__"):
        raise DataTypeError(f"rewards must be a list of numbers, got {type(rewards).__name__}")
    if len(samples) == 0:
        raise DataError("the dataset is empty: give at least one sample")
    if len(samples) != len(rewards):
        raise DataError(f"got {len(samples)} samples but {len(rewards)} rewards: give one reward per sample")

    scalars = np.empty(len(samples), dtype=np.float64)
    others: Dict[int, Reward] = {}  # per-turn and per-token rewards, by sample
    for i, (sample, reward) in enumerate(zip(samples, rewards)):
        if isinstance(sample, str):
            segments: Sequence[Any] = (None, sample)
        elif isinstance(sample, (list, tuple)):
            segments = sample
            if len(segments) == 0 or len(segments) % 2:
                raise DataError(
                    f"sample {i}: a dialogue needs an even number of segments alternating prompt and "
                    f"output, got {len(segments)}"
                )
        else:
            raise DataTypeError(
                f"sample {i}: expected a string or a list of strings [prompt, output, ...], "
                f"got {type(sample).__name__}"
            )
        for j, text in enumerate(segments):
            if text is None and j == 0 and isinstance(sample, str):
                continue
            if not isinstance(text, str):
                raise DataTypeError(f"sample {i}, segment {j}: expected a string, got {type(text).__name__}")
            if j % 2 == 1 and text == "":
                raise DataError(f"sample {i}, segment {j}: the output is empty; every output needs text")
            if not text.isascii():
                _check_encodable(text, f"sample {i}, segment {j}")
        value = validate_reward(reward, i, len(segments) // 2)
        if isinstance(value, float):
            scalars[i] = value
        else:
            others[i] = value
    if not others:
        return scalars
    return [others[i] if i in others else float(scalars[i]) for i in range(len(scalars))]


def validate_samples(samples: Any, rewards: Any) -> Tuple[List[List[str]], Union[np.ndarray, List[Reward]]]:
    """`check_samples`, returning the dialogues too (see `as_dialogue`)."""
    values = check_samples(samples, rewards)
    return [as_dialogue(s) for s in samples], values


def _check_encodable(text: str, where: str) -> None:
    """Tokenizers need UTF-8: a lone surrogate (e.g. from a bad decode) cannot be tokenized."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(
            f"{where}: the text is not valid Unicode ({e.reason} at character {e.start}); it cannot be tokenized"
        ) from None


def standardize(rewards: np.ndarray) -> np.ndarray:
    """Zero mean, unit (sample) variance, as trlx does; a constant or single reward is only
    centred, never divided by zero."""
    if len(rewards) < 2:
        return rewards.copy()
    std = rewards.std(ddof=1)
    centred = rewards - rewards.mean()
    return centred / (std + np.finfo(np.float64).eps) if std > 0 else centred


def episode_return(reward: Reward) -> float:
    if isinstance(reward, TokenRewards):
        return float(reward.values.sum())
    if isinstance(reward, np.ndarray):
        return float(reward.sum())
    return float(reward)


def return_stats(rewards: Union[np.ndarray, Sequence[Reward]]) -> Tuple[float, float]:
    """(mean, divisor) that `standardize` applies to the episode returns: an episode's rewards
    are divided by the divisor and the mean is taken off its final action."""
    if isinstance(rewards, np.ndarray):
        returns = rewards.astype(np.float64)
    else:
        returns = np.asarray([episode_return(r) for r in rewards], dtype=np.float64)
    if len(returns) < 2:
        return 0.0, 1.0
    std = returns.std(ddof=1)
    return float(returns.mean()), float(std + np.finfo(np.float64).eps) if std > 0 else 1.0


def encode_texts(texts: List[str], tokenizer) -> List[List[int]]:
    """Token ids of each text, without special tokens, in one batched tokenizer call."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        # the Rust tokenizer directly: the same ids as tokenizer(texts), without building
        # transformers' per-text encodings (most of the time at scale)
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def special_ids(tokenizer) -> Tuple[int, int, str]:
    """(BOS, EOS, truncation side) of a tokenizer; BOS falls back to EOS."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos_token: set one (it ends every output)")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    return bos, eos, tokenizer.truncation_side


def tokenize_dialogue(
    dialogue: List[Optional[str]],
    tokenizer,
    max_length: int,
    index: int = 0,
    reward: Reward = 0.0,
    token_lists: Optional[List[List[int]]] = None,
    specials: Optional[Tuple[int, int, str]] = None,
) -> List[Segment]:
    """Tokenize one validated dialogue into segments that fit in `max_length` tokens, each
    output carrying its per-token rewards.

    EOS goes after the last output; truncation follows ``tokenizer.truncation_side``; a
    dialogue that starts with an output gets BOS (or EOS when there is no BOS) as its prompt,
    because the first action needs a state before it. `token_lists` (one per segment, [] for a
    None prompt) skips the tokenizer call when the caller encoded the texts in a batch;
    `specials` is `special_ids(tokenizer)`, looked up once by callers that loop."""
    bos, eos, side = specials or special_ids(tokenizer)
    if token_lists is None:
        token_lists = [[] if text is None else encode_texts([text], tokenizer)[0] for text in dialogue]
    segments = []
    for j, tokens in enumerate(token_lists):
        if j % 2 == 1 and not tokens:
            raise DataError(f"sample {index}, segment {j}: the output tokenizes to no tokens")
        segments.append(Segment(is_output=j % 2 == 1, tokens=list(tokens)))
    eos_added = not segments[-1].tokens or segments[-1].tokens[-1] != eos
    if eos_added:
        segments[-1].tokens.append(eos)
    _place_rewards(segments, reward, eos_added, index)

    total = sum(len(s.tokens) for s in segments)
    carry = 0.0
    if total > max_length:
        segments, carry = _truncate(segments, max_length, side)
    segments = [s for s in segments if s.tokens]
    if not any(s.is_output for s in segments):
        raise DataError(
            f"sample {index}: no output token is left after truncation to train.seq_length={max_length} "
            f"(the sample has {total} tokens, truncated on the {side}); "
            "shorten the prompt or raise seq_length"
        )
    if segments[0].is_output:
        if sum(len(s.tokens) for s in segments) >= max_length:
            # make room for the BOS state
            at = 0 if side == "left" else -1
            segments[at], cut = _cut(segments[at], len(segments[at].tokens) - 1, side)
            carry += cut
            segments = [s for s in segments if s.tokens]
            if not any(s.is_output for s in segments):
                raise DataError(
                    f"sample {index}: no output token is left after truncation to "
                    f"train.seq_length={max_length}; raise seq_length"
                )
        segments.insert(0, Segment(is_output=False, tokens=[bos]))
    if carry:
        # rewards of cut actions go to the nearest kept action: the return survives truncation
        outputs = [s for s in segments if s.is_output]
        if side == "right":
            outputs[-1].rewards[-1] += carry
        else:
            outputs[0].rewards[0] += carry
    return segments


def _place_rewards(segments: List[Segment], reward: Reward, eos_added: bool, index: int) -> None:
    outputs = [s for s in segments if s.is_output]
    for s in outputs:
        s.rewards = np.zeros(len(s.tokens), dtype=np.float64)
    if isinstance(reward, TokenRewards):
        n = sum(len(s.tokens) for s in outputs) - int(eos_added)
        if len(reward.values) != n:
            raise DataError(
                f"reward {index}: got {len(reward.values)} per-token rewards but the outputs of sample "
                f"{index} have {n} tokens; give one value per output token"
            )
        at = 0
        for s in outputs:
            k = min(len(s.tokens), n - at)
            s.rewards[:k] = reward.values[at : at + k]
            at += k
    elif isinstance(reward, np.ndarray):
        for s, r in zip(outputs, reward):
            s.rewards[-1] = r
    else:
        outputs[-1].rewards[-1] = reward


def _cut(seg: Segment, keep: int, side: str) -> Tuple[Segment, float]:
    """Keep `keep` tokens of `seg` (the first ones for right truncation, the last for left);
    return the shorter segment and the sum of the rewards cut away."""
    keep = max(0, min(keep, len(seg.tokens)))
    kept = slice(0, keep) if side == "right" else slice(len(seg.tokens) - keep, None)
    gone = slice(keep, None) if side == "right" else slice(0, len(seg.tokens) - keep)
    if seg.rewards is None:
        return Segment(seg.is_output, seg.tokens[kept]), 0.0
    return Segment(seg.is_output, seg.tokens[kept], seg.rewards[kept]), float(seg.rewards[gone].sum())


def _truncate(segments: List[Segment], max_length: int, side: str) -> Tuple[List[Segment], float]:
    order = segments if side == "right" else segments[::-1]
    kept, budget, carry = [], max_length, 0.0
    for seg in order:
        short, cut = _cut(seg, budget, side)
        kept.append(short)
        carry += cut
        budget -= len(short.tokens)
    return (kept if side == "right" else kept[::-1]), carry


def segments_to_arrays(segments: List[Segment]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, actions_ixs, float64 rewards per action) of tokenized segments."""
    input_ids, actions, rewards = [], [], []
    for seg in segments:
        if seg.is_output:
            start = len(input_ids)
            actions.extend(range(start - 1, start + len(seg.tokens) - 1))
            rewards.append(seg.rewards if seg.rewards is not None else np.zeros(len(seg.tokens)))
        input_ids.extend(seg.tokens)
    return np.asarray(input_ids, dtype=np.int64), np.asarray(actions, dtype=np.int64), np.concatenate(rewards)


def _episode(input_ids: np.ndarray, actions_ixs: np.ndarray, rewards: np.ndarray) -> Episode:
    states_ixs = np.append(actions_ixs, len(input_ids) - 1)
    dones = np.ones(len(states_ixs), dtype=np.int64)
    dones[-1] = 0
    return Episode(input_ids=input_ids, actions_ixs=actions_ixs, states_ixs=states_ixs, rewards=rewards, dones=dones)


def segments_to_episode(segments: List[Segment], reward: Optional[float] = None) -> Episode:
    """An episode of tokenized segments; `reward`, when given, replaces their rewards and sits
    on the last action."""
    input_ids, actions_ixs, rewards = segments_to_arrays(segments)
    if reward is not None:
        rewards = np.zeros(len(actions_ixs))
        rewards[-1] = reward
    return _episode(input_ids, actions_ixs, rewards.astype(np.float32))


class EpisodeStore(torch.utils.data.Dataset):
    """Every episode of a dataset in five flat arrays: the tokens (int32), the action positions
    (int32) and their rewards (float32), plus an offset array for each; memory grows with the
    number of tokens, not with Python objects. Indexing builds one `Episode` on demand."""

    def __init__(self, tokens, token_offsets, actions, action_offsets, rewards):
        self.tokens, self.token_offsets = tokens, token_offsets
        self.actions, self.action_offsets, self.rewards = actions, action_offsets, rewards

    def __len__(self) -> int:
        return len(self.token_offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"episode {i} is out of range for {n} episodes")
        a, b = self.token_offsets[i], self.token_offsets[i + 1]
        c, d = self.action_offsets[i], self.action_offsets[i + 1]
        return _episode(
            np.asarray(self.tokens[a:b], dtype=np.int64),
            np.asarray(self.actions[c:d], dtype=np.int64),
            np.array(self.rewards[c:d], dtype=np.float32),
        )

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per episode."""
        return np.diff(self.token_offsets)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays().values())

    def arrays(self) -> Dict[str, np.ndarray]:
        return dict(
            tokens=self.tokens, token_offsets=self.token_offsets, actions=self.actions,
            action_offsets=self.action_offsets, rewards=self.rewards,
        )

    @classmethod
    def from_episodes(cls, episodes: Sequence[Episode]) -> "EpisodeStore":
        builder = StoreBuilder()
        for e in episodes:
            builder.add(e.input_ids, e.actions_ixs, e.rewards)
        return builder.build()


class StoreBuilder:
    """Appends episodes to growable typed arrays (4 bytes a token) and freezes them into an
    `EpisodeStore`."""

    def __init__(self):
        self.tokens, self.actions, self.rewards = array("i"), array("i"), array("f")
        self.token_offsets, self.action_offsets = array("q", [0]), array("q", [0])

    def add(self, input_ids: np.ndarray, actions_ixs: np.ndarray, rewards: np.ndarray) -> None:
        self.tokens.extend(np.asarray(input_ids, dtype=np.int32).tolist())
        self.actions.extend(np.asarray(actions_ixs, dtype=np.int32).tolist())
        self.rewards.extend(np.asarray(rewards, dtype=np.float32).tolist())
        self.token_offsets.append(len(self.tokens))
        self.action_offsets.append(len(self.actions))

    def build(self) -> EpisodeStore:
        def frozen(buffer, dtype):
            return np.frombuffer(buffer, dtype=dtype) if len(buffer) else np.zeros(0, dtype=dtype)

        return EpisodeStore(
            frozen(self.tokens, np.int32), frozen(self.token_offsets, np.int64),
            frozen(self.actions, np.int32), frozen(self.action_offsets, np.int64),
            frozen(self.rewards, np.float32),
        )


def make_episodes(
    samples: Sequence[Sample],
    rewards: Sequence[Any],
    tokenizer,
    max_length: int,
    standardize_rewards: bool = True,
    cache_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
) -> EpisodeStore:
    """Validate, tokenize and index a dataset into an `EpisodeStore`. Raises
    `DataError`/`DataTypeError` naming the sample before any training starts.

    With `cache_dir`, the episodes are saved there under a key made of the data, the tokenizer
    and the settings, and loaded (memory-mapped) instead of tokenized when the key matches."""
    values = check_samples(samples, rewards)
    key = None
    if cache_dir is not None:
        from .cache import dataset_key, load_store

        key = dataset_key(samples, values, tokenizer, max_length=max_length, standardize=standardize_rewards)
        cached = load_store(cache_dir, key)
        if cached is not None:
            return cached
    mean, divisor = return_stats(values) if standardize_rewards else (0.0, 1.0)
    specials = special_ids(tokenizer)
    builder = StoreBuilder()
    for start in range(0, len(samples), ENCODE_CHUNK):
        chunk = [as_dialogue(samples[k]) for k in range(start, min(len(samples), start + ENCODE_CHUNK))]
        encoded = iter(encode_texts([t for d in chunk for t in d if t is not None], tokenizer))
        for i, dialogue in enumerate(chunk, start=start):
            token_lists = [[] if text is None else next(encoded) for text in dialogue]
            segments = tokenize_dialogue(dialogue, tokenizer, max_length, i, values[i], token_lists, specials)
            input_ids, actions_ixs, r = segments_to_arrays(segments)
            # standardize the return: scale every reward, shift the final one
            last = (r[-1] - mean) / divisor
            r = r / divisor
            r[-1] = last
            builder.add(input_ids, actions_ixs, r)
    store = builder.build()
    if key is not None:
        from .cache import save_store

        save_store(store, cache_dir, key)
    return store


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


class LengthGroupedBatchSampler(torch.utils.data.Sampler):
    """Batches of episodes of similar length, to cut padding, in an order drawn from `generator`
    alone (so its seed or saved state reproduces it): each pass shuffles all indices, cuts them
    into megabatches of ``batch_size * megabatch`` episodes, sorts each megabatch by length,
    cuts it into batches and shuffles the batches."""

    def __init__(self, lengths: Sequence[int], batch_size: int, generator: torch.Generator, megabatch: int = 32):
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.generator = generator
        self.megabatch = megabatch

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self):
        n, size = len(self.lengths), self.batch_size * self.megabatch
        perm = torch.randperm(n, generator=self.generator).numpy()
        batches = []
        for start in range(0, n, size):
            mega = perm[start : start + size]
            mega = mega[np.argsort(-self.lengths[mega], kind="stable")]
            batches.extend(mega[i : i + self.batch_size] for i in range(0, len(mega), self.batch_size))
        for b in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[b].tolist()


def episode_lengths(episodes: Sequence[Episode]) -> np.ndarray:
    if isinstance(episodes, EpisodeStore):
        return episodes.lengths
    return np.asarray([len(e.input_ids) for e in episodes])


def padding_ratio(lengths: Sequence[int], batches) -> float:
    """Fraction of the padded [batch, max length] slots that hold padding."""
    lengths = np.asarray(lengths)
    real = padded = 0
    for batch in batches:
        b = lengths[np.asarray(batch)]
        real += int(b.sum())
        padded += int(b.max()) * len(b)
    return 1.0 - real / padded if padded else 0.0


def build_loader(
    episodes: Sequence[Episode],
    batch_size: int,
    pad_token_id: int,
    generator: torch.Generator,
    group_by_length: bool = False,
) -> torch.utils.data.DataLoader:
    """The training DataLoader: shuffled by `generator` (reproducible from its seed), batches
    grouped by length when asked."""
    collate = ILQLCollator(pad_token_id)
    if group_by_length:
        sampler = LengthGroupedBatchSampler(episode_lengths(episodes), batch_size, generator)
        # the generator also feeds the loader's per-epoch base seed, which otherwise comes from
        # the global RNG (and would make a resumed run draw different dropout masks)
        return torch.utils.data.DataLoader(episodes, batch_sampler=sampler, collate_fn=collate, generator=generator)
    return torch.utils.data.DataLoader(
        episodes, batch_size=batch_size, shuffle=True, collate_fn=collate, generator=generator
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


def load_jsonl(path) -> Tuple[List[Sample], List[Any]]:
    """Read samples and rewards from a JSONL file; the columns are those of `ilql.sources`
    (``text``, ``prompt`` + ``completion``, ``dialogue``, ``messages``, preference pairs, with
    ``reward`` or ``token_rewards``). Kept for compatibility: `ilql.load_file` reads CSV and
    Parquet too."""
    from .sources import load_file

    if not str(path).lower().endswith((".jsonl", ".ndjson")):
        from pathlib import Path

        from .sources import _jsonl_records, records_to_dataset

        return records_to_dataset(_jsonl_records(Path(path)))
    return load_file(path)
