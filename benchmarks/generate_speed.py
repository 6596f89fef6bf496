"""Guided generation speed: ilql's decoding against plain transformers and a naive reference.

One process, one model built from a config (Llama, 32k vocabulary, 4 layers, 256 wide by
default), a batch of prompts, a fixed number of new tokens (no EOS: every path makes exactly
the same number of tokens). Paths, timed in interleaved rounds so that load from other
processes hits them alike; the figure per path is its median over rounds:

- hf_plain:     ``base_model.generate`` of the LM alone, sampling with top-k (the baseline);
- ilql:         ``ilql`` guided ``generate`` (target Q heads and V on the last position only,
                KV cache), beta=1, top-k after the advantage (trlx's order, the default);
- ilql_behaviour: the same with ``filter_on="behaviour"`` (top-k on the behaviour policy,
                heads only at the k candidates: the original ILQL's decoding);
- ilql_fast / ilql_behaviour_fast: the two above with ``sample_over="candidates"`` (the draw
                among the k survivors: same distribution, not transformers' random stream);
- ilql_fast_bf16: ilql_fast with ``heads_dtype="bfloat16"`` (heads on a bf16 copy: approximate
                advantage; the LM stays float32);
- hf_processor: ``transformers`` generate with `ILQLLogitsProcessor` (same scores as ilql);
- naive:        every step runs the whole model on the whole sequence with no cache and all
                heads over the whole vocabulary (trained Q heads included), as a straightforward
                implementation would.

Reported: tokens/s of each path and the ratios ilql/hf_plain and ilql/naive (and the same for
the other paths). The table is printed and written to benchmarks/results/generate_speed.json.

    OMP_NUM_THREADS=1 python benchmarks/generate_speed.py [--batch 32] [--new-tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from ilql.generation import top_k_mask  # noqa: E402
from ilql.logits_process import hf_generate  # noqa: E402
from ilql.modeling import AutoModelForCausalLMWithILQLHeads  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "generate_speed.json"


def build_model(vocab: int, layers: int, width: int) -> AutoModelForCausalLMWithILQLHeads:
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=width // 64, num_key_value_heads=width // 64, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=None, pad_token_id=0, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLMWithILQLHeads.from_config(config).eval()


@torch.no_grad()
def naive_generate(model, ids, beta, new_tokens, top_k):
    """No cache; the full forward with every head over every position at every step."""
    for _ in range(new_tokens):
        out = model(ids)  # LM logits, Q heads, target Q heads, V: all positions, all tokens
        target_q = torch.minimum(out.target_qs[0], out.target_qs[1])[:, -1] if len(out.target_qs) > 1 \
            else out.target_qs[0][:, -1]
        scores = F.log_softmax(out.logits[:, -1].float(), -1) + beta * (target_q - out.vs[:, -1:])
        probs = F.softmax(top_k_mask(scores, top_k), -1)
        ids = torch.cat([ids, torch.multinomial(probs, 1)], dim=1)
    return ids


def macs_per_token(model, top_k: int) -> dict:
    """Multiply-accumulates per generated token of each path's matmuls (attention over the
    context left out; it is the same for every cached path): what bounds a CPU."""
    linear = lambda m: sum(x.weight.numel() for x in m.modules() if isinstance(x, torch.nn.Linear))  # noqa: E731
    trunk = linear(model.base_model.base_model)
    lm = model.base_model.get_output_embeddings().weight.numel()
    heads = model.ilql_heads
    first_layers = sum(h[0].weight.numel() for h in [heads.v_head, *heads.target_q_heads])
    q_out = sum(h[-1].weight.numel() for h in heads.target_q_heads)
    width = heads.target_q_heads[0][-1].weight.shape[1]
    plain = trunk + lm
    return {
        "hf_plain": plain,
        "ilql": plain + first_layers + q_out + width,
        "ilql_behaviour": plain + first_layers + len(heads.target_q_heads) * top_k * width + width,
    }


def paths(model, ids, new_tokens, top_k, beta):
    base = model.base_model
    common = dict(max_new_tokens=new_tokens, pad_token_id=0)
    return {
        "hf_plain": lambda: base.generate(ids, do_sample=True, top_k=top_k, **common),
        "ilql": lambda: model.generate(ids, beta=beta, top_k=top_k, temperature=1.0, **common),
        "ilql_behaviour": lambda: model.generate(ids, beta=beta, top_k=top_k, filter_on="behaviour", **common),
        "ilql_fast": lambda: model.generate(ids, beta=beta, top_k=top_k, sample_over="candidates", **common),
        "ilql_behaviour_fast": lambda: model.generate(ids, beta=beta, top_k=top_k, filter_on="behaviour",
                                                      sample_over="candidates", **common),
        "ilql_fast_bf16": lambda: model.generate(ids, beta=beta, top_k=top_k, sample_over="candidates",
                                                 heads_dtype="bfloat16", **common),
        "hf_processor": lambda: hf_generate(model, ids, beta=beta, do_sample=True, top_k=top_k, **common),
        "naive": lambda: naive_generate(model, ids, beta, new_tokens, top_k),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--naive-rounds", type=int, default=1, help="the naive path is slow: fewer rounds")
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()

    model = build_model(args.vocab, args.layers, args.width)
    ids = torch.randint(2, args.vocab, (args.batch, args.prompt_length), generator=torch.Generator().manual_seed(1))
    runs = paths(model, ids, args.new_tokens, args.top_k, args.beta)
    for name, fn in runs.items():  # warm-up, and every path makes exactly batch * new_tokens tokens
        if name != "naive":
            assert fn().shape == (args.batch, args.prompt_length + args.new_tokens), name
    times = {name: [] for name in runs}
    for r in range(args.rounds):
        for name, fn in runs.items():
            if name == "naive" and r >= args.naive_rounds:
                continue
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            print(f"round {r} {name}: {times[name][-1]:.2f}s", flush=True)

    tokens = args.batch * args.new_tokens
    times = {name: t for name, t in times.items() if t}  # --naive-rounds 0 skips the naive path
    tps = {name: tokens / statistics.median(t) for name, t in times.items()}
    ratios = {f"{p}/{b}": tps[p] / tps[b] for p in ("ilql", "ilql_fast", "ilql_fast_bf16", "ilql_behaviour",
                                                  "ilql_behaviour_fast", "hf_processor")
              for b in ("hf_plain", "naive") if b in tps}
    print(f"\nguided generation, batch {args.batch}, {args.new_tokens} new tokens, vocab {args.vocab}, "
          f"{args.layers} layers x {args.width}, torch threads {torch.get_num_threads()}")
    print(f"{'path':<20}{'tokens/s':>10}{'median s':>10}{'runs':>6}")
    for name, t in times.items():
        print(f"{name:<20}{tps[name]:>10.1f}{statistics.median(t):>10.2f}{len(t):>6}")
    print()
    for key, value in ratios.items():
        print(f"{key:<32}{value:>8.2f}x")
    macs = macs_per_token(model, args.top_k)
    bound = {f"{p}/hf_plain": macs["hf_plain"] / macs[p] for p in ("ilql", "ilql_behaviour")}
    print("\nmatmul work per token (M multiply-adds) and the compute-bound ceiling of the ratio:")
    for name, value in macs.items():
        print(f"{name:<16}{value / 1e6:>8.1f}M")
    for key, value in bound.items():
        print(f"{key:<28}{value:>8.2f}x at most, if matmuls were all that counted")

    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(dict(
            settings=vars(args), device="cpu", torch_threads=torch.get_num_threads(), torch=torch.__version__,
            machine=platform.processor() or platform.machine(), seconds=times, tokens_per_s=tps, ratios=ratios,
            macs_per_token=macs, compute_bound_ratios=bound,
        ), f, indent=2)
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
