"""Property-based tests (hypothesis) of hostile input: every input either works or raises the
library's own error (`ilql.ILQLError`), never an internal one (IndexError, KeyError, shape
errors, ...). The data pipeline and the config are tested directly (hundreds of inputs); a
handful of inputs train end to end. Each test counts the inputs it tried in TRIED, and the
session prints the totals (see `test_zz_report_counts`)."""

import functools
import json
import math
import os
from collections import Counter

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ilql
from ilql import ILQLError
from ilql.config import TRLConfig
from ilql.data import ILQLCollator, load_jsonl, make_episodes

TRIED = Counter()
# derandomized: the same inputs on every run, so CI never turns red at random. For a longer,
# random exploration: ILQL_HYPOTHESIS_EXAMPLES=3000 pytest tests/test_hostile_input.py
EXPLORE = int(os.environ.get("ILQL_HYPOTHESIS_EXAMPLES", "0"))
FAST = settings(max_examples=EXPLORE or 150, deadline=None, derandomize=not EXPLORE,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# ------------------------------------------------------------------------------ strategies
junk = st.one_of(
    st.none(), st.integers(), st.floats(), st.binary(max_size=4), st.booleans(),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
texts = st.one_of(
    st.text(max_size=30),  # arbitrary Unicode, empty included
    st.sampled_from(["", " ", "\n", "\x00", "\u200b", "🙂" * 3, "a\u0301", "\ufeff", "|", "<pad>",
                     "\ud800", "a\udfffb"]),  # lone surrogates: not valid UTF-8
    st.builds(lambda c, n: c * n, st.characters(), st.integers(100, 2000)),  # very long
)
segments = st.one_of(texts, texts, texts, junk)
samples_st = st.one_of(texts, st.lists(segments, max_size=6), st.tuples(texts, texts), junk)
finite = st.floats(allow_nan=False, allow_infinity=False)
rewards_st = st.one_of(
    st.floats(),  # NaN, +-inf, subnormals, +-1e308
    st.integers(min_value=-(2**70), max_value=2**70),
    finite.map(np.float32), finite.map(np.float64), st.integers(-5, 5).map(np.int64),
    finite.map(lambda x: torch.tensor(x)),
    st.lists(st.floats(), max_size=4),  # per-turn rewards, right or wrong count
    st.lists(finite, min_size=1, max_size=3).map(lambda v: ilql.TokenRewards(v)),
    junk, st.text(max_size=3),
)


F32 = 3.4028234663852886e38
valid_rewards = st.one_of(
    st.floats(-F32, F32), st.sampled_from([0.0, -0.0, 5e-324, F32, -F32, 1e-30]), st.integers(-(2**40), 2**40),
    st.floats(-1e6, 1e6).map(np.float32), st.integers(-5, 5).map(np.int64), st.floats(-10, 10).map(torch.tensor),
)
outputs = texts.filter(bool)


@st.composite
def sample_and_reward(draw):
    """A well-formed sample of any kind, with a matching reward (scalar, per turn or per token)."""
    kind = draw(st.sampled_from(["text", "pair", "dialogue"]))
    if kind == "text":
        sample, n_outputs = draw(outputs), 1
    else:
        turns = 1 if kind == "pair" else draw(st.integers(1, 3))
        sample = [t for _ in range(turns) for t in (draw(texts), draw(outputs))]
        sample, n_outputs = (tuple(sample) if draw(st.booleans()) else sample), turns
    reward = draw(st.one_of(
        valid_rewards, valid_rewards,
        st.lists(st.floats(-1e6, 1e6), min_size=n_outputs, max_size=n_outputs),  # per turn
        st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=5).map(ilql.TokenRewards),  # per token, any count
    ))
    return sample, reward


@st.composite
def datasets(draw):
    """Mostly well-formed datasets; a third get one hostile change (a junk sample or reward,
    a non-finite reward, a length mismatch, a non-list container)."""
    pairs = draw(st.lists(sample_and_reward(), min_size=1, max_size=6))
    samples, rewards = [p[0] for p in pairs], [p[1] for p in pairs]
    change = draw(st.sampled_from(["none", "none", "sample", "reward", "length", "container"]))
    i = draw(st.integers(0, len(samples) - 1))
    if change == "sample":
        samples[i] = draw(samples_st)
    elif change == "reward":
        rewards[i] = draw(rewards_st)
    elif change == "length":
        rewards = rewards[:-1] if draw(st.booleans()) else rewards + [1.0]
    elif change == "container":
        samples, rewards = draw(st.one_of(st.tuples(junk, st.just(rewards)), st.tuples(st.just(samples), junk),
                                          st.just(([], [])), st.just((tuple(samples), np.asarray([0.0] * len(samples))))))
    return samples, rewards


@functools.lru_cache(maxsize=None)
def tokenizers():
    """The randomwalks character tokenizer (unknown characters -> <unk>) and a byte-level BPE
    trained here on a few strings, so that any Unicode splits into byte tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ilql.tasks.randomwalks import build_tokenizer

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(["hello world", "the cat sat on the mat", "ünïcödé 🙂 text"], trainer=trainer)
    bpe = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    bpe.pad_token = bpe.eos_token
    return build_tokenizer(21), bpe


def check_episodes(store, max_length: int, pad_token_id: int) -> None:
    episodes = list(store)
    assert episodes
    for e in episodes:
        n = len(e.input_ids)
        assert 2 <= n <= max_length
        assert len(e.actions_ixs) >= 1 and e.actions_ixs.min() >= 0 and e.actions_ixs.max() + 1 < n
        assert len(e.states_ixs) == len(e.actions_ixs) + 1 and e.states_ixs[-1] == n - 1
        assert np.isfinite(e.rewards).all()
    batch = ILQLCollator(pad_token_id)(episodes)
    assert batch.input_ids.shape == batch.attention_mask.shape
    assert batch.actions.shape == batch.actions_ixs.shape == batch.rewards.shape
    assert batch.dones.shape[1] == batch.actions_ixs.shape[1] + 1
    assert (batch.actions_ixs < batch.input_ids.shape[1] - 1).all()


# ------------------------------------------------------------------------------ data pipeline
@FAST
@given(data=datasets(), max_length=st.one_of(st.integers(1, 8), st.integers(8, 300)), standardize=st.booleans(), which=st.integers(0, 1),
       side=st.sampled_from(["left", "right"]))
def test_any_dataset_gives_valid_episodes_or_a_library_error(data, max_length, standardize, which, side):
    samples, rewards = data
    tokenizer = tokenizers()[which]
    tokenizer.truncation_side = side
    try:
        store = make_episodes(samples, rewards, tokenizer, max_length, standardize_rewards=standardize)
    except ILQLError as e:
        TRIED[f"make_episodes:{type(e).__name__}"] += 1
        return
    TRIED["make_episodes:ok"] += 1
    check_episodes(store, max_length, tokenizer.pad_token_id)


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)
valid_rows = st.one_of(
    st.fixed_dictionaries({"text": outputs, "reward": st.floats(-1e6, 1e6)}),
    st.fixed_dictionaries({"prompt": texts, "completion": outputs, "reward": st.integers(-9, 9)}),
    st.fixed_dictionaries({"dialogue": st.lists(outputs, min_size=2, max_size=4), "reward": st.floats(-1, 1)}),
)
rows = st.one_of(
    valid_rows, valid_rows, valid_rows, valid_rows,
    st.fixed_dictionaries({"text": json_values, "reward": json_values}),
    st.fixed_dictionaries({"prompt": json_values, "completion": json_values, "reward": json_values}),
    st.fixed_dictionaries({"dialogue": json_values, "reward": json_values}),
    json_values,
)


@FAST
@given(lines=st.lists(st.one_of(rows.map(lambda r: json.dumps(r)), st.text(max_size=20)), max_size=5))
def test_any_jsonl_file_loads_or_raises_a_library_error(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("jsonl") / "data.jsonl"
    path.write_text("\n".join(line.replace("\n", " ") for line in lines), encoding="utf-8", errors="surrogatepass")
    for loader in (load_jsonl, ilql.load_file):
        try:
            samples, rewards = loader(str(path))
        except ILQLError as e:
            TRIED[f"{loader.__name__}:{type(e).__name__}"] += 1
            continue
        TRIED[f"{loader.__name__}:ok"] += 1
        assert len(samples) == len(rewards)


# ------------------------------------------------------------------------------ config
CONFIG_KEYS = [f"{section}.{key}" for section, values in TRLConfig().to_dict().items() for key in values]
odd_values = st.one_of(
    st.integers(1, 64), st.floats(0.01, 0.99), st.booleans(), st.none(),
    st.sampled_from(["adamw", "sgd", "adam", "cosine_annealing", "linear", "constant", "left", "right", "causal",
                     "none", "no", "bf16", "jsonl", "ddp"]),
    st.integers(min_value=-(2**65), max_value=2**65), st.floats(), st.booleans(), st.none(), st.text(max_size=6),
    st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=4), st.floats(), max_size=2),
)


@FAST
@given(overrides=st.dictionaries(st.sampled_from(CONFIG_KEYS + ["train.nope", "nope", "method.gen_kwargs.beta"]),
                                 odd_values, min_size=1, max_size=2))
def test_any_config_value_is_accepted_or_raises_a_config_error(overrides):
    from ilql.trainer import build_optimizer, build_scheduler

    try:
        config = TRLConfig.update(ilql.default_ilql_config(), overrides)
        optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(2))], config)
        scheduler = build_scheduler(optimizer, config, config.train.total_steps)
        optimizer.step()
        scheduler.step()
    except ILQLError as e:
        TRIED[f"config:{type(e).__name__}"] += 1
        return
    TRIED["config:ok"] += 1
    assert isinstance(TRLConfig.from_dict(yaml.safe_load(str(config))), TRLConfig)  # round-trips


@settings(max_examples=EXPLORE or 60, deadline=None, derandomize=not EXPLORE)
@given(text=st.one_of(st.text(max_size=60), st.dictionaries(st.sampled_from(list(TRLConfig().to_dict()) + ["x"]),
                                                           json_values, max_size=3).map(yaml.safe_dump)))
def test_any_yaml_file_loads_or_raises_a_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("yaml") / "cfg.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        TRLConfig.load_yaml(path)
        TRIED["yaml:ok"] += 1
    except ILQLError as e:
        TRIED[f"yaml:{type(e).__name__}"] += 1


# ------------------------------------------------------------------------------ end to end
def _tiny_gpt2(tokenizer):
    from transformers import GPT2Config

    return GPT2Config(n_layer=1, n_embd=32, n_head=4, n_positions=32, vocab_size=len(tokenizer),
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    samples=st.lists(st.one_of(st.text(min_size=1, max_size=30), st.tuples(st.text(max_size=10), st.text(min_size=1, max_size=10))),
                     min_size=1, max_size=6),
    reward=st.one_of(finite, st.sampled_from([0.0, 5e-324, -1e300, 3e38, -3e38])),
    batch_size=st.integers(1, 4), seq_length=st.integers(1, 24), standardize=st.booleans(), two_qs=st.booleans(),
    gamma=st.sampled_from([0.0, 1.0, 0.99]),
)
def test_a_few_hostile_datasets_train_end_to_end_or_raise_a_library_error(
    tmp_path_factory, samples, reward, batch_size, seq_length, standardize, two_qs, gamma
):
    tokenizer = tokenizers()[1]
    root = tmp_path_factory.mktemp("e2e")
    tokenizer.save_pretrained(root / "tok")
    config = ilql.default_ilql_config().evolve(
        train=dict(batch_size=batch_size, seq_length=seq_length, total_steps=2, checkpoint_interval=100,
                   eval_interval=100, checkpoint_dir=str(root / "ckpts"), progress_bar=False, max_nonfinite_steps=2),
        tokenizer=dict(tokenizer_path=str(root / "tok")),
        method=dict(standardize_rewards=standardize, two_qs=two_qs, gamma=gamma),
    )
    rewards = [reward * (i % 3 - 1) for i in range(len(samples))]
    torch.manual_seed(0)
    try:
        trainer = ilql.train(model_path=_tiny_gpt2(tokenizer), samples=samples, rewards=rewards, config=config)
    except ILQLError as e:
        TRIED[f"end_to_end:{type(e).__name__}"] += 1
        return
    TRIED["end_to_end:trained"] += 1
    assert trainer.step == 2
    assert all(math.isfinite(r["losses/loss"]) for r in trainer.history if "losses/loss" in r)


def test_a_yaml_config_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "cfg.yaml"
    path.write_text(f"train: !!python/object/apply:os.system ['touch {marker}']\n", encoding="utf-8")
    with pytest.raises(ilql.ConfigError, match="cfg.yaml"):
        TRLConfig.load_yaml(path)
    assert not marker.exists()


def test_zz_report_counts():
    """Prints how many inputs the properties above tried (run with -s to see it)."""
    inputs = sum(v for k, v in TRIED.items() if not k.startswith("load_file:"))  # a file goes to both loaders
    print(f"\nhypothesis inputs tried: {inputs}; outcomes: {dict(TRIED)}")
    if TRIED:
        assert inputs >= 10
