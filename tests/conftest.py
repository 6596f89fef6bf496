import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def walks_tokenizer():
    from ilql.tasks.randomwalks import build_tokenizer

    return build_tokenizer(21)


@pytest.fixture
def tiny_gpt2_config(walks_tokenizer):
    from transformers import GPT2Config

    tok = walks_tokenizer
    return GPT2Config(
        n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=len(tok),
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )


@pytest.fixture
def tiny_llama_config(walks_tokenizer):
    from transformers import LlamaConfig

    tok = walks_tokenizer
    return LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, vocab_size=len(tok),
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )


@pytest.fixture
def saved_tokenizer(tmp_path, walks_tokenizer):
    path = tmp_path / "tokenizer"
    walks_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(params=["gpt2", "llama"])
def model(request, tiny_gpt2_config, tiny_llama_config):
    """A tiny GPT-2 or Llama with ILQL heads whose advantage steers decoding."""
    from _helpers import guided_model

    return guided_model(tiny_gpt2_config if request.param == "gpt2" else tiny_llama_config)
