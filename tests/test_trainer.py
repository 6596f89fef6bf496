import json

import pytest
import torch
from transformers import AutoTokenizer

import ilql
from ilql import AutoModelForCausalLMWithILQLHeads, DataError, default_ilql_config
from ilql.tasks.randomwalks import generate_random_walks
from ilql.trainer import gen_kwargs_sweep, trim_at_stop


@pytest.fixture(scope="module")
def walks():
    return generate_random_walks(n_walks=40, seed=1002)


def small_config(tmp_path, saved_tokenizer, **train):
    train_section = dict(seq_length=11, batch_size=8, epochs=10, total_steps=6, eval_interval=3,
                         checkpoint_interval=4, checkpoint_dir=str(tmp_path / "ckpts"), progress_bar=False)
    return default_ilql_config().evolve(
        train={**train_section, **train},
        tokenizer=dict(tokenizer_path=saved_tokenizer),
        optimizer=dict(kwargs=dict(lr=1e-3)),
        method=dict(steps_for_target_q_sync=2, alpha=0.5,
                    gen_kwargs=dict(max_new_tokens=4, top_k=5, beta=[0, 1], temperature=1.0)),
    )


def test_train_end_to_end(tmp_path, saved_tokenizer, tiny_gpt2_config, walks):
    seen = []

    def metric_fn(samples, prompts, outputs, **kw):
        seen.append((samples, prompts, outputs))
        return walks.metric(samples)

    config = small_config(tmp_path, saved_tokenizer)
    trainer = ilql.train(
        model_path=tiny_gpt2_config, samples=walks.samples, rewards=walks.rewards,
        eval_prompts=walks.eval_prompts[:4], metric_fn=metric_fn, config=config, stop_sequences=["|"],
    )
    assert trainer.step == 6 == trainer.total_steps  # min(10 epochs * 5 batches, 6)
    # evaluation at steps 3 and 6, once per beta
    assert len(seen) == 4
    samples, prompts, outputs = seen[0]
    assert samples == [p + o for p, o in zip(prompts, outputs)] and prompts == walks.eval_prompts[:4]

    records = [json.loads(line) for line in (tmp_path / "ckpts" / "stats.jsonl").read_text().splitlines()]
    steps = [r for r in records if "losses/loss" in r]
    evals = [r for r in records if any(k.startswith("metrics/") for k in r)]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(r["losses/loss"])) for r in steps)
    assert [r["step"] for r in evals] == [3, 6]
    assert {"metrics/optimality@beta=0", "metrics/optimality@beta=1", "metrics/lengths@beta=1"} <= set(evals[0])

    ckpts = sorted(p.name for p in (tmp_path / "ckpts").iterdir() if p.is_dir())
    assert ckpts == ["best_checkpoint", "checkpoint_0000004", "checkpoint_0000006"]
    reloaded = AutoModelForCausalLMWithILQLHeads.from_pretrained(tmp_path / "ckpts" / "checkpoint_0000006")
    for (k, a), (_, b) in zip(trainer.model.state_dict().items(), reloaded.state_dict().items()):
        torch.testing.assert_close(a.cpu(), b, msg=k)
    assert AutoTokenizer.from_pretrained(tmp_path / "ckpts" / "best_checkpoint").eos_token == "|"

    trainer.save_pretrained(tmp_path / "final")
    final = AutoModelForCausalLMWithILQLHeads.from_pretrained(tmp_path / "final")
    ids = torch.tensor([[1, 2]])
    kw = dict(beta=1, temperature=0, max_new_tokens=5, eos_token_id=21)
    assert torch.equal(final.generate(ids, **kw), trainer.model.generate(ids, **kw))


def test_steps_are_capped_by_epochs(tmp_path, saved_tokenizer, tiny_gpt2_config, walks):
    config = small_config(tmp_path, saved_tokenizer, epochs=1, total_steps=100)
    trainer = ilql.train(model_path=tiny_gpt2_config, samples=walks.samples, rewards=walks.rewards, config=config)
    assert trainer.step == 5  # one epoch of 40 samples in batches of 8


def test_target_sync_every_n_optimizer_steps_and_dropout_always_on(
    tmp_path, saved_tokenizer, tiny_gpt2_config, walks, monkeypatch
):
    from ilql.trainer import ILQLTrainer

    log = []
    original_step = ILQLTrainer.train_step

    def spy_step(self, batch):
        target = self.model.ilql_heads.target_q_heads[0][0].weight
        before = target.detach().clone()
        dropout = next(m for m in self.model.modules() if isinstance(m, torch.nn.Dropout))
        flags = []
        handle = dropout.register_forward_hook(lambda m, i, o: flags.append(m.training))
        try:
            out = original_step(self, batch)
        finally:
            handle.remove()
        log.append((self.step, not torch.equal(before, target.detach()), flags))
        return out

    monkeypatch.setattr(ILQLTrainer, "train_step", spy_step)
    config = small_config(tmp_path, saved_tokenizer, total_steps=7, eval_interval=2)
    ilql.train(model_path=tiny_gpt2_config, samples=walks.samples, rewards=walks.rewards,
               eval_prompts=walks.eval_prompts[:2], metric_fn=walks.metric_fn, config=config)
    assert [step for step, changed, _ in log if changed] == [2, 4, 6]  # steps_for_target_q_sync=2
    assert all(flags and all(flags) for _, _, flags in log)  # dropout on, also after evaluations


def test_invalid_data_fails_before_the_model_is_loaded(tmp_path, saved_tokenizer, walks):
    config = small_config(tmp_path, saved_tokenizer)
    rewards = list(walks.rewards)
    rewards[7] = float("nan")
    with pytest.raises(DataError, match="reward 7"):
        ilql.train(model_path=str(tmp_path / "does-not-exist"), samples=walks.samples, rewards=rewards, config=config)
    assert not (tmp_path / "ckpts").exists()
    with pytest.raises(ilql.ConfigError, match="offline"):
        ilql.train(reward_fn=lambda s: [0.0], samples=walks.samples, rewards=walks.rewards, config=config)


def test_dataset_tuple_form(tmp_path, saved_tokenizer, tiny_gpt2_config, walks):
    config = small_config(tmp_path, saved_tokenizer, total_steps=1)
    trainer = ilql.train(model_path=tiny_gpt2_config, dataset=(walks.samples, walks.rewards), config=config)
    assert trainer.step == 1


def test_from_a_local_model_directory(tmp_path, saved_tokenizer, tiny_llama_config, walks):
    AutoModelForCausalLMWithILQLHeads.from_config(tiny_llama_config).save_pretrained(tmp_path / "base")
    config = small_config(tmp_path, saved_tokenizer, total_steps=2).evolve(model=dict(num_layers_unfrozen=1))
    trainer = ilql.train(model_path=str(tmp_path / "base"), samples=walks.samples, rewards=walks.rewards,
                         config=config)
    frozen = trainer.model.base_model.model.layers[0].self_attn.q_proj.weight
    reloaded = AutoModelForCausalLMWithILQLHeads.from_pretrained(tmp_path / "base")
    torch.testing.assert_close(frozen, reloaded.base_model.model.layers[0].self_attn.q_proj.weight)


def test_gen_kwargs_sweep_and_stop_sequences():
    runs = gen_kwargs_sweep(dict(beta=[0, 4], top_k=3))
    assert runs == [("beta=0", dict(beta=0, top_k=3)), ("beta=4", dict(beta=4, top_k=3))]
    assert gen_kwargs_sweep(dict(beta=1)) == [("", dict(beta=1))]
    # arguments that take a list are one setting, unless given a list of lists
    one = dict(beta=[0, 1], stop_sequences=["|", "."], eos_token_id=[3, 4])
    assert [kw for _, kw in gen_kwargs_sweep(one)] == [
        dict(beta=0, stop_sequences=["|", "."], eos_token_id=[3, 4]),
        dict(beta=1, stop_sequences=["|", "."], eos_token_id=[3, 4]),
    ]
    runs = gen_kwargs_sweep(dict(stop_sequences=[["|"], ["."]]))
    assert [kw["stop_sequences"] for _, kw in runs] == [["|"], ["."]]
    assert trim_at_stop("abc|def", ["|"]) == "abc" and trim_at_stop("abc", None) == "abc"
    assert trim_at_stop("a.b;c", [";", "."]) == "a"
