"""The offline sentiment task: corpus, rewards, tokenizer and a short end-to-end run."""

import numpy as np

from ilql.tasks import sentiment


def test_corpus_draws_lexicon_words_and_vader_rewards():
    vader = sentiment.analyzer()
    words = sentiment.lexicon_words(vader.lexicon)
    assert all(vader.lexicon[w] >= 1.8 for w in words["positive"]) and len(words["positive"]) >= 10
    assert all(vader.lexicon[w] <= -1.3 for w in words["negative"]) and len(words["negative"]) >= 10
    assert not any(w in vader.lexicon for w in words["neutral"])
    task = sentiment.generate_reviews(400, seed=3)
    assert task.rewards == [vader.polarity_scores(r)["compound"] for r in task.reviews]
    rewards = np.array(task.rewards)
    assert (rewards < 0).mean() > (rewards > 0).mean() > 0.05  # mostly negative/neutral, some positive
    assert all(p + o == r for (p, o), r in zip(task.samples, task.reviews))
    assert sentiment.generate_reviews(50, seed=3).reviews == task.reviews[:50]


def test_tokenizer_round_trips_reviews():
    task = sentiment.generate_reviews(300, seed=1)
    tok = sentiment.build_tokenizer(task.reviews)
    for review in task.reviews[:20]:
        assert tok.decode(tok(review).input_ids) == review


def test_short_run_reports_vader_per_beta(tmp_path):
    overrides = {"train.batch_size": 16, "train.progress_bar": False, "method.gen_kwargs.max_new_tokens": 6}
    trainer, task = sentiment.run(output_dir=tmp_path, n_reviews=200, steps=3, config_overrides=overrides)
    final = [r for r in trainer.history if any(k.startswith("metrics/") for k in r)][-1]
    for beta in (0, 1, 4, 16):
        assert -1.0 <= final[f"metrics/vader@beta={beta}"] <= 1.0
    assert trainer.step == 3
