"""Random walks on a graph: the toy task of Decision Transformer and of trlx's ILQL example.

A directed random graph on 21 nodes (edge probability 0.1), goal node 0 with a self-loop.
The dataset holds 1000 random walks of at most 10 nodes, each node written as a letter
('a' is the goal). Rewards are the walk's optimality (10 - L) / (10 - shortest), where L is
the number of nodes up to the goal (10 when the goal is not reached or the walk is invalid);
1 is a shortest path. Learning from these mostly poor walks, guided decoding with a large beta
should find shortest paths.

Unlike trlx's version, a graph in which some start node cannot reach the goal is redrawn, so
the optimality is always finite.
"""

from __future__ import annotations

import string
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

GOAL = 0
EOS = "|"
PAD = "<pad>"
UNK = "<unk>"


@dataclass
class RandomWalks:
    adjacency: np.ndarray  # bool [n, n]: adjacency[i, j] = edge i -> j
    walks: List[str]
    shortest_lengths: np.ndarray  # [n] nodes on a shortest path from each node to the goal
    max_length: int

    @property
    def n_nodes(self) -> int:
        return len(self.adjacency)

    @property
    def samples(self) -> List[List[str]]:
        """(start node, rest of the walk) pairs: the start is the prompt, the rest the actions."""
        return [[w[:1], w[1:]] for w in self.walks]

    @property
    def rewards(self) -> List[float]:
        return self.metric(self.walks)["optimality"]

    @property
    def eval_prompts(self) -> List[str]:
        """Every start node that occurs in the data, once."""
        return sorted({w[0] for w in self.walks})

    def path_length(self, walk: str) -> Optional[int]:
        """Nodes up to and including the goal, or None for an invalid walk or a missed goal."""
        nodes = [ord(c) - ord("a") for c in walk]
        for i, node in enumerate(nodes):
            if not 0 <= node < self.n_nodes or (i > 0 and not self.adjacency[nodes[i - 1], node]):
                return None
            if node == GOAL:
                return i + 1
        return None

    def metric(self, samples: Sequence[str]) -> Dict[str, List[float]]:
        lengths, optimality = [], []
        for s in samples:
            length = self.path_length(s)
            bounded = self.max_length if length is None else min(length, self.max_length)
            start = ord(s[0]) - ord("a") if s else -1
            if not 0 < start < self.n_nodes:
                optimality.append(0.0)
            else:
                shortest = self.shortest_lengths[start]
                optimality.append(float((self.max_length - bounded) / (self.max_length - shortest)))
            lengths.append(float(-1 if length is None else length))
        return {"optimality": optimality, "lengths": lengths}

    def metric_fn(self, samples: Sequence[str], **_) -> Dict[str, List[float]]:
        """`train(metric_fn=...)` signature: optimality and path length of each sample."""
        return self.metric(samples)

    @property
    def logit_mask(self) -> torch.Tensor:
        """A [n, n] bool mask, True where node j cannot follow node i (no edge)."""
        return torch.from_numpy(~self.adjacency)


def shortest_path_lengths(adjacency: np.ndarray, goal: int = GOAL) -> np.ndarray:
    """Nodes on the shortest path from every node to `goal` (BFS on reversed edges); 0 where
    the goal cannot be reached."""
    n = len(adjacency)
    lengths = np.zeros(n, dtype=np.int64)
    lengths[goal] = 1
    queue = deque([goal])
    while queue:
        node = queue.popleft()
        for prev in np.nonzero(adjacency[:, node])[0]:
            if lengths[prev] == 0:
                lengths[prev] = lengths[node] + 1
                queue.append(prev)
    return lengths


def generate_random_walks(
    n_nodes: int = 21, max_length: int = 10, n_walks: int = 1000, p_edge: float = 0.1, seed: int = 1002
) -> RandomWalks:
    """Draw a graph and walks from `seed` (numpy's RandomState, as trlx)."""
    if not 2 <= n_nodes <= 26:
        raise ValueError(f"n_nodes must be in [2, 26] (one letter per node), got {n_nodes}")
    rng = np.random.RandomState(seed)
    while True:
        adjacency = rng.rand(n_nodes, n_nodes) > (1 - p_edge)
        np.fill_diagonal(adjacency, False)
        if not adjacency.sum(1).all():
            continue  # every node needs a way out
        adjacency[GOAL, :] = False
        adjacency[GOAL, GOAL] = True
        shortest = shortest_path_lengths(adjacency)
        if (shortest > 0).all() and (shortest < max_length).all():
            break  # every start node reaches the goal: optimality is finite
    walks = []
    for _ in range(n_walks):
        node = GOAL
        while node == GOAL:
            node = rng.randint(n_nodes)
        walk = [node]
        for _ in range(max_length - 1):
            node = rng.choice(np.nonzero(adjacency[node])[0])
            walk.append(node)
            if node == GOAL:
                break
        walks.append("".join(chr(ord("a") + int(i)) for i in walk))
    return RandomWalks(adjacency=adjacency, walks=walks, shortest_lengths=shortest, max_length=max_length)


def build_tokenizer(n_nodes: int = 21):
    """A character tokenizer: one token per node letter, '|' as BOS/EOS, and pad/unk tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    letters = string.ascii_lowercase[:n_nodes]
    vocab = {c: i for i, c in enumerate(letters)}
    for token in (EOS, PAD, UNK):
        vocab[token] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=EOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )


def model_config(tokenizer):
    """The 6-layer, 144-wide GPT-2 of trlx's randomwalks example."""
    from transformers import GPT2Config

    return GPT2Config(
        n_layer=6,
        n_embd=144,
        n_head=12,
        n_positions=64,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def default_config(seed: int = 1000, output_dir: Union[str, Path] = "runs/randomwalks"):
    """trlx's ILQL randomwalks settings."""
    from ..config import default_ilql_config

    return default_ilql_config().evolve(
        train=dict(
            seq_length=11,
            batch_size=100,
            epochs=20,
            total_steps=200,
            checkpoint_interval=100000,
            eval_interval=16,
            seed=seed,
            checkpoint_dir=str(output_dir),
        ),
        tokenizer=dict(tokenizer_path=str(Path(output_dir) / "tokenizer"), truncation_side="right"),
        optimizer=dict(name="adamw", kwargs=dict(lr=2.0e-4, betas=[0.9, 0.95], eps=1.0e-8, weight_decay=1.0e-6)),
        scheduler=dict(name="cosine_annealing", kwargs=dict(T_max=1000, eta_min=2.0e-4)),
        method=dict(
            tau=0.8,
            gamma=0.99,
            cql_scale=0.1,
            awac_scale=1,
            alpha=0.1,
            beta=0,
            steps_for_target_q_sync=5,
            two_qs=True,
            gen_kwargs=dict(max_new_tokens=9, top_k=10, beta=[0, 1, 100], temperature=1.0),
        ),
    )


def run(seed: int = 1000, output_dir: Union[str, Path] = "runs/randomwalks", config_overrides: Optional[dict] = None):
    """Train on the walks of `seed` and return (trainer, task). The tokenizer is saved to
    ``output_dir/tokenizer`` so that training loads it like any local tokenizer."""
    from ..config import TRLConfig
    from ..trainer import train

    task = generate_random_walks(seed=seed)
    config = default_config(seed, output_dir)
    if config_overrides:
        config = TRLConfig.update(config, config_overrides)
    tokenizer = build_tokenizer(task.n_nodes)
    tokenizer.save_pretrained(config.tokenizer.tokenizer_path)
    trainer = train(
        model_path=model_config(tokenizer),
        samples=task.samples,
        rewards=task.rewards,
        eval_prompts=task.eval_prompts,
        metric_fn=task.metric_fn,
        config=config,
        stop_sequences=[EOS],
    )
    return trainer, task
