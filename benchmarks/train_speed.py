"""Training speed and memory: the straightforward reference loss against the optimised paths.

Measures, in one process, seconds per optimizer step, tokens/s and peak memory of each path on
(a) the randomwalks demo configuration (6-layer 144-wide GPT-2, batch 100, 11 tokens) and
(b) a GPT-2 with a 32k vocabulary built from a config (4 layers, 256 wide, sequence 256,
batch 8). Figures are ratios against the reference measured in the same run; the table is
printed and written to benchmarks/results/train_speed.json.

    OMP_NUM_THREADS=1 python benchmarks/train_speed.py [--steps 5] [--cases a,b] [--variants ...]

Paths:
- reference: trlx's computation, five [B, A, V] tensors (LM logits, two Q heads and two target
  Q heads over the whole vocabulary) and `ilql_loss`, statistics copied to the host every step;
- chunk_size=None: the library's reference path (target Q heads already only at the taken
  action), for information;
- chunked: the default `ilql_loss_chunked` (method.chunk_size=256), train.log_interval=10;
- chunked+bf16 / chunked+compile / both: with train.mixed_precision="bf16" / train.compile=true.

Time: on CPU, the process's CPU time per step (one thread), which other processes competing
for the cores hardly change; wall time is in the JSON too. Steps of the paths are interleaved.
Peak memory is the process's peak resident set during the timed steps (Linux VmHWM, reset
through /proc/self/clear_refs) minus the resident set before them (weights, optimizer state),
i.e. what one training step adds (ratios are left out below 32 MB, where RSS is noise). On
CUDA, torch.cuda.max_memory_allocated is used instead.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ilql.config import default_ilql_config  # noqa: E402
from ilql.data import Episode, make_episodes  # noqa: E402
from ilql.loss import ilql_loss  # noqa: E402
from ilql.modeling import AutoModelForCausalLMWithILQLHeads  # noqa: E402
from ilql.trainer import ILQLTrainer, training_autocast  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "train_speed.json"


class FullVocabReference(ILQLTrainer):
    """trlx's way: every head over the whole vocabulary, target Q gathered afterwards."""

    def loss(self, batch):
        m = self.config.method
        with training_autocast(self.device, self.config.train.mixed_precision):
            out = self.model(batch.input_ids, batch.attention_mask, actions_ixs=batch.actions_ixs, states_ixs=batch.states_ixs)
            target_qs = [t.gather(-1, batch.actions.unsqueeze(-1)).squeeze(-1) for t in out.target_qs]
            return ilql_loss(
                logits=out.logits, qs=out.qs, target_qs=target_qs, vs=out.vs, actions=batch.actions,
                rewards=batch.rewards, dones=batch.dones, tau=m.tau, gamma=m.gamma, cql_scale=m.cql_scale,
                awac_scale=m.awac_scale, beta=m.beta,
            )


VARIANTS = {
    "reference": (FullVocabReference, dict(method=dict(chunk_size=None))),
    "chunk_size=None": (ILQLTrainer, dict(method=dict(chunk_size=None))),
    "chunked": (ILQLTrainer, dict(train=dict(log_interval=10))),
    "chunked+bf16": (ILQLTrainer, dict(train=dict(log_interval=10, mixed_precision="bf16"))),
    "chunked+compile": (ILQLTrainer, dict(train=dict(log_interval=10, compile=True))),
    "chunked+compile+bf16": (ILQLTrainer, dict(train=dict(log_interval=10, compile=True, mixed_precision="bf16"))),
}
MIN_MEASURABLE = 32 * 2**20  # resident-set peaks below this are noise (allocator caching, page reuse)


# ------------------------------------------------------------------------------- the cases
def randomwalks_case():
    from ilql.tasks import randomwalks as rw

    task = rw.generate_random_walks(seed=1000)
    tokenizer = rw.build_tokenizer(task.n_nodes)
    config = rw.default_config()
    episodes = make_episodes(task.samples, task.rewards, tokenizer, config.train.seq_length)
    return dict(
        name="a: randomwalks demo", model_config=rw.model_config(tokenizer), config=config,
        episodes=episodes, pad_token_id=tokenizer.pad_token_id,
    )


def gpt2_32k_case(batch_size=8, seq_length=256, vocab=32000):
    from transformers import GPT2Config

    model_config = GPT2Config(
        n_layer=4, n_embd=256, n_head=4, n_positions=seq_length, vocab_size=vocab,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    rng = np.random.RandomState(0)
    episodes = []
    for _ in range(4 * batch_size):  # plain texts: BOS then seq_length - 1 actions
        ids = np.concatenate([[0], rng.randint(1, vocab, seq_length - 1)]).astype(np.int64)
        actions_ixs = np.arange(seq_length - 1)
        rewards = np.zeros(seq_length - 1, np.float32)
        rewards[-1] = rng.randn()
        dones = np.ones(seq_length, np.int64)
        dones[-1] = 0
        states_ixs = np.arange(seq_length)
        episodes.append(Episode(ids, actions_ixs, states_ixs, rewards, dones))
    config = default_ilql_config().evolve(train=dict(batch_size=batch_size, seq_length=seq_length))
    return dict(
        name=f"b: gpt2 4x256, vocab {vocab // 1000}k, seq {seq_length}, batch {batch_size}",
        model_config=model_config, config=config, episodes=episodes, pad_token_id=0,
    )


# ---------------------------------------------------------------------------- measurements
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return re.search(r"model name\s*:\s*(.*)", f.read()).group(1).strip()
    except (OSError, AttributeError):
        return platform.processor() or "cpu"


def rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def reset_peak() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set


def memory_baseline() -> float:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else rss_kb("VmRSS") * 1024


def memory_peak() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return rss_kb("VmHWM") * 1024


def build(case, variant: str, warmup: int):
    """A trainer for one path, warmed up (optimizer state allocated, trunk compiled)."""
    trainer_cls, overrides = VARIANTS[variant]
    overrides = {**overrides, "train": {**overrides.get("train", {}), "progress_bar": False}}
    config = case["config"].evolve(**overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLMWithILQLHeads.from_config(case["model_config"])
    trainer = trainer_cls(config, model, SimpleNamespace(pad_token_id=case["pad_token_id"]), case["episodes"])
    torch.manual_seed(0)
    batch = next(iter(trainer.loader))  # one fixed batch: every path sees the same shapes
    for _ in range(warmup):
        trainer.train_step(batch)
    return trainer, batch


def timed_step(trainer, batch):
    """Seconds (CPU time of this process on CPU, wall time on CUDA), wall seconds and the peak
    extra memory of one optimizer step."""
    gc.collect()
    baseline = memory_baseline()
    reset_peak()
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.train_step(batch)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return (wall if torch.cuda.is_available() else cpu), wall, memory_peak() - baseline


def run_case(case, variants, steps: int, warmup: int):
    """Every path keeps its trainer; steps are interleaved path by path (the order rotating),
    so that load from other processes falls on all paths alike. Medians over the steps."""
    trainers = {v: build(case, v, warmup) for v in variants}
    times = {v: [] for v in variants}
    walls = {v: [] for v in variants}
    peaks = {v: [] for v in variants}
    for step in range(steps):
        order = variants[step % len(variants) :] + variants[: step % len(variants)]
        for variant in order:
            seconds, wall, peak = timed_step(*trainers[variant])
            times[variant].append(seconds)
            walls[variant].append(wall)
            peaks[variant].append(peak)
    tokens = int(next(iter(trainers.values()))[1].attention_mask.sum())
    ref = variants[0]
    ref_time, ref_peak = statistics.median(times[ref]), statistics.median(peaks[ref])
    rows = {}
    for v in variants:
        seconds, peak = statistics.median(times[v]), statistics.median(peaks[v])
        rows[v] = dict(
            seconds_per_step=seconds,
            seconds_per_step_min=min(times[v]),
            wall_seconds_per_step=statistics.median(walls[v]),
            tokens_per_step=tokens,
            tokens_per_second=tokens / seconds,
            peak_step_mb=peak / 2**20,
            step_speedup=ref_time / seconds,
            memory_ratio=peak / ref_peak if ref_peak >= MIN_MEASURABLE else None,
        )
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per path (interleaved)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps (optimizer state, compilation)")
    parser.add_argument("--cases", default="a,b")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated; the first is the baseline")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    builders = {"a": randomwalks_case, "b": gpt2_32k_case}
    variants = args.variants.split(",")
    report = dict(
        command="OMP_NUM_THREADS={} python benchmarks/train_speed.py {}".format(
            os.environ["OMP_NUM_THREADS"], " ".join(sys.argv[1:] if argv is None else argv)
        ),
        torch=torch.__version__,
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_name(),
        threads=torch.get_num_threads(),
        steps=args.steps,
        cases={},
    )
    for key in args.cases.split(","):
        case = builders[key]()
        rows = run_case(case, variants, args.steps, args.warmup)
        report["cases"][case["name"]] = rows
        print_table(case["name"], rows)
        gc.collect()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.output}")


def print_table(name, rows):
    print(f"\n{name}")
    header = f"{'path':<22}{'s/step':>9}{'tokens/s':>10}{'step MB':>9}{'speedup':>9}{'mem ratio':>10}"
    print(header)
    print("-" * len(header))
    for variant, r in rows.items():
        ratio = "n/a" if r["memory_ratio"] is None else f"{r['memory_ratio']:.2f}x"
        print(
            f"{variant:<22}{r['seconds_per_step']:>9.3f}{r['tokens_per_second']:>10.0f}{max(r['peak_step_mb'], 0):>9.0f}"
            f"{r['step_speedup']:>8.2f}x{ratio:>10}"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
