"""Reward placement: scalar (unchanged), per-turn and per-token rewards, through truncation,
standardization, the collator and the TD targets of the loss."""

import numpy as np
import pytest
import torch

from ilql.data import ILQLCollator, TokenRewards, make_episodes, standardize
from ilql.errors import DataError, DataTypeError
from ilql.loss import ilql_loss

EOS = 21  # '|' in the walks tokenizer; letters a.. are ids 0..
DIALOGUE = ["a", "bc", "d", "ef"]  # input ids a b c d e f | ; outputs "bc" and "ef|"


def ids(text):
    return [ord(c) - ord("a") for c in text]


def one(tok, sample, reward, max_length=32, standardize_rewards=False):
    (e,) = make_episodes([sample], [reward], tok, max_length, standardize_rewards=standardize_rewards)
    return e


def test_scalar_reward_sits_on_the_last_action_exactly_as_before(walks_tokenizer):
    e = one(walks_tokenizer, DIALOGUE, 2.5)
    assert e.input_ids.tolist() == ids("abcdef") + [EOS]
    assert e.actions_ixs.tolist() == [0, 1, 3, 4, 5]
    assert e.rewards.tolist() == [0, 0, 0, 0, 2.5]
    assert e.dones.tolist() == [1, 1, 1, 1, 1, 0]


def test_standardized_scalar_rewards_are_bitwise_the_trlx_formula(walks_tokenizer):
    rewards = [0.3, -1.7, 2.2, 0.05, 9.0]
    episodes = make_episodes(["ab", "bc", ["a", "b"], "cd", DIALOGUE], rewards, walks_tokenizer, 16)
    expected = standardize(np.asarray(rewards, dtype=np.float64)).astype(np.float32)
    assert [e.rewards[-1] for e in episodes] == expected.tolist()
    assert all((e.rewards[:-1] == 0).all() for e in episodes)


def test_per_turn_rewards_sit_on_the_last_action_of_each_output(walks_tokenizer):
    e = one(walks_tokenizer, DIALOGUE, [1.0, 2.0])
    # actions: b@0 c@1 (turn 1), e@3 f@4 |@5 (turn 2): c and | carry the rewards
    assert e.actions_ixs.tolist() == [0, 1, 3, 4, 5]
    assert e.rewards.tolist() == [0, 1.0, 0, 0, 2.0]
    # an intermediate reward does not end the episode: only the final state is terminal
    assert e.dones.tolist() == [1, 1, 1, 1, 1, 0]


def test_one_per_turn_reward_equals_a_scalar(walks_tokenizer):
    a = one(walks_tokenizer, ["ab", "cd"], [0.7])
    b = one(walks_tokenizer, ["ab", "cd"], 0.7)
    for field in ("input_ids", "actions_ixs", "states_ixs", "rewards", "dones"):
        assert getattr(a, field).tolist() == getattr(b, field).tolist()


def test_per_token_rewards_align_with_output_tokens_and_eos_gets_zero(walks_tokenizer):
    e = one(walks_tokenizer, DIALOGUE, TokenRewards([0.25, 0.5, 1.0, -2.0]))
    np.testing.assert_array_equal(e.rewards, np.float32([0.25, 0.5, 1.0, -2.0, 0.0]))
    e = one(walks_tokenizer, "abc", TokenRewards(np.array([1.0, 2.0, 3.0])))
    assert e.actions_ixs.tolist() == [0, 1, 2, 3] and e.rewards.tolist() == [1, 2, 3, 0]


def test_right_truncation_moves_cut_rewards_onto_the_last_kept_action(walks_tokenizer):
    e = one(walks_tokenizer, DIALOGUE, [1.0, 2.0], max_length=5)  # keeps a b c d e
    assert e.input_ids.tolist() == ids("abcde")
    assert e.actions_ixs.tolist() == [0, 1, 3]
    assert e.rewards.tolist() == [0, 1.0, 2.0]
    e = one(walks_tokenizer, DIALOGUE, TokenRewards([1.0, 2.0, 4.0, 8.0]), max_length=5)
    assert e.rewards.tolist() == [1.0, 2.0, 12.0]  # f's 8 moves to e; the return is kept


def test_left_truncation_moves_cut_rewards_onto_the_first_kept_action(walks_tokenizer):
    walks_tokenizer.truncation_side = "left"
    e = one(walks_tokenizer, DIALOGUE, TokenRewards([1.0, 2.0, 4.0, 8.0]), max_length=4)  # keeps d e f |
    assert e.input_ids.tolist() == ids("def") + [EOS]
    assert e.actions_ixs.tolist() == [0, 1, 2]
    assert e.rewards.tolist() == [1.0 + 2.0 + 4.0, 8.0, 0.0]


def test_truncated_scalar_reward_still_sits_on_the_last_kept_action(walks_tokenizer):
    e = one(walks_tokenizer, ["ab", "cdefg"], 3.0, max_length=4)
    assert e.input_ids.tolist() == ids("abcd") and e.rewards.tolist() == [0, 3.0]


def test_standardization_acts_on_returns_and_shifts_the_final_action(walks_tokenizer):
    samples = [DIALOGUE, "ab", "cde"]
    rewards = [[1.0, 2.0], 0.0, TokenRewards([1.0, 1.0, 1.0])]
    episodes = make_episodes(samples, rewards, walks_tokenizer, 32)
    returns = np.array([3.0, 0.0, 3.0])
    std = returns.std(ddof=1) + np.finfo(np.float64).eps
    np.testing.assert_allclose([e.rewards.sum() for e in episodes], standardize(returns), rtol=1e-6)
    np.testing.assert_allclose(episodes[0].rewards, [0, 1 / std, 0, 0, (2 - 2) / std], atol=1e-7)
    np.testing.assert_allclose(episodes[2].rewards, [1 / std, 1 / std, 1 / std, -2 / std], atol=1e-7)


def test_td_targets_follow_the_rewards_and_terminal_masks(walks_tokenizer):
    """Q heads that predict exactly r_t + gamma * V(s_{t+1}) * nonterminal(s_{t+1}), computed
    by hand for the per-turn episode, give a zero Q loss."""
    e = one(walks_tokenizer, DIALOGUE, [1.0, 2.0])
    batch = ILQLCollator(pad_token_id=22)([e])
    gamma, vocab = 0.5, 23
    vs = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    expected = torch.tensor([[0 + gamma * 0.2, 1 + gamma * 0.3, 0 + gamma * 0.4, 0 + gamma * 0.5, 2 + gamma * 0.0]])
    qs = torch.zeros(1, 5, vocab).scatter(-1, batch.actions.unsqueeze(-1), expected.unsqueeze(-1))
    _, stats = ilql_loss(
        logits=torch.zeros(1, 5, vocab), qs=[qs], target_qs=[expected], vs=vs, actions=batch.actions,
        rewards=batch.rewards, dones=batch.dones, tau=0.7, gamma=gamma, cql_scale=0.0, awac_scale=0.0, beta=0.0,
    )
    assert stats["losses/loss_q"].item() == pytest.approx(0.0, abs=1e-12)
    assert batch.rewards.tolist() == [[0, 1.0, 0, 0, 2.0]]
    assert batch.dones.tolist() == [[1, 1, 1, 1, 1, 0]]


@pytest.mark.parametrize(
    "sample, reward, error, pattern",
    [
        (DIALOGUE, [1.0], DataError, r"reward 0: got 1 per-turn rewards but sample 0 has 2 output"),
        (DIALOGUE, [1.0, float("nan")], DataError, r"reward 0\[1\]: expected a finite number"),
        (DIALOGUE, [1.0, "x"], DataTypeError, r"reward 0\[1\]: expected a number"),
        (DIALOGUE, TokenRewards([1.0, 2.0]), DataError, r"reward 0: got 2 per-token rewards .* have 4 tokens"),
        (DIALOGUE, TokenRewards([]), DataError, r"reward 0: TokenRewards is empty"),
    ],
)
def test_bad_per_turn_or_per_token_rewards_name_the_sample(walks_tokenizer, sample, reward, error, pattern):
    with pytest.raises(error, match=pattern):
        make_episodes([sample], [reward], walks_tokenizer, 32)


def test_one_element_tensor_is_still_a_scalar(walks_tokenizer):
    e = one(walks_tokenizer, DIALOGUE, torch.tensor([1.5]))
    assert e.rewards.tolist() == [0, 0, 0, 0, 1.5]


# ------------------------------------------------------------------------------ the former pipeline
def former_episode(dialogue, tok, max_length, reward):
    """The pipeline as it was before per-turn rewards (commit 0586808), kept as a reference:
    truncate the token segments, then put the (standardized) reward on the last action."""
    bos, eos, side = tok.bos_token_id, tok.eos_token_id, tok.truncation_side
    segs = [[j % 2 == 1, [] if t is None else list(tok(t, add_special_tokens=False).input_ids)]
            for j, t in enumerate(dialogue)]
    if not segs[-1][1] or segs[-1][1][-1] != eos:
        segs[-1][1].append(eos)
    if sum(len(s[1]) for s in segs) > max_length:
        order, kept, budget = (segs if side == "right" else segs[::-1]), [], max_length
        for out, tokens in order:
            take = max(0, min(len(tokens), budget))
            kept.append([out, tokens[:take] if side == "right" else tokens[len(tokens) - take:]])
            budget -= take
        segs = kept if side == "right" else kept[::-1]
    segs = [s for s in segs if s[1]]
    if segs[0][0]:
        if sum(len(s[1]) for s in segs) >= max_length:
            if side == "left":
                segs[0][1] = segs[0][1][1:]
            else:
                segs[-1][1] = segs[-1][1][:-1]
            segs = [s for s in segs if s[1]]
        segs.insert(0, [False, [bos]])
    ids, actions = [], []
    for out, tokens in segs:
        if out:
            actions.extend(range(len(ids) - 1, len(ids) + len(tokens) - 1))
        ids.extend(tokens)
    rewards = np.zeros(len(actions), dtype=np.float32)
    rewards[-1] = reward
    return ids, actions, rewards


@pytest.mark.parametrize("side", ["right", "left"])
def test_scalar_rewards_match_the_former_pipeline_exactly(walks_tokenizer, side):
    walks_tokenizer.truncation_side = side
    rng = np.random.default_rng(0)
    letters = "abcdefghijklmnopqrstu"

    def text(lo):
        return "".join(rng.choice(list(letters), size=rng.integers(lo, 9)))

    samples = []
    for _ in range(200):
        kind = rng.integers(3)
        if kind == 0:
            samples.append(text(1))
        else:
            turns = 1 if kind == 1 else int(rng.integers(1, 4))
            samples.append([t for _ in range(turns) for t in (text(1), text(1))])
    rewards = rng.normal(size=len(samples)) * 3
    for max_length in (10, 14, 64):  # >= the longest first prompt + 1: an output survives
        store = make_episodes(samples, rewards.tolist(), walks_tokenizer, max_length)
        values = standardize(rewards)
        for i, (sample, e) in enumerate(zip(samples, store)):
            dialogue = [None, sample] if isinstance(sample, str) else sample
            ids, actions, r = former_episode(dialogue, walks_tokenizer, max_length, float(values[i]))
            assert e.input_ids.tolist() == ids and e.actions_ixs.tolist() == actions
            assert e.rewards.tobytes() == r.tobytes()  # bit for bit
