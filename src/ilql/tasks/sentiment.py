"""Offline sentiment steering: the counterpart of trlx's IMDB sentiment example, with no hub.

A synthetic corpus of short movie reviews is drawn from a small grammar,

    review  := opening adjective (conj "the" noun "was" [intensifier] adjective){0,2} "."
    opening := "the movie was" | "i thought the plot was" | ...

whose adjectives come from the `vaderSentiment` lexicon: positive (valence >= 1.8), negative
(valence <= -1.3) and neutral words (absent from the lexicon), drawn mostly neutral and negative,
some positive. Each review's reward is VADER's compound score in [-1, 1]. A small GPT-2 with a
BPE tokenizer trained locally on the corpus learns from these rewards; guided decoding from the
openings with a growing beta should write ever more positive reviews, above the dataset's mean
reward and above beta=0 (behaviour cloning).

Evaluation samples without top-k: the neutral class has many words, each less likely than a
negative one, so top-k 20 would keep mostly negative words and pull even beta=0 far below the
data's mean; without it, beta=0 reproduces the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

OPENINGS = [
    "the movie was",
    "this film was",
    "i thought the plot was",
    "the acting was",
    "overall the story was",
    "the ending was",
    "in my opinion the cast was",
    "the music was",
]
NOUNS = ["movie", "film", "plot", "acting", "story", "ending", "cast", "music", "script", "director", "dialogue",
         "pacing", "soundtrack", "camera", "scenery", "editing"]
CONJUNCTIONS = ["and", "but", "and also", "while"]
INTENSIFIERS = ["very", "really", "quite", "so", "rather", "extremely"]
POSITIVE_CANDIDATES = ["great", "wonderful", "excellent", "brilliant", "amazing", "beautiful", "fantastic",
                       "delightful", "superb", "charming", "lovely", "perfect", "enjoyable", "fun", "good", "nice",
                       "funny", "clever", "impressive", "entertaining"]
NEGATIVE_CANDIDATES = ["bad", "awful", "terrible", "boring", "dull", "horrible", "stupid", "weak", "poor", "ugly",
                       "annoying", "disappointing", "painful", "dreadful", "lame", "pathetic", "messy"]
NEUTRAL_CANDIDATES = ["long", "short", "slow", "quiet", "loud", "simple", "dark", "old", "new", "typical",
                      "standard", "ordinary", "average", "familiar", "colorful", "predictable", "plain", "modern",
                      "quick", "animated", "realistic", "complicated", "different", "unusual", "big"]
EOS = "<|endoftext|>"
PAD = "<pad>"


def analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def lexicon_words(lexicon: Dict[str, float]) -> Dict[str, List[str]]:
    """The grammar's adjectives by class, checked against the VADER lexicon."""
    return {
        "positive": [w for w in POSITIVE_CANDIDATES if lexicon.get(w, 0.0) >= 1.8],
        "negative": [w for w in NEGATIVE_CANDIDATES if lexicon.get(w, 0.0) <= -1.3],
        "neutral": [w for w in NEUTRAL_CANDIDATES if w not in lexicon],
    }


@dataclass
class SentimentTask:
    reviews: List[str]
    rewards: List[float]
    openings: List[str]

    @property
    def samples(self) -> List[List[str]]:
        """[opening, rest of the review] pairs: the opening is the prompt."""
        out = []
        for review in self.reviews:
            opening = next(o for o in self.openings if review.startswith(o + " "))
            out.append([opening, review[len(opening):]])
        return out

    def eval_prompts(self, repeats: int = 16) -> List[str]:
        return [o for o in self.openings for _ in range(repeats)]


def make_metric_fn():
    vader = analyzer()

    def metric_fn(samples: Sequence[str], **_) -> Dict[str, List[float]]:
        """Mean VADER compound score of the generated reviews (prompt + output)."""
        return {"vader": [vader.polarity_scores(s)["compound"] for s in samples]}

    return metric_fn


def generate_reviews(n: int = 6000, seed: int = 0, p_positive: float = 0.15, p_negative: float = 0.4) -> SentimentTask:
    """`n` reviews from the grammar, with adjectives neutral / negative / positive at
    1 - p_positive - p_negative / p_negative / p_positive, rewarded by VADER."""
    vader = analyzer()
    words = lexicon_words(vader.lexicon)
    rng = np.random.default_rng(seed)
    classes = ["neutral", "negative", "positive"]
    probs = [1 - p_positive - p_negative, p_negative, p_positive]

    def adjective() -> str:
        adj = str(rng.choice(words[classes[rng.choice(3, p=probs)]]))
        return f"{rng.choice(INTENSIFIERS)} {adj}" if rng.random() < 0.3 else adj

    reviews = []
    for _ in range(n):
        parts = [str(rng.choice(OPENINGS)), adjective()]
        for _ in range(rng.integers(0, 3)):
            parts += [str(rng.choice(CONJUNCTIONS)), "the", str(rng.choice(NOUNS)), "was", adjective()]
        reviews.append(" ".join(parts) + " .")
    rewards = [vader.polarity_scores(r)["compound"] for r in reviews]
    return SentimentTask(reviews=reviews, rewards=rewards, openings=list(OPENINGS))


def build_tokenizer(texts: Sequence[str], vocab_size: int = 800):
    """A byte-level BPE tokenizer trained on `texts` (GPT-2 style, so decoding restores spaces)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=EOS, eos_token=EOS, pad_token=PAD)


def model_config(tokenizer, n_layer: int = 2, n_embd: int = 128):
    from transformers import GPT2Config

    return GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=4, n_positions=64, vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def default_config(seed: int = 1000, output_dir: Union[str, Path] = "runs/sentiment", steps: int = 600):
    from ..config import default_ilql_config

    return default_ilql_config().evolve(
        train=dict(
            seq_length=32, batch_size=64, epochs=100, total_steps=steps, checkpoint_interval=100000,
            eval_interval=100000, seed=seed, checkpoint_dir=str(output_dir), save_best=False,
            group_by_length=True,
        ),
        tokenizer=dict(tokenizer_path=str(Path(output_dir) / "tokenizer"), truncation_side="right"),
        optimizer=dict(name="adamw", kwargs=dict(lr=1.0e-3, betas=[0.9, 0.95], eps=1.0e-8, weight_decay=1.0e-6)),
        scheduler=dict(name="cosine_annealing", kwargs=dict(T_max=steps, eta_min=1.0e-4)),
        method=dict(
            tau=0.7, gamma=0.99, cql_scale=0.1, awac_scale=1, alpha=0.1, beta=0, steps_for_target_q_sync=5,
            two_qs=True, gen_kwargs=dict(max_new_tokens=24, top_k=0, beta=[0, 1, 4, 16], temperature=1.0),
        ),
    )


def run(
    seed: int = 1000,
    output_dir: Union[str, Path] = "runs/sentiment",
    n_reviews: int = 6000,
    steps: int = 600,
    config_overrides: Optional[dict] = None,
):
    """Train on the synthetic reviews and return (trainer, task)."""
    from ..config import TRLConfig
    from ..trainer import train

    task = generate_reviews(n_reviews, seed=seed)
    config = default_config(seed, output_dir, steps)
    if config_overrides:
        config = TRLConfig.update(config, config_overrides)
    tokenizer = build_tokenizer(task.reviews)
    tokenizer.save_pretrained(config.tokenizer.tokenizer_path)
    trainer = train(
        model_path=model_config(tokenizer),
        samples=task.samples,
        rewards=task.rewards,
        eval_prompts=task.eval_prompts(),
        metric_fn=make_metric_fn(),
        config=config,
        stop_sequences=["."],
    )
    return trainer, task
