"""Datasets from files (JSONL, CSV, Parquet), `datasets.Dataset`, records and preference
pairs; errors that name file/row/column; the episode cache; compact storage; length grouping."""

import json

import numpy as np
import pytest
import torch

import ilql
from ilql.data import LengthGroupedBatchSampler, TokenRewards, build_loader, make_episodes, padding_ratio
from ilql.errors import ConfigError, DataError, DataTypeError
from ilql.sources import load_file, resolve_dataset

ROWS = [
    {"text": "abc", "reward": 1.0},
    {"prompt": "a", "completion": "bc", "reward": -0.5},
    {"dialogue": ["a", "b", "c", "d"], "reward": [0.5, 1.0]},
    {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "bc"}], "reward": 2.0},
    {"text": "de", "token_rewards": [0.5, -0.5]},
]
EXPECTED_SAMPLES = ["abc", ["a", "bc"], ["a", "b", "c", "d"], ["a", "bc"], "de"]
# Arrow columns hold one type: every reward a list (one value per output, the same as a scalar)
ARROW_ROWS = [{**r, "reward": [r["reward"]] if isinstance(r.get("reward"), float) else r.get("reward")} for r in ROWS]


def tiny_config(saved_tokenizer, tmp_path, **train):
    return ilql.default_ilql_config().evolve(
        train=dict(seq_length=16, batch_size=4, total_steps=2, eval_interval=100, checkpoint_interval=100,
                   checkpoint_dir=str(tmp_path / "ckpt"), progress_bar=False, save_best=False, **train),
        tokenizer=dict(tokenizer_path=saved_tokenizer),
        optimizer=dict(kwargs=dict(lr=1e-3)),
        method=dict(gen_kwargs=dict(max_new_tokens=3, top_k=5, beta=1)),
    )


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path, rows):
    import csv

    columns = sorted({k for r in rows for k in r})
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    return path


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = sorted({k for r in rows for k in r})
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in rows]), path)
    return path


def as_dataset(rows):
    import datasets

    columns = sorted({k for r in rows for k in r})
    return datasets.Dataset.from_list([{k: r.get(k) for k in columns} for r in rows])


def norm(reward):
    if isinstance(reward, TokenRewards):
        return ("per token", list(reward.values))
    if isinstance(reward, (list, tuple)):
        return reward[0] if len(reward) == 1 else list(reward)
    return reward


def check_loaded(samples, rewards):
    assert samples == EXPECTED_SAMPLES
    assert [norm(r) for r in rewards] == [1.0, -0.5, [0.5, 1.0], 2.0, ("per token", [0.5, -0.5])]


def test_jsonl_csv_parquet_and_dataset_read_every_layout(tmp_path):
    check_loaded(*load_file(write_jsonl(tmp_path / "d.jsonl", ROWS)))
    check_loaded(*load_file(write_csv(tmp_path / "d.csv", ROWS)))
    check_loaded(*load_file(write_parquet(tmp_path / "d.parquet", ARROW_ROWS)))
    check_loaded(*resolve_dataset(as_dataset(ARROW_ROWS)))
    check_loaded(*resolve_dataset(ROWS))


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet", "dataset", "preferences"])
def test_each_format_trains_end_to_end(kind, tmp_path, saved_tokenizer, tiny_gpt2_config):
    if kind == "preferences":
        dataset = [{"prompt": "a", "chosen": "bc", "rejected": "cb"}, ("b", "a", "c"), {"chosen": "a", "rejected": "b"}]
    else:
        writers = {"jsonl": write_jsonl, "csv": write_csv, "parquet": write_parquet}
        dataset = as_dataset(ARROW_ROWS) if kind == "dataset" else writers[kind](tmp_path / f"d.{kind}", ARROW_ROWS)
    if kind == "preferences":
        dataset = ilql.preferences(dataset)
    config = tiny_config(saved_tokenizer, tmp_path)
    trainer = ilql.train(model_path=tiny_gpt2_config, dataset=dataset, config=config)
    assert trainer.step == 2
    assert all(np.isfinite(r["losses/loss"]) for r in trainer.history if "losses/loss" in r)


def test_preference_records_train_directly_with_default_rewards(tmp_path, saved_tokenizer, tiny_gpt2_config):
    records = [{"prompt": "a", "chosen": "bc", "rejected": "cb"}, {"prompt": "b", "chosen": "a", "rejected": "c"}]
    assert resolve_dataset(records) == ([["a", "bc"], ["a", "cb"], ["b", "a"], ["b", "c"]], [1.0, -1.0, 1.0, -1.0])
    trainer = ilql.train(model_path=tiny_gpt2_config, dataset=records, config=tiny_config(saved_tokenizer, tmp_path))
    assert trainer.step == 2


def test_preference_helper_custom_values_and_sources(tmp_path):
    records = [("q", "good", "bad"), {"chosen": "yes", "rejected": "no"}]
    samples, rewards = ilql.preferences(records, chosen_reward=2.0, rejected_reward=0.0)
    assert samples == [["q", "good"], ["q", "bad"], "yes", "no"] and rewards == [2.0, 0.0, 2.0, 0.0]
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "good", "rejected": "bad"}])
    assert ilql.preferences(path, chosen_reward=3) == ([["q", "good"], ["q", "bad"]], [3.0, -1.0])
    ds = as_dataset([{"question": "q", "good": "g", "bad": "b"}])
    cols = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    assert ilql.preferences(ds, columns=cols) == ([["q", "g"], ["q", "b"]], [1.0, -1.0])
    with pytest.raises(DataError, match=r"preference record 0: expected \(prompt, chosen, rejected\), got 2"):
        ilql.preferences([("q", "good")])
    with pytest.raises(DataError, match=r"preference record 1: expected columns 'chosen' and 'rejected'"):
        ilql.preferences([("q", "a", "b"), {"prompt": "q", "chosen": "a"}])
    with pytest.raises(DataTypeError, match="chosen_reward must be a finite number"):
        ilql.preferences(records, chosen_reward=float("nan"))


def test_column_names_are_configurable(tmp_path, saved_tokenizer, tiny_gpt2_config):
    path = write_jsonl(tmp_path / "r.jsonl", [{"review": "abc", "score": 1}, {"review": "cba", "score": 0}])
    columns = {"text": "review", "reward": "score"}
    assert load_file(path, columns) == (["abc", "cba"], [1.0, 0.0])
    trainer = ilql.train(
        model_path=tiny_gpt2_config, dataset=str(path), columns=columns, config=tiny_config(saved_tokenizer, tmp_path)
    )
    assert trainer.step == 2
    with pytest.raises(DataError, match="columns: unknown key 'txt'"):
        load_file(path, {"txt": "review"})
    with pytest.raises(ConfigError, match="columns= names the columns of dataset="):
        ilql.train(samples=["a"], rewards=[1.0], columns=columns)


@pytest.mark.parametrize(
    "kind, rows, error, pattern",
    [
        ("jsonl", [{"text": "ab", "reward": 1}, {"text": "ab", "reward": "high"}], DataTypeError,
         r"d\.jsonl, line 2, column 'reward': expected a number, got 'high'"),
        ("jsonl", [{"text": "ab"}], DataError, r"d\.jsonl, line 1: column 'reward' is missing"),
        ("jsonl", [{"text": "ab", "reward": 1}, {"text": "", "reward": 1}], DataError,
         r"line 2, column 'text': the output is empty"),
        ("csv", [{"text": "ab", "reward": 1}, {"text": "ab", "reward": "nan"}], DataError,
         r"d\.csv, row 2, column 'reward': expected a finite number"),
        ("csv", [{"prompt": "a", "completion": "b", "reward": 1}, {"prompt": "a", "reward": 1}], DataError,
         r"d\.csv, row 2: column 'completion' is missing"),
        ("parquet", [{"text": "ab", "reward": 1.0}, {"text": "ab", "reward": None}], DataError,
         r"d\.parquet, row 2: column 'reward' is missing"),
        ("parquet", [{"dialogue": ["a", "b", "c", "d"], "reward": [1.0]}], DataError,
         r"d\.parquet, row 1, column 'reward': got 1 per-turn rewards for 2 output segment"),
        ("dataset", [{"text": "ab", "reward": 1.0}, {"text": "ab", "reward": 2.0}, {"text": None, "reward": 1.0}],
         DataError, r"dataset row 2: expected column 'text'"),
        ("jsonl", [{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}], "reward": 1}],
         DataError, r"line 1, column 'messages': the chat must end with a 'assistant' message"),
        ("jsonl", [{"messages": [{"role": "user"}], "reward": 1}], DataTypeError,
         r"line 1, column 'messages': message 0: expected"),
        ("jsonl", [{"text": "ab", "token_rewards": [1, "x"]}], DataTypeError,
         r"line 1, column 'token_rewards': expected a number at position 1"),
    ],
)
def test_bad_rows_name_file_row_and_column(tmp_path, kind, rows, error, pattern):
    if kind == "dataset":
        source = as_dataset(rows)
    else:
        source = {"jsonl": write_jsonl, "csv": write_csv, "parquet": write_parquet}[kind](tmp_path / f"d.{kind}", rows)
    with pytest.raises(error, match=pattern):
        resolve_dataset(source)


def test_dataset_dict_asks_for_a_split():
    import datasets

    splits = datasets.DatasetDict(train=as_dataset(ROWS[:1]), test=as_dataset(ROWS[:1]))
    with pytest.raises(DataTypeError, match=r"DatasetDict with splits \['test', 'train'\]: pick one"):
        resolve_dataset(splits)
    assert resolve_dataset(splits["train"]) == (["abc"], [1.0])


def test_bad_files_are_named(tmp_path):
    with pytest.raises(DataError, match=r"d\.txt: unknown data file type '\.txt'"):
        load_file(tmp_path / "d.txt")
    with pytest.raises(DataError, match=r"nope\.jsonl: no such data file"):
        load_file(tmp_path / "nope.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "reward": 1}\n{oops\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: not valid JSON"):
        load_file(tmp_path / "bad.jsonl")


def test_per_turn_and_per_token_rewards_train_end_to_end(tmp_path, saved_tokenizer, tiny_gpt2_config):
    samples = [["a", "bc", "d", "ef"], ["b", "a", "c", "d"], "abc", ["c", "de"]]
    rewards = [[1.0, 0.0], [0.0, -1.0], TokenRewards([0.1, 0.2, 0.3]), 0.5]
    trainer = ilql.train(model_path=tiny_gpt2_config, samples=samples, rewards=rewards,
                         config=tiny_config(saved_tokenizer, tmp_path))
    assert trainer.step == 2


# ------------------------------------------------------------------------------ scale
def test_store_is_compact_and_matches_episode_by_episode(walks_tokenizer):
    samples = ["abc", ["ab", "cd"], ["a", "bc", "d", "e"]] * 10
    store = make_episodes(samples, list(range(30)), walks_tokenizer, 16)
    assert isinstance(store, ilql.EpisodeStore) and len(store) == 30
    assert store.tokens.dtype == np.int32 and store.actions.dtype == np.int32 and store.rewards.dtype == np.float32
    n_tokens = int(store.lengths.sum())
    assert len(store.tokens) == n_tokens and store.nbytes <= 4 * n_tokens + 4 * len(store.actions) * 2 + 16 * 31
    e = store[2]
    assert e.input_ids.tolist() == [0, 1, 2, 3, 4, 21] and e.actions_ixs.tolist() == [0, 1, 3, 4]
    assert e.input_ids.dtype == np.int64 and store[-1].input_ids.tolist() == e.input_ids.tolist()
    with pytest.raises(IndexError):
        store[30]


def test_cache_is_reused_and_invalidated_by_data_tokenizer_or_settings(tmp_path, walks_tokenizer, monkeypatch):
    import ilql.data as data

    samples, rewards = ["abc", ["ab", "cd"], "bcd"], [1.0, [2.0], 3.0]
    cache = tmp_path / "cache"
    first = make_episodes(samples, rewards, walks_tokenizer, 16, cache_dir=cache)
    assert len(list(cache.glob("episodes-*"))) == 1
    calls = []
    real = data.encode_texts
    monkeypatch.setattr(data, "encode_texts", lambda texts, tok: calls.append(len(texts)) or real(texts, tok))
    again = make_episodes(samples, rewards, walks_tokenizer, 16, cache_dir=cache)
    assert calls == []  # loaded, not tokenized
    for name, values in first.arrays().items():
        np.testing.assert_array_equal(values, again.arrays()[name])
    assert isinstance(again.tokens, np.memmap)

    make_episodes(samples, [1.0, [2.0], 4.0], walks_tokenizer, 16, cache_dir=cache)  # data changed
    make_episodes(samples, rewards, walks_tokenizer, 8, cache_dir=cache)  # settings changed
    make_episodes(samples, rewards, walks_tokenizer, 16, standardize_rewards=False, cache_dir=cache)
    walks_tokenizer.add_tokens(["zz"])  # tokenizer changed
    make_episodes(samples, rewards, walks_tokenizer, 16, cache_dir=cache)
    assert len(calls) == 4 and len(list(cache.glob("episodes-*"))) == 5


def test_train_uses_the_cache_dir(tmp_path, saved_tokenizer, tiny_gpt2_config):
    config = tiny_config(saved_tokenizer, tmp_path, data_cache_dir=str(tmp_path / "cache"))
    data = dict(samples=["abc", ["b", "cd"], "bcd"], rewards=[1.0, [0.5], 0.0])
    first = ilql.train(model_path=tiny_gpt2_config, config=config, **data)
    assert len(list((tmp_path / "cache").glob("episodes-*"))) == 1
    second = ilql.train(model_path=tiny_gpt2_config, config=config, **data)  # memory-mapped episodes
    assert isinstance(second.loader.dataset.tokens, np.memmap)
    losses = lambda t: [r["losses/loss"] for r in t.history if "losses/loss" in r]  # noqa: E731
    assert losses(second) == losses(first)


def test_length_grouping_is_reproducible_complete_and_cuts_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 60, size=1000)

    def epoch(seed):
        return list(LengthGroupedBatchSampler(lengths, 16, torch.Generator().manual_seed(seed)))

    a, b = epoch(1), epoch(1)
    assert a == b and a != epoch(2)
    assert sorted(i for batch in a for i in batch) == list(range(1000))
    assert len(a) == len(LengthGroupedBatchSampler(lengths, 16, torch.Generator())) == 63
    shuffled = torch.randperm(1000, generator=torch.Generator().manual_seed(1)).view(-1, 8).tolist()
    grouped, random = padding_ratio(lengths, a), padding_ratio(lengths, shuffled)
    assert grouped < 0.1 < 0.3 < random


def test_grouped_loader_order_is_restored_from_generator_state(walks_tokenizer):
    samples = ["a" * k for k in range(1, 30)]
    store = make_episodes(samples, [1.0] * len(samples), walks_tokenizer, 64)
    gen = torch.Generator().manual_seed(5)
    loader = build_loader(store, 4, 22, gen, group_by_length=True)
    state = gen.get_state()
    first = [b.input_ids.tolist() for b in loader]
    gen.set_state(state)
    assert [b.input_ids.tolist() for b in loader] == first
    widths = [len(b[0]) for b in first]
    pads = sum((torch.tensor(b) == 22).sum().item() for b in first)
    assert pads < sum(widths) * 4 * 0.2 and len(first) == 8


def test_cli_train_reads_csv_with_renamed_columns(tmp_path, saved_tokenizer, tiny_gpt2_config):
    from transformers import GPT2LMHeadModel

    from ilql.cli import main

    model_dir = tmp_path / "model"
    GPT2LMHeadModel(tiny_gpt2_config).save_pretrained(model_dir)
    data = write_csv(tmp_path / "d.csv", [{"review": "abc", "score": 1.0}, {"review": "cb", "score": -1.0}])
    config = tiny_config(saved_tokenizer, tmp_path)
    config.save_yaml(tmp_path / "cfg.yaml")
    out = tmp_path / "out"
    argv = ["train", "--config", str(tmp_path / "cfg.yaml"), "--data", str(data), "--model", str(model_dir),
            "--columns", "text=review", "reward=score", "--output-dir", str(out)]
    assert main(argv) == 0
    assert (out / "config.json").is_file()
    bad = write_csv(tmp_path / "bad.csv", [{"review": "abc", "score": "high"}])
    argv[argv.index(str(data))] = str(bad)
    assert main(argv) == 2  # the library error is reported, naming file, row and column


def test_untokenizable_text_is_named_before_tokenization(walks_tokenizer, tmp_path):
    with pytest.raises(DataError, match=r"sample 1, segment 1: the text is not valid Unicode"):
        make_episodes(["ab", "a\ud800"], [0.0, 1.0], walks_tokenizer, 16)
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "ab", "reward": 1e39}])
    with pytest.raises(DataError, match=r"line 1, column 'reward': 1e\+39 is outside the float32 range"):
        load_file(path)
