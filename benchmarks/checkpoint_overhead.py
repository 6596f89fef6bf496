"""What fault tolerance costs, as ratios to one training step measured in the same process.

On the randomwalks demo configuration (6-layer 144-wide GPT-2, batch 100, 11 tokens) and on a
larger GPT-2 (4 layers, 256 wide, 8k vocabulary, batch 8, 64 tokens), measures:

- the non-finite guard: the time of one `_skip_nonfinite` check on the gradients a step left
  behind (median of 20), as a fraction of the step (timing whole steps with and without it
  drowns a ~1% difference in the noise of a shared machine);
- `save_checkpoint` (model, heads, tokenizer, optimizer, scheduler, RNG, manifest with sha256)
  and the share of it spent hashing the files for the manifest, in training steps;
- `load_checkpoint` (verify every checksum, restore everything), in training steps.

    OMP_NUM_THREADS=1 python benchmarks/checkpoint_overhead.py [--steps 5] [--rounds 3]

The table is printed and written to benchmarks/results/checkpoint_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from transformers import GPT2Config  # noqa: E402

from ilql import checkpoint as ckpt  # noqa: E402
from ilql.config import default_ilql_config  # noqa: E402
from ilql.data import make_episodes  # noqa: E402
from ilql.modeling import AutoModelForCausalLMWithILQLHeads  # noqa: E402
from ilql.tasks.randomwalks import build_tokenizer, generate_random_walks  # noqa: E402
from ilql.trainer import ILQLTrainer  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "checkpoint_overhead.json"


def _bpe_tokenizer(vocab_size: int):
    """A byte-level tokenizer padded to `vocab_size` entries, so the heads have a real vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size - 1)}
    vocab["<|endoftext|>"] = vocab_size - 1
    core = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    tok.pad_token = tok.eos_token
    return tok


def build_case(name: str, workdir: Path) -> ILQLTrainer:
    torch.manual_seed(0)
    if name == "randomwalks":
        task = generate_random_walks(seed=1000)
        tokenizer = build_tokenizer(task.n_nodes)
        samples, rewards = task.samples, task.rewards
        model_config = GPT2Config(n_layer=6, n_embd=144, n_head=12, n_positions=64, vocab_size=len(tokenizer),
                                  bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
        train = dict(seq_length=11, batch_size=100)
    else:
        tokenizer = _bpe_tokenizer(8000)
        g = torch.Generator().manual_seed(0)
        samples = [" ".join(f"t{i}" for i in torch.randint(0, 7999, (64,), generator=g).tolist()) for _ in range(64)]
        rewards = torch.rand(64, generator=g).tolist()
        model_config = GPT2Config(n_layer=4, n_embd=256, n_head=8, n_positions=128, vocab_size=len(tokenizer),
                                  bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
        train = dict(seq_length=64, batch_size=8)
    config = default_ilql_config().evolve(
        train=dict(**train, total_steps=10**6, checkpoint_dir=str(workdir / name), progress_bar=False)
    )
    episodes = make_episodes(samples, rewards, tokenizer, config.train.seq_length)
    model = AutoModelForCausalLMWithILQLHeads.from_config(model_config, alpha=config.method.alpha)
    return ILQLTrainer(config, model, tokenizer, episodes)


def seconds_per_step(trainer: ILQLTrainer, steps: int) -> float:
    batches = iter(trainer.loader)
    trainer.train_step(next(batches))  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(trainer.loader)
            batch = next(batches)
        trainer.train_step(batch)
    return (time.perf_counter() - start) / steps


def guard_seconds(trainer: ILQLTrainer, repeats: int = 20) -> float:
    """One finite-case guard check on the gradients the last step left in place."""
    assert any(p.grad is not None for p in trainer.model.parameters())
    loss, times = torch.tensor(1.0), []
    for _ in range(repeats):
        t0 = time.perf_counter()
        assert trainer._skip_nonfinite(loss, {}) is False
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(name: str, steps: int, rounds: int, workdir: Path) -> dict:
    trainer = build_case(name, workdir)
    step = statistics.median(seconds_per_step(trainer, steps) for _ in range(rounds))
    guard = guard_seconds(trainer)
    saves, hashes, loads = [], [], []
    for i in range(rounds):
        path = workdir / name / f"checkpoint_{i:07d}"
        t0 = time.perf_counter()
        trainer.save_checkpoint(path)
        saves.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ckpt.build_manifest(path, trainer.step, "train")  # the hashing part of a save, again
        hashes.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        trainer.load_checkpoint(path)
        loads.append(time.perf_counter() - t0)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {
        "case": name,
        "params_M": sum(p.numel() for p in trainer.model.parameters()) / 1e6,
        "checkpoint_MB": size / 2**20,
        "step_s": step,
        "guard_overhead": guard / step,
        "save_in_steps": statistics.median(saves) / step,
        "hash_share_of_save": statistics.median(hashes) / statistics.median(saves),
        "load_in_steps": statistics.median(loads) / step,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", default="randomwalks,gpt2-8k")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases.split(","):
            rows.append(measure(name, args.steps, args.rounds, Path(tmp)))
    from rich.console import Console
    from rich.table import Table

    table = Table(title="fault tolerance overhead (ratios to one training step, same process)")
    for column in ("case", "params", "checkpoint", "step", "guard overhead", "save", "of it: sha256", "load+verify"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            r["case"], f"{r['params_M']:.1f}M", f"{r['checkpoint_MB']:.0f} MB", f"{r['step_s'] * 1000:.0f} ms",
            f"{100 * r['guard_overhead']:.2f}%", f"{r['save_in_steps']:.2f} steps",
            f"{100 * r['hash_share_of_save']:.0f}%", f"{r['load_in_steps']:.2f} steps",
        )
    Console(width=130).print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": "cpu",
            "python": sys.version.split()[0], "machine": platform.machine(), "args": vars(args)}
    RESULTS.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
