import pytest

import ilql
from ilql import ConfigError, TRLConfig, default_ilql_config


def test_defaults_are_trlx_defaults():
    c = default_ilql_config()
    assert (c.train.seq_length, c.train.batch_size, c.train.epochs, c.train.total_steps) == (64, 128, 100, 1000)
    assert (c.train.checkpoint_interval, c.train.eval_interval) == (1000, 100)
    assert c.model.model_path == "gpt2" and c.tokenizer.tokenizer_path == "gpt2"
    assert c.optimizer.name == "adamw"
    assert c.optimizer.kwargs == dict(lr=5e-5, betas=[0.9, 0.95], eps=1e-8, weight_decay=1e-6)
    assert c.scheduler.name == "cosine_annealing" and c.scheduler.kwargs == dict(T_max=1e12, eta_min=5e-5)
    m = c.method
    assert (m.tau, m.gamma, m.cql_scale, m.awac_scale, m.alpha, m.beta) == (0.7, 0.99, 0.1, 1, 0.001, 0)
    assert m.steps_for_target_q_sync == 5 and m.two_qs is True
    assert m.gen_kwargs == dict(max_new_tokens=56, top_k=20, beta=1, temperature=1.0)


def test_update_with_dotted_and_nested_keys():
    base = default_ilql_config()
    c = TRLConfig.update(base, {"method.tau": 0.8, "train": {"batch_size": 7}, "optimizer.kwargs.lr": 1e-3})
    assert c.method.tau == 0.8 and c.train.batch_size == 7
    assert c.optimizer.kwargs["lr"] == 1e-3 and c.optimizer.kwargs["betas"] == [0.9, 0.95]  # others kept
    assert base.method.tau == 0.7  # the base is not modified
    # a plain dict base works too (trlx scripts load YAML into dicts)
    d = TRLConfig.update(base.to_dict(), {"method.gamma": 0.5})
    assert d.method.gamma == 0.5


def test_evolve_returns_a_modified_copy():
    base = default_ilql_config()
    c = base.evolve(train=dict(total_steps=3), method=dict(gen_kwargs=dict(beta=[0, 1])))
    assert c.train.total_steps == 3 and c.method.gen_kwargs["beta"] == [0, 1]
    assert c.method.gen_kwargs["top_k"] == 20
    assert base.train.total_steps == 1000


def test_yaml_round_trip(tmp_path):
    c = default_ilql_config().evolve(method=dict(tau=0.9), train=dict(seed=3))
    path = tmp_path / "c.yaml"
    c.save_yaml(path)
    assert TRLConfig.load_yaml(path) == c
    # a partial YAML keeps the defaults of what it leaves out
    path.write_text("method:\n  gamma: 0.5\n")
    loaded = TRLConfig.load_yaml(path)
    assert loaded.method.gamma == 0.5 and loaded.train == default_ilql_config().train


def test_from_dict_to_dict_round_trip():
    c = default_ilql_config().evolve(model=dict(num_layers_unfrozen=2))
    assert TRLConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"method.tau": 1.0}, "method.tau"),
        ({"method.tau": 0}, "method.tau"),
        ({"method.gamma": 1.5}, "method.gamma"),
        ({"method.gamma": -0.1}, "method.gamma"),
        ({"method.alpha": 0}, "method.alpha"),
        ({"method.alpha": 1.1}, "method.alpha"),
        ({"method.cql_scale": -1}, "method.cql_scale"),
        ({"method.steps_for_target_q_sync": 0}, "method.steps_for_target_q_sync"),
        ({"train.batch_size": 0}, "train.batch_size"),
        ({"train.total_steps": -5}, "train.total_steps"),
        ({"train.seq_length": 2.5}, "train.seq_length"),
        ({"train.eval_interval": 0}, "train.eval_interval"),
        ({"optimizer.name": "adafactor9"}, "optimizer.name"),
        ({"scheduler.name": "warmup_magic"}, "scheduler.name"),
        ({"tokenizer.padding_side": "middle"}, "tokenizer.padding_side"),
        ({"model.num_layers_unfrozen": -2}, "model.num_layers_unfrozen"),
        ({"method.tau": float("nan")}, "method.tau"),
    ],
)
def test_invalid_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        TRLConfig.update(default_ilql_config(), overrides)


def test_unknown_keys_are_rejected():
    with pytest.raises(ConfigError, match=r"method\.taux"):
        TRLConfig.update(default_ilql_config(), {"method.taux": 0.5})
    with pytest.raises(ConfigError, match="trainig"):
        TRLConfig.update(default_ilql_config(), {"trainig": {"batch_size": 1}})
    assert isinstance(ConfigError("x"), ValueError)


def test_public_names_are_importable():
    for name in [
        "default_ilql_config", "TRLConfig", "TrainConfig", "ModelConfig", "TokenizerConfig",
        "OptimizerConfig", "SchedulerConfig", "ILQLConfig", "train", "AutoModelForCausalLMWithILQLHeads",
    ]:
        assert hasattr(ilql, name), name
