"""The training-speed knobs: method.chunk_size, train.mixed_precision, train.compile and
train.log_interval, through `ILQLTrainer`."""

import pytest
import torch

from ilql.config import default_ilql_config
from ilql.data import make_episodes
from ilql.errors import ConfigError
from ilql.modeling import AutoModelForCausalLMWithILQLHeads
from ilql.trainer import ILQLTrainer

SAMPLES = [["a", "bcdefgh"], ["b", "cd"], ["c", "defgha"], ["d", "e"], ["e", "fab"], ["f", "ghij"]]


def make_trainer(tmp_path, tokenizer, model_config, model=None, **sections):
    train = dict(batch_size=6, seq_length=16, total_steps=4, checkpoint_interval=1000, eval_interval=1000,
                 checkpoint_dir=str(tmp_path / "ckpt"), progress_bar=False)
    train.update(sections.pop("train", {}))
    # plain SGD: Adam would turn float rounding in near-zero gradients into lr-sized steps
    config = default_ilql_config().evolve(train=train, **sections)
    config.optimizer.name, config.optimizer.kwargs = "sgd", dict(lr=0.1)
    episodes = make_episodes(SAMPLES, [float(i) for i in range(len(SAMPLES))], tokenizer, 16)
    torch.manual_seed(0)
    model = model or AutoModelForCausalLMWithILQLHeads.from_config(model_config)
    return ILQLTrainer(config, model, tokenizer, episodes)


def params_after_steps(trainer, steps=3):
    batch = next(iter(trainer.loader))
    torch.manual_seed(1)  # the same dropout masks for every path
    for _ in range(steps):
        trainer.train_step(batch)
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_chunked_and_reference_paths_train_the_same(tmp_path, walks_tokenizer, tiny_gpt2_config):
    ref = params_after_steps(make_trainer(tmp_path, walks_tokenizer, tiny_gpt2_config, method=dict(chunk_size=None)))
    chunked = params_after_steps(make_trainer(tmp_path, walks_tokenizer, tiny_gpt2_config, method=dict(chunk_size=7)))
    for name in ref:
        torch.testing.assert_close(chunked[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)
    initial = make_trainer(tmp_path, walks_tokenizer, tiny_gpt2_config).model.state_dict()
    moved = any(not torch.equal(initial[k], ref[k]) for k in ref if "q_heads" in k)
    assert moved, "training did not change the Q heads: the comparison would be vacuous"


def test_log_interval_copies_statistics_only_at_logging_steps(tmp_path, walks_tokenizer, tiny_gpt2_config, monkeypatch):
    trainer = make_trainer(tmp_path, walks_tokenizer, tiny_gpt2_config, train=dict(log_interval=3, total_steps=7))
    items = []

    class Spy(torch.Tensor):  # counts host copies of the statistics
        def item(self):
            items.append(1)
            return super().item()

    loss_fn = trainer.loss

    def spied_loss(batch):
        loss, stats = loss_fn(batch)
        return loss, {k: v.as_subclass(Spy) for k, v in stats.items()}

    monkeypatch.setattr(trainer, "loss", spied_loss)
    batch = next(iter(trainer.loader))
    assert trainer.train_step(batch) == {} and trainer.train_step(batch) == {}
    assert items == []  # no statistic left the device
    stats = trainer.train_step(batch)
    assert trainer.step == 3 and "losses/loss" in stats and len(items) == len(stats)

    trainer = make_trainer(tmp_path, walks_tokenizer, tiny_gpt2_config, train=dict(log_interval=3, total_steps=7))
    trainer.learn()
    logged = [r["step"] for r in trainer.history if "losses/loss" in r]
    assert logged == [3, 6, 7]  # every log_interval steps, and the last step


def test_bf16_autocast_keeps_losses_in_float32(tmp_path, walks_tokenizer, tiny_gpt2_config):
    fp32 = make_trainer(tmp_path, walks_tokenizer, tiny_gpt2_config)
    bf16 = make_trainer(tmp_path, walks_tokenizer, tiny_gpt2_config, train=dict(mixed_precision="bf16"))
    batch = next(iter(fp32.loader))
    fp32.model.eval(), bf16.model.eval()
    loss32, _ = fp32.loss(batch)
    loss16, stats = bf16.loss(batch)
    assert loss16.dtype == torch.float32 and all(v.dtype == torch.float32 for v in stats.values())
    assert loss16.item() == pytest.approx(loss32.item(), rel=0.05)
    assert loss16.item() != loss32.item()  # autocast did run the matmuls in bf16
    loss16.backward()
    assert all(p.grad.dtype == p.dtype for p in bf16.model.parameters() if p.grad is not None)
    assert bf16.train_step(batch)["losses/loss"] == pytest.approx(loss16.item(), rel=0.05)


def test_compile_trains_through_the_compiled_trunk(tmp_path, walks_tokenizer, tiny_gpt2_config):
    ref = params_after_steps(make_trainer(tmp_path, walks_tokenizer, tiny_gpt2_config), steps=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLMWithILQLHeads.from_config(tiny_gpt2_config)
    model.compile_trunk(backend="eager")  # dynamo without inductor's codegen: seconds, not a minute
    calls = []
    compiled = model.__dict__["_compiled_trunk"]
    model.__dict__["_compiled_trunk"] = lambda **kw: calls.append(1) or compiled(**kw)
    trainer = make_trainer(tmp_path, walks_tokenizer, tiny_gpt2_config, model=model, train=dict(compile=True))
    out = params_after_steps(trainer, steps=2)
    assert len(calls) == 2
    assert set(out) == set(ref)  # the compiled wrapper adds no state-dict keys
    for name in ref:
        torch.testing.assert_close(out[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "section, key, value",
    [("method", "chunk_size", 0), ("method", "chunk_size", 2.5), ("train", "mixed_precision", "fp16"),
     ("train", "compile", "yes"), ("train", "log_interval", 0)],
)
def test_bad_speed_settings_name_their_key(section, key, value):
    with pytest.raises(ConfigError, match=rf"{section}\.{key}"):
        default_ilql_config().evolve(**{section: {key: value}})
