"""Data pipeline at scale: tokenize + index 1,000,000 short samples, memory, cache, padding.

One process. A synthetic corpus of short samples (plain texts and prompt/completion pairs of
2-40 words from a 2,000-word vocabulary, some with per-turn rewards) and a byte-level BPE
tokenizer trained on a slice of it. Measured:

- ``make_episodes`` on all N samples (batched tokenization into the compact `EpisodeStore`):
  seconds, samples/s, and peak RSS (the process high-water mark, with the RSS after building
  the corpus as the baseline); the store's bytes per token;
- on a subset of ``--base`` samples, the ratio against the per-sample baseline (one tokenizer
  call per segment, a list of per-episode numpy `Episode` objects, as the pipeline did before):
  time ratio, and memory of the result (tracemalloc) ratio;
- reading the same N episodes back from the on-disk cache: seconds, and the ratio to tokenizing;
- one epoch of batches (``--batch-size``): padding ratio (padded slots / all slots) with plain
  shuffling and with length grouping, and their ratio.

    OMP_NUM_THREADS=1 python benchmarks/data_scale.py [--samples 1000000] [--base 50000]

The table is printed and written to benchmarks/results/data_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ilql.data import (  # noqa: E402
    LengthGroupedBatchSampler,
    make_episodes,
    padding_ratio,
    segments_to_episode,
    tokenize_dialogue,
    validate_samples,
)


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def corpus(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, size=rng.integers(2, 9))) for _ in range(2000)]
    words = np.array(words)
    lengths = np.minimum(rng.geometric(0.12, size=n) + 1, 40)
    kinds = rng.random(n)
    samples, rewards = [], []
    for i in range(n):
        text = " ".join(words[rng.integers(0, len(words), size=lengths[i])])
        if kinds[i] < 0.5:
            samples.append(text)
            rewards.append(float(rng.normal()))
        else:
            cut = text.find(" ", len(text) // 3)
            if cut <= 0:
                samples.append(text)
                rewards.append(float(rng.normal()))
                continue
            samples.append([text[:cut], text[cut:]])
            rewards.append([float(rng.normal())] if kinds[i] < 0.75 else float(rng.normal()))
    return samples, rewards


def tokenizer_for(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4000, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    tok.pad_token = tok.eos_token
    return tok


def per_sample_baseline(samples, rewards, tok, max_length):
    """The former pipeline: one tokenizer call per segment, a list of numpy Episodes."""
    dialogues, values = validate_samples(samples, rewards)
    values = values.tolist() if isinstance(values, np.ndarray) else values
    episodes = []
    for i, d in enumerate(dialogues):
        token_lists = [[] if t is None else list(tok(t, add_special_tokens=False).input_ids) for t in d]
        episodes.append(segments_to_episode(tokenize_dialogue(d, tok, max_length, i, values[i], token_lists)))
    return episodes


def timed(fn, rounds: int = 2) -> float:
    """Best of `rounds` wall times (other processes share the cores)."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def traced_bytes(fn) -> int:
    """Bytes still allocated by the result of `fn` (tracemalloc also sees numpy buffers)."""
    tracemalloc.start()
    out = fn()
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del out
    return current


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--base", type=int, default=50_000, help="subset size for the per-sample baseline")
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "data_scale.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    t0 = time.perf_counter()
    samples, rewards = corpus(args.samples)
    corpus_seconds = time.perf_counter() - t0
    tok = tokenizer_for(s if isinstance(s, str) else "".join(s) for s in samples[:50_000])
    rss_before = rss_mib()

    # all samples: batched tokenization into the compact store
    t0 = time.perf_counter()
    store = make_episodes(samples, rewards, tok, args.seq_length)
    full_seconds = time.perf_counter() - t0
    peak_after = peak_rss_mib()
    n_tokens = int(store.lengths.sum())

    # cache: write once, then time a read
    cache = Path(tempfile.mkdtemp(prefix="ilql-cache-"))
    try:
        make_episodes(samples, rewards, tok, args.seq_length, cache_dir=cache)
        t0 = time.perf_counter()
        cached = make_episodes(samples, rewards, tok, args.seq_length, cache_dir=cache)
        cache_seconds = time.perf_counter() - t0
        assert len(cached) == len(store)
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    # subset: store vs per-sample baseline, time and result memory
    sub_s, sub_r = samples[: args.base], rewards[: args.base]
    store_s, base_s = float("inf"), float("inf")
    for _ in range(2):  # interleaved, so that load from other processes hits both alike
        store_s = min(store_s, timed(lambda: make_episodes(sub_s, sub_r, tok, args.seq_length), 1))
        base_s = min(base_s, timed(lambda: per_sample_baseline(sub_s, sub_r, tok, args.seq_length), 1))
    store_bytes = traced_bytes(lambda: make_episodes(sub_s, sub_r, tok, args.seq_length))
    base_bytes = traced_bytes(lambda: per_sample_baseline(sub_s, sub_r, tok, args.seq_length))

    # padding over one epoch
    lengths = store.lengths
    gen = torch.Generator().manual_seed(0)
    shuffled = torch.randperm(len(lengths), generator=gen).split(args.batch_size)
    random_ratio = padding_ratio(lengths, (b.numpy() for b in shuffled))
    grouped_ratio = padding_ratio(lengths, LengthGroupedBatchSampler(lengths, args.batch_size, gen))

    result = dict(
        machine=dict(python=platform.python_version(), torch=torch.__version__, cpus=os.cpu_count(),
                     omp_threads=torch.get_num_threads()),
        samples=args.samples, tokens=n_tokens, seq_length=args.seq_length, corpus_seconds=corpus_seconds,
        tokenize_index_seconds=full_seconds, samples_per_second=args.samples / full_seconds,
        rss_before_mib=rss_before, peak_rss_mib=peak_after, peak_rss_growth_mib=peak_after - rss_before,
        store_mib=store.nbytes / 2**20, store_bytes_per_token=store.nbytes / n_tokens,
        cache_read_seconds=cache_seconds, cache_speedup=full_seconds / cache_seconds,
        baseline_subset=args.base, subset_store_seconds=store_s, subset_baseline_seconds=base_s,
        time_ratio_baseline_over_store=base_s / store_s,
        subset_store_mib=store_bytes / 2**20, subset_baseline_mib=base_bytes / 2**20,
        memory_ratio_baseline_over_store=base_bytes / store_bytes,
        batch_size=args.batch_size, padding_ratio_shuffled=random_ratio, padding_ratio_grouped=grouped_ratio,
        padding_reduction=random_ratio / grouped_ratio if grouped_ratio else float("inf"),
    )

    rows = [
        ("samples / tokens", f"{args.samples:,} / {n_tokens:,}"),
        ("tokenize + index (all)", f"{full_seconds:.1f} s ({args.samples / full_seconds:,.0f} samples/s)"),
        ("RSS before -> peak", f"{rss_before:.0f} -> {peak_after:.0f} MiB (+{peak_after - rss_before:.0f})"),
        ("episode store", f"{store.nbytes / 2**20:.1f} MiB ({store.nbytes / n_tokens:.1f} bytes/token)"),
        ("cache read (memory-mapped)", f"{cache_seconds:.1f} s ({full_seconds / cache_seconds:.1f}x faster)"),
        (f"time, per-sample baseline / store ({args.base:,})", f"{base_s:.1f} s / {store_s:.1f} s = {base_s / store_s:.2f}x"),
        (f"memory, baseline / store ({args.base:,})",
         f"{base_bytes / 2**20:.1f} / {store_bytes / 2**20:.1f} MiB = {base_bytes / store_bytes:.1f}x"),
        (f"padding ratio, shuffled (batch {args.batch_size})", f"{random_ratio:.3f}"),
        ("padding ratio, length-grouped", f"{grouped_ratio:.3f} ({result['padding_reduction']:.1f}x less)"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'data_scale':<{width}}  value")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
