import torch
import torch.nn.functional as F

from _helpers import PAD, left_pad


def test_beta_zero_greedy_equals_the_base_models_greedy(model):
    ids, mask = left_pad([[1, 2, 3, 4], [5, 6]])
    ours = model.generate(ids, attention_mask=mask, beta=0, temperature=0, max_new_tokens=8, eos_token_id=99)
    theirs = model.base_model.generate(
        ids, attention_mask=mask, do_sample=False, max_new_tokens=8, pad_token_id=PAD, eos_token_id=99
    )
    assert torch.equal(ours, theirs)


def test_left_padded_batch_matches_each_row_alone(model):
    rows = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    ids, mask = left_pad(rows)
    batch = model.generate(ids, attention_mask=mask, beta=2, temperature=0, max_new_tokens=6, eos_token_id=99)
    for i, row in enumerate(rows):
        alone = model.generate(torch.tensor([row]), beta=2, temperature=0, max_new_tokens=6, eos_token_id=99)
        assert batch[i, ids.shape[1]:].tolist() == alone[0, len(row):].tolist()


def no_cache_greedy(model, ids, beta, steps):
    """Reference: the full sequence through the model at every step, no KV cache."""
    for _ in range(steps):
        hs, _ = model.hidden_states(ids)
        h = hs[:, -1]
        scores = F.log_softmax(model.lm_logits(h), -1) + beta * model.ilql_heads.advantage(h)
        ids = torch.cat([ids, scores.argmax(-1, keepdim=True)], dim=1)
    return ids


def test_cached_generation_equals_no_cache_reference(model):
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    cached = model.generate(ids, beta=3, temperature=0, top_k=0, max_new_tokens=7, eos_token_id=99)
    assert torch.equal(cached, no_cache_greedy(model, ids, 3, 7))


def test_guided_scores_follow_the_formula(model):
    from ilql.generation import guided_scores

    h = torch.randn(3, model.ilql_heads.hidden_size)
    heads = model.ilql_heads
    q = torch.minimum(heads.target_q_heads[0](h), heads.target_q_heads[1](h))
    expected = F.log_softmax(model.lm_logits(h), -1) + 2.5 * (q - heads.v_head(h))
    torch.testing.assert_close(guided_scores(model, h, 2.5), expected)


def test_large_beta_picks_the_max_advantage_token(model):
    ids = torch.tensor([[1, 2, 3]])
    out = model.generate(ids, beta=1e4, temperature=0, top_k=0, max_new_tokens=1, eos_token_id=99)
    hs, _ = model.hidden_states(ids)
    assert out[0, -1].item() == model.ilql_heads.advantage(hs[:, -1]).argmax().item()


def test_rows_are_padded_after_eos_and_generation_stops(model):
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    free = model.generate(ids, beta=1, temperature=0, max_new_tokens=5, eos_token_id=99, pad_token_id=PAD)
    eos = free[0, 3].item()  # make row 0's first new token the EOS
    out = model.generate(ids, beta=1, temperature=0, max_new_tokens=5, eos_token_id=eos, pad_token_id=PAD)
    assert out[0, 3].item() == eos and set(out[0, 4:].tolist()) <= {PAD}
    row1 = out[1, 3:].tolist()
    if eos in row1:  # everything after row 1's own EOS is padding too
        assert set(row1[row1.index(eos) + 1:]) <= {PAD}
    else:
        assert out.shape[1] == 3 + 5


def test_logit_mask_forbids_successors(model):
    vocab = model.ilql_heads.vocab_size
    mask = torch.zeros(vocab, vocab, dtype=torch.bool)
    mask[:, 1::2] = True  # odd tokens may never follow anything
    ids = torch.tensor([[2, 4], [6, 8]])
    out = model.generate(ids, beta=1, temperature=1.0, top_k=0, logit_mask=mask, max_new_tokens=8, eos_token_id=99,
                         generator=torch.Generator().manual_seed(0))
    assert all(t % 2 == 0 for t in out[:, 2:].flatten().tolist())


def test_top_k_one_is_greedy_and_sampling_is_seeded(model):
    ids = torch.tensor([[1, 2, 3]])
    greedy = model.generate(ids, beta=1, temperature=0, max_new_tokens=6, eos_token_id=99)
    top1 = model.generate(ids, beta=1, temperature=1.0, top_k=1, max_new_tokens=6, eos_token_id=99)
    assert torch.equal(greedy, top1)
    a = model.generate(ids, beta=1, temperature=1.5, top_k=0, max_new_tokens=6, eos_token_id=99,
                       generator=torch.Generator().manual_seed(3))
    b = model.generate(ids, beta=1, temperature=1.5, top_k=0, max_new_tokens=6, eos_token_id=99,
                       generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_max_length_caps_new_tokens(model):
    ids = torch.tensor([[1, 2, 3]])
    out = model.generate(ids, beta=0, temperature=0, max_new_tokens=50, max_length=5, eos_token_id=99)
    assert out.shape[1] == 5
