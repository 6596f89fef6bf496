"""The non-finite guard: a step whose loss or gradients are not finite is skipped and counted;
`train.max_nonfinite_steps` of them in a row stop training with a TrainingError naming the
step and the non-finite loss terms (or parameters)."""

import json
import math

import pytest
import torch

import ilql
from ilql.trainer import ILQLTrainer


@pytest.fixture
def run(tmp_path, tiny_gpt2_config, saved_tokenizer):
    """Train a tiny model for `steps` optimizer steps with the batches listed in `poison`
    (1-based loss calls) turned non-finite."""
    from ilql.tasks.randomwalks import generate_random_walks

    task = generate_random_walks(n_walks=16, seed=4)

    def go(monkeypatch, poison=(), steps=4, limit=3, hook=None):
        calls = {"n": 0}
        original = ILQLTrainer.loss

        def loss(self, batch):
            calls["n"] += 1
            value, stats = original(self, batch)
            if calls["n"] in poison:
                stats = dict(stats, **{"losses/loss_cql": torch.tensor(math.nan), "losses/loss": torch.tensor(math.nan)})
                value = value * math.nan
            return value, stats

        monkeypatch.setattr(ILQLTrainer, "loss", loss)
        if hook is not None:
            monkeypatch.setattr(ILQLTrainer, "learn", _with_hook(ILQLTrainer.learn, hook))
        config = ilql.default_ilql_config().evolve(
            train=dict(seq_length=11, batch_size=8, total_steps=steps, checkpoint_interval=100, eval_interval=100,
                       checkpoint_dir=str(tmp_path / "ckpts"), progress_bar=False, max_nonfinite_steps=limit),
            tokenizer=dict(tokenizer_path=saved_tokenizer),
        )
        torch.manual_seed(0)
        trainer = ilql.train(model_path=tiny_gpt2_config, samples=task.samples, rewards=task.rewards, config=config)
        return trainer, calls["n"]

    return go


def _with_hook(learn, hook):
    def wrapped(self):
        hook(self.model)
        return learn(self)

    return wrapped


def _records(trainer):
    return [json.loads(line) for line in trainer.log_path.read_text().splitlines()]


def test_non_finite_steps_are_skipped_and_counted(run, monkeypatch):
    with pytest.warns(UserWarning, match=r"step 2 skipped: non-finite loss terms: .*losses/loss_cql=nan"):
        trainer, calls = run(monkeypatch, poison=(2, 3, 5))
    assert calls == 7 and trainer.step == 4  # three batches skipped, four optimizer steps taken
    assert trainer.nonfinite_total == 3 and trainer.nonfinite_in_a_row == 0
    assert trainer.scheduler.last_epoch == 4
    assert all(int(s["step"]) == 4 for s in trainer.optimizer.state.values())  # AdamW stepped 4 times, not 7
    records = _records(trainer)
    assert [r["step"] for r in records if "losses/loss" in r] == [1, 2, 3, 4]
    assert all(math.isfinite(r["losses/loss"]) for r in records if "losses/loss" in r)
    assert [r["nonfinite/skipped"] for r in records if "nonfinite/skipped" in r] == [1.0, 2.0, 3.0]


def test_too_many_non_finite_steps_in_a_row_stop_with_a_clear_error(run, monkeypatch):
    with pytest.warns(UserWarning), pytest.raises(ilql.TrainingError) as err:
        run(monkeypatch, poison=(3, 4, 5), limit=3)
    message = str(err.value)
    assert message.startswith("step 3:")  # steps 1 and 2 were taken, the next would be step 3
    assert "losses/loss_cql=nan" in message and "train.max_nonfinite_steps=3" in message


def test_non_finite_gradients_with_a_finite_loss_name_the_parameter(run, monkeypatch):
    def hook(model):
        model.ilql_heads.v_head[0].weight.register_hook(lambda g: torch.full_like(g, math.inf))

    with pytest.raises(ilql.TrainingError, match=r"step 1: non-finite gradients in ilql_heads\.v_head\.0\.weight"):
        run(monkeypatch, limit=1, hook=hook)


def test_huge_but_finite_gradients_are_not_skipped(run, monkeypatch):
    # 1e30 squared overflows float32, so the fused norm is inf; every value is still finite
    def hook(model):
        model.ilql_heads.v_head[0].weight.register_hook(lambda g: torch.full_like(g, 1e30))

    trainer, calls = run(monkeypatch, steps=2, limit=1, hook=hook)
    assert calls == 2 and trainer.step == 2 and trainer.nonfinite_total == 0


def test_max_nonfinite_steps_is_validated():
    with pytest.raises(ilql.ConfigError, match="train.max_nonfinite_steps"):
        ilql.default_ilql_config().evolve(train=dict(max_nonfinite_steps=0))
    with pytest.raises(ilql.ConfigError, match="train.keep_last_checkpoints"):
        ilql.default_ilql_config().evolve(train=dict(keep_last_checkpoints=-1))
