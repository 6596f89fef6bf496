import json
import math

import numpy as np
import pytest

from ilql.tasks.randomwalks import RandomWalks, build_tokenizer, generate_random_walks, shortest_path_lengths


@pytest.mark.parametrize("seed", [1000, 1002, 1004])
def test_walks_are_valid_and_rewards_finite(seed):
    task = generate_random_walks(seed=seed)
    assert len(task.walks) == 1000 and task.n_nodes == 21
    assert task.adjacency[0].tolist() == [True] + [False] * 20  # goal: only a self-loop
    for walk in task.walks[:200]:
        assert 2 <= len(walk) <= 10 and walk[0] != "a"
        nodes = [ord(c) - 97 for c in walk]
        assert all(task.adjacency[a, b] for a, b in zip(nodes, nodes[1:]))
        assert "a" not in walk[:-1]  # a walk stops at the goal
    rewards = np.array(task.rewards)
    assert np.isfinite(rewards).all() and rewards.min() >= 0 and rewards.max() <= 1
    assert task.eval_prompts == sorted(set(w[0] for w in task.walks))


def test_generation_is_deterministic_per_seed():
    a, b, c = generate_random_walks(seed=5), generate_random_walks(seed=5), generate_random_walks(seed=6)
    assert a.walks == b.walks and (a.adjacency == b.adjacency).all()
    assert a.walks != c.walks


def test_shortest_paths_by_bfs():
    adjacency = np.zeros((4, 4), dtype=bool)
    adjacency[0, 0] = adjacency[1, 0] = adjacency[2, 1] = adjacency[3, 2] = adjacency[3, 1] = True
    assert shortest_path_lengths(adjacency).tolist() == [1, 2, 3, 3]
    adjacency[3] = False
    assert shortest_path_lengths(adjacency)[3] == 0  # unreachable


def test_graphs_with_unreachable_starts_are_redrawn():
    # with very sparse edges many draws leave some node cut off from the goal; all are redrawn
    for seed in range(5):
        task = generate_random_walks(n_nodes=8, p_edge=0.15, n_walks=20, seed=seed)
        assert (task.shortest_lengths > 0).all() and (task.shortest_lengths < task.max_length).all()
        assert all(math.isfinite(r) for r in task.rewards)


def test_optimality_metric():
    adjacency = np.zeros((4, 4), dtype=bool)
    for a, b in [(0, 0), (1, 0), (2, 1), (2, 3), (3, 0), (3, 1)]:
        adjacency[a, b] = True
    task = RandomWalks(adjacency=adjacency, walks=[], shortest_lengths=shortest_path_lengths(adjacency), max_length=10)
    assert task.shortest_lengths.tolist() == [1, 2, 3, 2]
    metric = task.metric(["ba", "cba", "cdba", "ca", "c?", "c", "cb"])
    # (10 - L) / (10 - shortest), L = nodes up to the goal; 0 when invalid or the goal is missed
    assert metric["optimality"] == pytest.approx([1.0, 1.0, 6 / 7, 0.0, 0.0, 0.0, 0.0])
    assert metric["lengths"] == [2.0, 3.0, 4.0, -1.0, -1.0, -1.0, -1.0]


def test_char_tokenizer_round_trip(tmp_path):
    tok = build_tokenizer()
    assert tok("bca", add_special_tokens=False).input_ids == [1, 2, 0]
    assert tok.decode([1, 2, 0, tok.eos_token_id, tok.pad_token_id], skip_special_tokens=True) == "bca"
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("uta", add_special_tokens=False).input_ids == tok("uta", add_special_tokens=False).input_ids


def test_demo_command_runs_and_reports(tmp_path):
    from ilql.cli import main

    out = tmp_path / "result.json"
    assert main(["demo", "randomwalks", "--seeds", "1002", "--steps", "3",
                 "--output-dir", str(tmp_path / "runs"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["mean"]) == {"beta=0", "beta=1", "beta=100"}
    assert all(0.0 <= v <= 1.0 for v in result["mean"].values())
    assert result["per_seed"][0]["sec_per_train_step"] > 0 and result["peak_rss_mib"] > 0
