import numpy as np
import pytest
import torch

from ilql.data import ILQLCollator, load_jsonl, make_episodes, standardize
from ilql.errors import DataError, DataTypeError

EOS = 21  # '|' in the walks tokenizer; letters a.. are ids 0..


def ids(text):
    return [ord(c) - ord("a") for c in text]


def episode(tok, sample, max_length=32, reward=1.0):
    (e,) = make_episodes([sample], [reward], tok, max_length, standardize_rewards=False)
    return e


def test_plain_string_is_one_output_after_bos(walks_tokenizer):
    e = episode(walks_tokenizer, "abc", reward=2.5)
    assert e.input_ids.tolist() == [EOS] + ids("abc") + [EOS]  # BOS is '|' too
    assert e.actions_ixs.tolist() == [0, 1, 2, 3]
    assert e.states_ixs.tolist() == [0, 1, 2, 3, 4]
    assert e.rewards.tolist() == [0, 0, 0, 2.5]
    assert e.dones.tolist() == [1, 1, 1, 1, 0]
    # the action chosen at position t is the token at t + 1
    assert e.input_ids[e.actions_ixs + 1].tolist() == ids("abc") + [EOS]


def test_prompt_completion_pair(walks_tokenizer):
    e = episode(walks_tokenizer, ["ab", "cd"])
    assert e.input_ids.tolist() == ids("abcd") + [EOS]
    assert e.actions_ixs.tolist() == [1, 2, 3]
    assert e.states_ixs.tolist() == [1, 2, 3, 4]
    assert e.dones.tolist() == [1, 1, 1, 0]


def test_multi_turn_dialogue_actions_skip_prompts(walks_tokenizer):
    e = episode(walks_tokenizer, ["a", "bc", "d", "e"], reward=-1.0)
    assert e.input_ids.tolist() == ids("abcde") + [EOS]
    assert e.actions_ixs.tolist() == [0, 1, 3, 4]
    assert e.states_ixs.tolist() == [0, 1, 3, 4, 5]
    assert e.rewards.tolist() == [0, 0, 0, -1.0]
    assert e.dones.tolist() == [1, 1, 1, 1, 0]


def test_eos_not_doubled_when_output_already_ends_with_it(walks_tokenizer):
    e = episode(walks_tokenizer, ["a", "b|"])
    assert e.input_ids.tolist() == ids("ab") + [EOS]


def test_right_truncation_keeps_the_beginning(walks_tokenizer):
    e = episode(walks_tokenizer, ["ab", "cdefg"], max_length=4)
    assert e.input_ids.tolist() == ids("abcd")
    assert e.actions_ixs.tolist() == [1, 2]


def test_left_truncation_keeps_the_end(walks_tokenizer):
    walks_tokenizer.truncation_side = "left"
    e = episode(walks_tokenizer, ["abcdef", "gh"], max_length=4)
    assert e.input_ids.tolist() == ids("fgh") + [EOS]
    assert e.actions_ixs.tolist() == [0, 1, 2]


def test_left_truncation_into_the_output_adds_a_bos_state(walks_tokenizer):
    walks_tokenizer.truncation_side = "left"
    e = episode(walks_tokenizer, ["ab", "cdefg"], max_length=4)
    assert e.input_ids.tolist() == [EOS] + ids("fg") + [EOS]
    assert len(e.input_ids) == 4


def test_output_vanishing_under_truncation_names_the_sample(walks_tokenizer):
    with pytest.raises(DataError, match=r"sample 1: no output token is left.*seq_length=4"):
        make_episodes([["a", "b"], ["abcdef", "g"]], [1, 2], walks_tokenizer, 4)


def test_rewards_are_standardized_unless_turned_off(walks_tokenizer):
    samples = ["ab", "bc", "cd"]
    on = make_episodes(samples, [1.0, 2.0, 3.0], walks_tokenizer, 16)
    np.testing.assert_allclose([e.rewards[-1] for e in on], [-1.0, 0.0, 1.0], atol=1e-6)
    off = make_episodes(samples, [1.0, 2.0, 3.0], walks_tokenizer, 16, standardize_rewards=False)
    assert [e.rewards[-1] for e in off] == [1.0, 2.0, 3.0]


def test_standardize_constant_or_single_rewards_stays_finite():
    assert standardize(np.array([3.0, 3.0])).tolist() == [0.0, 0.0]
    assert standardize(np.array([3.0])).tolist() == [3.0]


@pytest.mark.parametrize(
    "samples, rewards, error, pattern",
    [
        (["ab", "bc"], [1.0], DataError, "2 samples but 1 rewards"),
        ([], [], DataError, "empty"),
        (["ab", "bc"], [1.0, float("nan")], DataError, r"reward 1: expected a finite number"),
        (["ab", "bc"], [float("inf"), 1.0], DataError, r"reward 0: expected a finite number"),
        (["ab", "bc"], [1.0, "high"], DataTypeError, r"reward 1: expected a number"),
        (["ab", ["a", "b", "c"]], [1, 2], DataError, r"sample 1: .*even number of segments.*got 3"),
        (["ab", ["a", ""]], [1, 2], DataError, r"sample 1, segment 1: the output is empty"),
        ([""], [1], DataError, r"sample 0, segment 1: the output is empty"),
        (["ab", ["a", 5]], [1, 2], DataTypeError, r"sample 1, segment 1: expected a string, got int"),
        ([{"text": "a"}], [1], DataTypeError, r"sample 0: expected a string or a list"),
        ("abc", [1, 2, 3], DataTypeError, "samples must be a list"),
    ],
)
def test_invalid_input_names_sample_and_problem(walks_tokenizer, samples, rewards, error, pattern):
    with pytest.raises(error, match=pattern):
        make_episodes(samples, rewards, walks_tokenizer, 16)


def test_collator_pads_and_aligns(walks_tokenizer):
    eps = make_episodes(["abc", ["a", "b"]], [1.0, -1.0], walks_tokenizer, 16, standardize_rewards=False)
    batch = ILQLCollator(pad_token_id=22)(eps)
    assert batch.input_ids.tolist() == [[EOS, 0, 1, 2, EOS], [0, 1, EOS, 22, 22]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch.actions.tolist() == [[0, 1, 2, EOS], [1, EOS, 0, 0]]
    assert batch.rewards.tolist() == [[0, 0, 0, 1.0], [0, -1.0, 0, 0]]
    assert batch.dones.tolist() == [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]
    assert batch.action_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch.input_ids.dtype == torch.long


def test_load_jsonl_reads_each_kind_and_names_bad_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"text": "abc", "reward": 1}\n{"prompt": "a", "completion": "b", "reward": 0.5}\n'
        '{"dialogue": ["a", "b", "c", "d"], "reward": -1}\n'
    )
    samples, rewards = load_jsonl(path)
    assert samples == ["abc", ["a", "b"], ["a", "b", "c", "d"]] and rewards == [1, 0.5, -1]
    path.write_text('{"text": "abc", "reward": 1}\n{"text": "abc"}\n')
    with pytest.raises(DataError, match=r"line 2: column 'reward' is missing"):
        load_jsonl(path)
    path.write_text('{"text": "abc", "reward": NaN}\n')
    with pytest.raises(DataError, match="finite"):
        load_jsonl(path)
