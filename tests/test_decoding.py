"""Decoding controls, search, statistics and the transformers integration (issue 4)."""

import pytest
import torch
import torch.nn.functional as F

from ilql import ConfigError
from ilql.generation import Guide, check_gen_kwargs, penalize_repetitions, top_k_mask, top_p_mask
from ilql.logits_process import ILQLLogitsProcessor, hf_generate

from _helpers import PAD, guided_model, left_pad

NO_EOS = 99  # an id outside the vocabulary: rows never finish early


@pytest.fixture
def gpt2(tiny_gpt2_config):
    return guided_model(tiny_gpt2_config)


def gen(model, ids, **kw):
    kw.setdefault("eos_token_id", NO_EOS)
    kw.setdefault("pad_token_id", PAD)
    kw.setdefault("max_new_tokens", 6)
    return model.generate(ids, **kw)


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------ controls
def test_tiny_top_p_is_greedy_and_top_p_one_is_plain_sampling(model):
    ids, mask = left_pad([[1, 2, 3], [4, 5]])
    greedy = gen(model, ids, attention_mask=mask, beta=2, temperature=0, top_k=0)
    nucleus = gen(model, ids, attention_mask=mask, beta=2, temperature=1.5, top_k=0, top_p=1e-6, generator=seeded())
    assert torch.equal(greedy, nucleus)
    full = gen(model, ids, attention_mask=mask, beta=2, temperature=1.5, top_k=0, top_p=1.0, generator=seeded(5))
    plain = gen(model, ids, attention_mask=mask, beta=2, temperature=1.5, top_k=0, generator=seeded(5))
    assert torch.equal(full, plain)


def test_top_p_keeps_the_smallest_nucleus():
    logp = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(top_p_mask(logp, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_mask(logp, 0.81)).sum() == 3


def test_sampling_never_leaves_the_nucleus(gpt2):
    ids = torch.tensor([[1, 2, 3]] * 16)
    guide = Guide(gpt2, beta=2)
    out = gen(gpt2, ids, beta=2, top_k=0, top_p=0.3, max_new_tokens=1, generator=seeded(1))
    hs, _ = gpt2.hidden_states(ids[:1])
    scores, _ = guide(hs[:, -1], gpt2.lm_logits(hs[:, -1]))
    allowed = torch.isfinite(top_p_mask(scores, 0.3))[0]
    assert allowed.sum() < allowed.numel() and all(allowed[t] for t in out[:, -1].tolist())


def test_min_new_tokens_delays_eos(model):
    ids = torch.tensor([[1, 2, 3]])
    eos = gen(model, ids, beta=0, temperature=0, max_new_tokens=1)[0, -1].item()  # greedy's first token
    assert gen(model, ids, beta=0, temperature=0, eos_token_id=eos).shape[1] == 4  # EOS at once: stopped
    late = gen(model, ids, beta=0, temperature=0, eos_token_id=eos, min_new_tokens=3)
    assert eos not in late[0, 3:6].tolist() and late.shape[1] > 6


def test_any_of_several_eos_ids_ends_a_row(model):
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    free = gen(model, ids, beta=1, temperature=0)
    eos = [free[0, 4].item(), free[1, 3].item()]  # row 0's second and row 1's first new token
    out = gen(model, ids, beta=1, temperature=0, eos_token_id=eos)
    assert out[1, 3].item() == eos[1] and set(out[1, 4:].tolist()) <= {PAD}
    first_eos = next(i for i, t in enumerate(out[0, 3:].tolist()) if t in eos)
    assert first_eos <= 1 and set(out[0, 4 + first_eos:].tolist()) <= {PAD}


def test_stop_string_stops_the_row_and_is_trimmed(tmp_path, gpt2, walks_tokenizer):
    from ilql.trainer import trim_at_stop

    tok = walks_tokenizer
    ids = torch.tensor([[tok.convert_tokens_to_ids("b")]])
    free = gen(gpt2, ids, beta=1, temperature=0, max_new_tokens=8)
    text = tok.decode(free[0, 1:])
    stop = text[3]  # the 4th generated character
    out = gen(gpt2, ids, beta=1, temperature=0, max_new_tokens=8, stop_sequences=[stop], tokenizer=tok)
    new = tok.decode(out[0, 1:], skip_special_tokens=True)
    assert new == text[: text.index(stop) + 1] and out.shape[1] < free.shape[1]
    assert trim_at_stop(new, [stop]) == text[: text.index(stop)]
    with pytest.raises(ConfigError, match="tokenizer"):
        gen(gpt2, ids, stop_sequences=[stop])


def test_a_late_multi_character_stop_string_is_found(gpt2, walks_tokenizer):
    tok = walks_tokenizer
    ids = torch.tensor([[tok.convert_tokens_to_ids("c")]])
    kw = dict(beta=0, temperature=1.0, top_k=0, max_new_tokens=24, generator=seeded(7))
    text = tok.decode(gen(gpt2, ids, **kw)[0, 1:], skip_special_tokens=True)
    stop = text[15:17]
    cut = text.index(stop) + len(stop)
    out = gen(gpt2, ids, stop_sequences=[stop], tokenizer=tok, **{**kw, "generator": seeded(7)})
    assert tok.decode(out[0, 1:], skip_special_tokens=True) == text[:cut] and cut > 12


def test_repetition_penalty_formula_and_effect(gpt2):
    scores = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    seqs = torch.tensor([[0, 1]])
    assert penalize_repetitions(scores, seqs, 2.0).tolist() == [[1.0, -2.0, 0.5, -3.0]]
    ids = torch.tensor([[1, 2, 3]])
    free = gen(gpt2, ids, beta=0, temperature=0, max_new_tokens=12)
    assert len(set(free[0, 3:].tolist())) < 12  # a tiny random LM repeats itself
    penalized = gen(gpt2, ids, beta=0, temperature=0, max_new_tokens=12, repetition_penalty=1e6)
    new = penalized[0, 3:].tolist()
    assert len(set(new)) > len(set(free[0, 3:].tolist()))


def test_advantage_clip_bounds_the_guidance(gpt2):
    h = torch.randn(4, gpt2.ilql_heads.hidden_size)
    logits = gpt2.lm_logits(h)
    scores, adv = Guide(gpt2, beta=3, advantage_clip=0.1)(h, logits)
    shift = scores - F.log_softmax(logits, -1)
    assert shift.abs().max() <= 0.3 + 1e-5 and adv.abs().max() > 0.1
    ids = torch.tensor([[1, 2, 3]])
    clipped = gen(gpt2, ids, beta=50, advantage_clip=1e-9, temperature=0)
    assert torch.equal(clipped, gen(gpt2, ids, beta=0, temperature=0))


def test_sign_weighting_adds_plus_or_minus_beta(gpt2):
    h = torch.randn(4, gpt2.ilql_heads.hidden_size)
    logits = gpt2.lm_logits(h)
    scores, adv = Guide(gpt2, beta=2, weighting="sign")(h, logits)
    shift = scores - F.log_softmax(logits, -1)
    torch.testing.assert_close(shift, 2 * torch.sign(adv))


def test_large_beta_sign_weighting_picks_the_likeliest_positive_advantage_token(model):
    ids = torch.tensor([[1, 2, 3]])
    out = gen(model, ids, beta=1e3, weighting="sign", temperature=0, top_k=0, max_new_tokens=1)
    h = model.hidden_states(ids)[0][:, -1]
    logp, adv = F.log_softmax(model.lm_logits(h), -1)[0], model.ilql_heads.advantage(h)[0]
    assert (adv > 0).any() and (adv < 0).any()
    expected = logp.masked_fill(adv <= 0, float("-inf")).argmax().item()
    assert out[0, -1].item() == expected


def test_filter_on_behaviour_keeps_the_behaviour_support(model):
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    plain = gen(model, ids, beta=0, temperature=0)
    guided = gen(model, ids, beta=1e3, temperature=0, top_k=0)
    assert not torch.equal(plain, guided)
    # top-1 of the behaviour policy leaves the advantage nothing to choose from
    behaviour = gen(model, ids, beta=1e3, temperature=0.7, top_k=1, filter_on="behaviour", generator=seeded())
    assert torch.equal(behaviour, plain)
    # with top-k on the guided scores, the same k=1 follows the advantage instead
    assert torch.equal(gen(model, ids, beta=1e3, temperature=0.7, top_k=1, generator=seeded()), guided)


def test_behaviour_filter_evaluates_heads_only_at_candidates(gpt2):
    h = torch.randn(3, gpt2.ilql_heads.hidden_size)
    logits = gpt2.lm_logits(h)
    sparse, _ = Guide(gpt2, beta=2, filter_on="behaviour", top_k=5)(h, logits)
    full = F.log_softmax(logits, -1) + 2 * gpt2.ilql_heads.advantage(h)
    kept = torch.isfinite(sparse)
    assert kept.sum(-1).tolist() == [5, 5, 5]
    torch.testing.assert_close(sparse[kept], full[kept])


def test_sampling_over_candidates_has_the_same_distribution(gpt2):
    ids = torch.tensor([[1, 2, 3]] * 4000)
    kw = dict(beta=2, top_k=6, temperature=0.8, max_new_tokens=1, return_dict=True)
    fast = gen(gpt2, ids, sample_over="candidates", generator=seeded(1), **kw)
    slow = gen(gpt2, ids, generator=seeded(2), **kw)
    # the per-step KL does not depend on the drawn token: both supports give the same value
    torch.testing.assert_close(fast.kl, slow.kl, rtol=1e-4, atol=1e-5)
    h = gpt2.hidden_states(ids[:1])[0][:, -1]
    scores = Guide(gpt2, beta=2)(h, gpt2.lm_logits(h))[0] / 0.8
    probs = F.softmax(top_k_mask(scores, 6), -1)[0]
    for out in (fast, slow):
        freq = torch.bincount(out.sequences[:, -1], minlength=probs.numel()).float() / len(ids)
        assert (freq - probs).abs().max() < 0.04 and freq[probs == 0].sum() == 0


def test_bfloat16_heads_approximate_the_float32_guidance(gpt2):
    h = torch.randn(4, gpt2.ilql_heads.hidden_size)
    logits = gpt2.lm_logits(h)
    exact, adv = Guide(gpt2, beta=2)(h, logits)
    fast = Guide(gpt2, beta=2, heads_dtype="bfloat16")
    approx, adv16 = fast(h, logits)
    assert fast.target_heads[0][0].weight.dtype == torch.bfloat16
    assert gpt2.ilql_heads.target_q_heads[0][0].weight.dtype == torch.float32  # the model is untouched
    assert approx.dtype == torch.float32 and not torch.equal(adv, adv16)
    torch.testing.assert_close(adv16, adv, rtol=0.05, atol=0.05 * adv.abs().max().item())
    out = gen(gpt2, torch.tensor([[1, 2, 3]]), beta=2, heads_dtype="bfloat16", return_dict=True, generator=seeded())
    assert out.sequences.shape == (1, 9) and torch.isfinite(out.kl).all()
    # the bf16 copy is reused until a head changes, then rebuilt
    assert Guide(gpt2, heads_dtype="bfloat16").target_heads[0] is fast.target_heads[0]
    with torch.no_grad():
        gpt2.ilql_heads.sync_target_q_heads(0.5)
    fresh = Guide(gpt2, heads_dtype="bfloat16")
    assert fresh.target_heads[0] is not fast.target_heads[0]
    torch.testing.assert_close(fresh.target_heads[0][0].weight.float(), gpt2.ilql_heads.target_q_heads[0][0].weight,
                               rtol=1e-2, atol=1e-2)
    assert "_cast_for_decoding" not in "".join(gpt2.ilql_heads.state_dict())


# -------------------------------------------------------------------------------- search
def test_beam_width_one_is_greedy(model):
    ids, mask = left_pad([[1, 2, 3], [4, 5]])
    greedy = gen(model, ids, attention_mask=mask, beta=2, temperature=0, top_k=0, max_new_tokens=7)
    beam = gen(model, ids, attention_mask=mask, beta=2, num_beams=1, temperature=0, top_k=0, max_new_tokens=7)
    beam_explicit = __import__("ilql.search", fromlist=["x"]).beam_search(
        model, ids, mask, num_beams=1, beta=2, max_new_tokens=7, pad_token_id=PAD, eos_token_id=NO_EOS
    )
    assert torch.equal(greedy, beam) and torch.equal(greedy, beam_explicit.sequences)


def test_beam_search_of_a_padded_batch_matches_each_row_alone(model):
    rows = [[1, 2, 3, 4], [5, 6]]
    ids, mask = left_pad(rows)
    batch = gen(model, ids, attention_mask=mask, beta=2, top_k=0, num_beams=3, return_dict=True)
    for i, row in enumerate(rows):
        alone = gen(model, torch.tensor([row]), beta=2, top_k=0, num_beams=3, return_dict=True)
        assert batch.sequences[i, ids.shape[1]:].tolist() == alone.sequences[0, len(row):].tolist()
        torch.testing.assert_close(batch.behaviour_logprob[i], alone.behaviour_logprob[0], rtol=1e-4, atol=1e-4)


def guided_logp(model, ids, beta):
    hs, _ = model.hidden_states(ids)
    h = hs[:, -1]
    return F.log_softmax(Guide(model, beta)(h, model.lm_logits(h))[0], -1)


def test_full_width_beam_search_is_exact_over_two_tokens(gpt2):
    ids = torch.tensor([[1, 2, 3]])
    vocab = gpt2.ilql_heads.vocab_size
    first = guided_logp(gpt2, ids, 2)[0]
    both = torch.cat([ids.repeat(vocab, 1), torch.arange(vocab)[:, None]], 1)
    total = first[:, None] + guided_logp(gpt2, both, 2)  # [first token, second token]
    best = divmod(total.argmax().item(), vocab)
    out = gen(gpt2, ids, beta=2, top_k=0, num_beams=vocab, max_new_tokens=2, return_dict=True)
    assert tuple(out.sequences[0, 3:].tolist()) == best
    greedy = gen(gpt2, ids, beta=2, top_k=0, temperature=0, max_new_tokens=2)[0, 3:].tolist()
    assert total.max() >= total[greedy[0], greedy[1]]


def test_best_of_n_picks_the_best_candidate(model):
    from ilql.generation import sample

    ids, mask = left_pad([[1, 2, 3], [4, 5]])
    n = 4
    kw = dict(beta=1, top_k=0, max_new_tokens=5, eos_token_id=NO_EOS, pad_token_id=PAD)
    every = sample(model, ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0), generator=seeded(2), **kw)
    for rank_by, key in [("advantage", every.advantage), ("logprob", every.behaviour_logprob),
                         ("mix", every.advantage + 0.5 * every.behaviour_logprob)]:
        best = model.generate(ids, attention_mask=mask, best_of=n, rank_by=rank_by, rank_weight=0.5,
                              generator=seeded(2), return_dict=True, **kw)
        pick = key.view(2, n).argmax(-1) + torch.arange(2) * n
        assert torch.equal(best.sequences, every.sequences[pick])
        torch.testing.assert_close(best.advantage, every.advantage[pick])
    assert len({tuple(r) for r in every.sequences[:n].tolist()}) > 1  # the candidates differ


# ---------------------------------------------------------------------------- statistics
def reference_stats(model, seqs, prompt_len):
    """Summed advantage and behaviour log-prob of the generated tokens, from one forward."""
    hs, _ = model.hidden_states(seqs)
    h = hs[:, prompt_len - 1 : -1]
    actions = seqs[:, prompt_len:, None]
    logp = F.log_softmax(model.lm_logits(h), -1).gather(-1, actions).squeeze(-1).sum(-1)
    adv = model.ilql_heads.advantage(h).gather(-1, actions).squeeze(-1).sum(-1)
    return adv, logp


def test_reported_statistics_match_a_full_forward(model):
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    settings = [dict(beta=0, top_k=5), dict(beta=2, top_k=5), dict(beta=2, top_k=5, filter_on="behaviour"),
                dict(beta=2, top_k=0, top_p=0.9, filter_on="behaviour")]
    for kw in settings:
        out = gen(model, ids, generator=seeded(), return_dict=True, **kw)
        adv, logp = reference_stats(model, out.sequences, 3)
        torch.testing.assert_close(out.advantage, adv, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out.behaviour_logprob, logp, rtol=1e-4, atol=1e-4)
        assert out.num_new_tokens.tolist() == [6, 6]


def test_kl_is_zero_for_the_behaviour_policy_and_grows_with_beta(model):
    ids = torch.tensor([[1, 2, 3]] * 8)
    kls = []
    for beta in (0, 1, 8):
        out = gen(model, ids, beta=beta, top_k=0, generator=seeded(), return_dict=True)
        kls.append(out.kl.mean().item())
    assert abs(kls[0]) < 1e-5 and 0 < kls[1] < kls[2]
    greedy = gen(model, ids, beta=1, temperature=0, return_dict=True)
    torch.testing.assert_close(greedy.kl, -greedy.behaviour_logprob)


# ------------------------------------------------------------------ transformers generate
@pytest.mark.parametrize("settings", [
    dict(do_sample=True, top_k=5),
    dict(do_sample=True, temperature=0.7, top_k=0, top_p=0.8, repetition_penalty=1.3, min_new_tokens=4),
    dict(do_sample=False),
])
def test_logits_processor_path_equals_ilql_generate(model, settings):
    ids, mask = left_pad([[1, 2, 3, 4], [5, 6]])
    with torch.no_grad():  # a reachable EOS: exercise padding after it
        model.base_model.get_output_embeddings().weight[7].mul_(3)
    ours_kw = dict(temperature=settings.get("temperature", 1.0) if settings["do_sample"] else 0,
                   top_k=settings.get("top_k", 0), top_p=settings.get("top_p"),
                   repetition_penalty=settings.get("repetition_penalty", 1.0),
                   min_new_tokens=settings.get("min_new_tokens", 0))
    torch.manual_seed(11)
    ours = model.generate(ids, attention_mask=mask, beta=2, max_new_tokens=8, eos_token_id=7, pad_token_id=PAD,
                          **ours_kw)
    torch.manual_seed(11)
    theirs = hf_generate(model, ids, beta=2, attention_mask=mask, max_new_tokens=8, eos_token_id=7,
                         pad_token_id=PAD, **settings)
    assert torch.equal(ours, theirs[:, : ours.shape[1]])
    assert theirs.shape[1] == ours.shape[1] or set(theirs[:, ours.shape[1]:].flatten().tolist()) <= {PAD}
    torch.manual_seed(11)  # and the guidance did change what plain transformers would do
    plain = model.base_model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=7, pad_token_id=PAD,
                                      **settings)
    assert not torch.equal(plain, theirs)


def test_transformers_beam_search_with_the_processor_equals_ilql_beam_search(model):
    ids = torch.tensor([[1, 2, 3, 4]])
    for k in (2, 4):
        ours = gen(model, ids, beta=2, top_k=0, num_beams=k, max_new_tokens=6)
        theirs = hf_generate(model, ids, beta=2, num_beams=k, do_sample=False, max_new_tokens=6,
                             eos_token_id=None, pad_token_id=PAD)
        assert torch.equal(ours, theirs)


def test_logits_processor_with_behaviour_filter_and_streamer(gpt2):
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.flatten().tolist())

        def end(self):
            self.chunks.append("end")

    ids = torch.tensor([[1, 2, 3]])
    torch.manual_seed(4)
    ours = gen(gpt2, ids, beta=3, top_k=4, filter_on="behaviour", temperature=0.9, max_new_tokens=5)
    streamer = Collect()
    with ILQLLogitsProcessor(gpt2, beta=3, behaviour_top_k=4) as guided:
        torch.manual_seed(4)
        theirs = gpt2.base_model.generate(ids, logits_processor=[guided], do_sample=True, temperature=0.9, top_k=0,
                                          max_new_tokens=5, eos_token_id=NO_EOS, pad_token_id=PAD,
                                          streamer=streamer)
    assert torch.equal(ours, theirs)
    assert sum(streamer.chunks[1:-1], []) == theirs[0, 3:].tolist() and streamer.chunks[-1] == "end"
    assert guided._handle is None  # the hook is gone


# ---------------------------------------------------------------------------- validation
def test_bad_decoding_arguments_name_the_key(gpt2):
    from ilql.config import ILQLConfig

    ids = torch.tensor([[1, 2]])
    for bad, match in [(dict(top_p=0), "top_p"), (dict(temperature=-1), "temperature"),
                       (dict(weighting="linear"), "weighting"), (dict(num_beams=0), "num_beams"),
                       (dict(filter_on="both"), "filter_on"), (dict(repetition_penalty=0), "repetition_penalty"),
                       (dict(heads_dtype="int8"), "heads_dtype"), (dict(sample_over="all"), "sample_over")]:
        with pytest.raises(ConfigError, match=match):
            gpt2.generate(ids, **bad)
    from ilql import DataError, DataTypeError

    with pytest.raises(DataTypeError, match="input_ids"):
        gpt2.generate(torch.tensor([1.0, 2.0]))
    with pytest.raises(DataError, match="outside the vocabulary"):
        gpt2.generate(torch.tensor([[1, 500]]))
    with pytest.raises(DataError, match="attention_mask"):
        gpt2.generate(ids, attention_mask=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ConfigError, match="logit_mask"):
        gpt2.generate(ids, logit_mask=torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(ConfigError, match="method.gen_kwargs.top_p"):
        ILQLConfig(gen_kwargs=dict(top_p=[0.9, 1.5]))
    with pytest.raises(ConfigError, match="method.gen_kwargs.topp"):
        ILQLConfig(gen_kwargs=dict(topp=0.9))
    ILQLConfig(gen_kwargs=dict(beta=[0, 1], top_p=0.9, stop_sequences=["\n"], num_beams=2))
    check_gen_kwargs(dict(stop_sequences=[["a"], ["b", "c"]]), sweep=True)


# ---------------------------------------------------------------------------- evaluation
def test_evaluation_logs_kl_per_beta_and_honours_stop_sequences(tmp_path, saved_tokenizer, tiny_gpt2_config, capsys):
    import ilql
    from ilql.tasks.randomwalks import generate_random_walks

    walks = generate_random_walks(n_walks=16, seed=1002)
    seen = []

    def metric_fn(samples, prompts, outputs, **kw):
        seen.append(outputs)
        return walks.metric(samples)

    config = ilql.default_ilql_config().evolve(
        train=dict(seq_length=11, batch_size=8, total_steps=1, eval_interval=1, checkpoint_interval=1,
                   checkpoint_dir=str(tmp_path / "ckpts"), progress_bar=False, save_best=False),
        tokenizer=dict(tokenizer_path=saved_tokenizer),
        method=dict(gen_kwargs=dict(max_new_tokens=6, top_k=0, beta=[0, 5], stop_sequences=["c", "d"])),
    )
    trainer = ilql.train(model_path=tiny_gpt2_config, samples=walks.samples, rewards=walks.rewards,
                         eval_prompts=walks.eval_prompts[:6], metric_fn=metric_fn, config=config)
    record = [r for r in trainer.history if "eval/kl@beta=0" in r][-1]
    assert abs(record["eval/kl@beta=0"]) < 1e-4 < record["eval/kl@beta=5"]
    assert "metrics/optimality@beta=5" in record and len(seen) == 2  # stop_sequences is no sweep
    assert all("c" not in o and "d" not in o for outputs in seen for o in outputs)
    assert "metric vs KL" in capsys.readouterr().out
    prompts = walks.eval_prompts[:3]
    for search in (dict(num_beams=2), dict(best_of=3, rank_by="mix")):
        texts, kls = trainer.generate_texts(prompts, return_kl=True, max_new_tokens=4, **search)
        assert len(texts) == len(kls) == 3 and all(isinstance(t, str) for t in texts)


def test_cli_generate_with_decoding_flags(tmp_path, gpt2, walks_tokenizer, capsys):
    from ilql.cli import main

    gpt2.save_pretrained(tmp_path / "m")
    walks_tokenizer.save_pretrained(tmp_path / "m")
    base = ["generate", "--model", str(tmp_path / "m"), "--prompt", "b", "e", "--max-new-tokens", "6",
            "--temperature", "0", "--top-k", "0", "--beta", "2"]
    assert main(base) == 0
    greedy = capsys.readouterr().out.splitlines()
    assert len(greedy) == 2 and greedy[0].startswith("b")
    assert main(base + ["--num-beams", "1", "--stats"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == greedy[0] and "kl=" in lines[1] and "advantage=" in lines[1]
    stop = greedy[0][3]  # the third generated character
    assert main(base + ["--stop", stop]) == 0
    assert capsys.readouterr().out.splitlines()[0] == greedy[0][: greedy[0].index(stop, 1)]
    assert main(base + ["--heads-dtype", "bfloat16", "--sample-over", "candidates", "--top-k", "5",
                        "--temperature", "1"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert main(base + ["--top-p", "1.5"]) == 2
    assert "top_p" in capsys.readouterr().err
