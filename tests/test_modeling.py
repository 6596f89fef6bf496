import pytest
import torch
from transformers import AutoModelForCausalLM

from ilql import AutoModelForCausalLMWithILQLHeads, ConfigError
from ilql.heads import ILQLHeads, head_at_actions


@pytest.fixture(params=["gpt2", "llama"])
def lm_config(request, tiny_gpt2_config, tiny_llama_config):
    return tiny_gpt2_config if request.param == "gpt2" else tiny_llama_config


def test_polyak_sync_formula():
    torch.manual_seed(0)
    heads = ILQLHeads(4, 6, two_qs=True, alpha=0.25)
    for q in heads.q_heads:  # move the Q heads away from their targets
        for p in q.parameters():
            p.data.add_(torch.randn_like(p))
    before = [[p.clone() for p in t.parameters()] for t in heads.target_q_heads]
    heads.sync_target_q_heads()
    for t, q, old in zip(heads.target_q_heads, heads.q_heads, before):
        for tp, qp, op in zip(t.parameters(), q.parameters(), old):
            torch.testing.assert_close(tp, 0.25 * qp + 0.75 * op)
    assert all(not p.requires_grad for p in heads.target_q_heads.parameters())


def test_head_at_actions_equals_full_projection_gather():
    torch.manual_seed(0)
    heads = ILQLHeads(8, 11, two_qs=False)
    hs = torch.randn(2, 5, 8)
    actions = torch.randint(0, 11, (2, 5))
    full = heads.target_q_heads[0](hs).gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(head_at_actions(heads.target_q_heads[0], hs, actions), full)


def test_forward_shapes_and_logits_match_the_base_model(lm_config):
    torch.manual_seed(0)
    model = AutoModelForCausalLMWithILQLHeads.from_config(lm_config).eval()
    ids = torch.randint(0, 21, (2, 7))
    out = model(ids)
    assert out.logits.shape == (2, 7, lm_config.vocab_size)
    assert len(out.qs) == 2 and out.qs[0].shape == (2, 7, lm_config.vocab_size)
    assert out.vs.shape == (2, 7)
    torch.testing.assert_close(out.logits, model.base_model(ids).logits)
    actions_ixs = torch.tensor([[1, 2], [3, 4]])
    actions = torch.tensor([[5, 6], [7, 8]])
    sub = model(ids, actions_ixs=actions_ixs, states_ixs=torch.tensor([[1, 2, 3], [3, 4, 5]]), actions=actions)
    assert sub.logits.shape == (2, 2, lm_config.vocab_size) and sub.vs.shape == (2, 3)
    torch.testing.assert_close(sub.logits[1, 0], out.logits[1, 3])
    torch.testing.assert_close(sub.target_qs[0][1, 1], model.ilql_heads.target_q_heads[0](
        model.hidden_states(ids)[0])[1, 4, 8])


def test_save_and_load_round_trip(tmp_path, lm_config):
    torch.manual_seed(0)
    model = AutoModelForCausalLMWithILQLHeads.from_config(lm_config, two_qs=False, alpha=0.3)
    with torch.no_grad():
        model.ilql_heads.v_head[0].weight.add_(1.0)  # heads differ from any fresh init
    model.save_pretrained(tmp_path / "m")
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert "model.safetensors" in files and "ilql_heads.safetensors" in files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    loaded = AutoModelForCausalLMWithILQLHeads.from_pretrained(tmp_path / "m")
    assert loaded.two_qs is False and loaded.ilql_heads.alpha == 0.3
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)
    with pytest.raises(ConfigError, match="two_qs"):
        AutoModelForCausalLMWithILQLHeads.from_pretrained(tmp_path / "m", two_qs=True)


def test_checkpoint_opens_with_plain_transformers_without_weight_warnings(tmp_path, lm_config, capfd):
    model = AutoModelForCausalLMWithILQLHeads.from_config(lm_config)
    model.save_pretrained(tmp_path / "m")
    capfd.readouterr()
    plain, info = AutoModelForCausalLM.from_pretrained(tmp_path / "m", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    printed = capfd.readouterr()
    assert "UNEXPECTED" not in printed.err + printed.out and "MISSING" not in printed.err + printed.out
    ids = torch.randint(0, 21, (1, 5))
    torch.testing.assert_close(plain(ids).logits, model.eval().base_model(ids).logits)


def test_plain_lm_checkpoint_gets_fresh_heads(tmp_path, tiny_gpt2_config):
    AutoModelForCausalLM.from_config(tiny_gpt2_config).save_pretrained(tmp_path / "lm")
    model = AutoModelForCausalLMWithILQLHeads.from_pretrained(tmp_path / "lm", two_qs=True)
    assert len(model.ilql_heads.q_heads) == 2


def test_save_replaces_files_without_leaving_temporaries(tmp_path, tiny_gpt2_config):
    model = AutoModelForCausalLMWithILQLHeads.from_config(tiny_gpt2_config)
    target = tmp_path / "m"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    model.save_pretrained(target)
    model.save_pretrained(target)
    assert (target / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


@pytest.mark.parametrize("unfrozen", [-1, 0, 1])
def test_num_layers_unfrozen(tiny_gpt2_config, unfrozen):
    model = AutoModelForCausalLMWithILQLHeads.from_config(tiny_gpt2_config)
    model.freeze_bottom_layers(unfrozen)
    blocks = model.base_model.transformer.h
    trainable = [any(p.requires_grad for p in b.parameters()) for b in blocks]
    expected = {-1: [True, True], 0: [False, False], 1: [False, True]}[unfrozen]
    assert trainable == expected
    assert model.base_model.transformer.wte.weight.requires_grad == (unfrozen == -1)
    assert all(p.requires_grad for p in model.ilql_heads.q_heads.parameters())


def test_saving_prints_no_progress_bar_and_keeps_the_users_setting(tmp_path, tiny_gpt2_config, capfd):
    from transformers.utils import logging as hf_logging

    model = AutoModelForCausalLMWithILQLHeads.from_config(tiny_gpt2_config)
    capfd.readouterr()
    model.save_pretrained(tmp_path / "m")
    printed = capfd.readouterr()
    assert "Writing" not in printed.err + printed.out
    assert hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(tmp_path / "m2")
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()
