"""Small helpers shared by test modules (pytest puts tests/ on sys.path)."""

import torch

PAD = 22  # '<pad>' in the walks tokenizer


def left_pad(rows, pad=PAD):
    """A left-padded id tensor and its attention mask for lists of token ids."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def guided_model(config):
    """A model whose random heads are scaled up so that the advantage visibly steers decoding."""
    from ilql import AutoModelForCausalLMWithILQLHeads

    torch.manual_seed(0)
    model = AutoModelForCausalLMWithILQLHeads.from_config(config)
    with torch.no_grad():
        for p in model.ilql_heads.parameters():
            p.mul_(3.0)
    return model.eval()
