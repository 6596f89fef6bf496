"""Per-rank training state and step time of ddp / fsdp / tp against a single process.

Two CPU ranks over gloo (started here with torch.multiprocessing). Rank 0 first trains the
same model in a single process ("none", the baseline) in the same process, then every
strategy runs on both ranks. Reported as ratios to the baseline:

- state/rank: bytes this rank holds in parameters + gradients + optimizer states (exact;
  the ideal is 1.0 for ddp, 1/2 for fsdp, and 1/2 of the vocabulary-sized part for tp);
- step time: median seconds per optimizer step of the same global batch (noisy on shared
  cores; ideal 1/2 for data parallel when compute dominates, which it does not for tiny
  models on 2 cores with gloo).

    OMP_NUM_THREADS=1 python benchmarks/distributed.py [--steps 8] [--vocab 8000]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "distributed.json"


def build(strategy: str, args, tok_path: str, tmp: str):
    import ilql
    from transformers import GPT2Config

    from ilql.data import make_episodes
    from ilql.tasks.randomwalks import generate_random_walks
    from ilql.trainer import ILQLTrainer, load_model, load_tokenizer, set_seed

    config = ilql.default_ilql_config().evolve(
        train=dict(seq_length=11, batch_size=args.batch_size, total_steps=args.steps, checkpoint_dir=tmp,
                   progress_bar=False, strategy=strategy),
        tokenizer=dict(tokenizer_path=tok_path),
        optimizer=dict(kwargs=dict(lr=1e-4)),
    )
    set_seed(0)
    tokenizer = load_tokenizer(config)
    walks = generate_random_walks(n_walks=args.batch_size * 4, seed=1002)
    episodes = make_episodes(walks.samples, walks.rewards, tokenizer, config.train.seq_length)
    model_config = GPT2Config(n_layer=args.layers, n_embd=args.hidden, n_head=4, n_positions=64, vocab_size=args.vocab,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    return ILQLTrainer(config, load_model(model_config, config), tokenizer, episodes)


def local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def measure(trainer, steps: int):
    times = []
    while len(times) < steps:
        for batch in trainer.loader:
            start = time.perf_counter()
            trainer.train_step(batch)
            times.append(time.perf_counter() - start)
            if len(times) == steps:
                break
    params = list(trainer.model.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    optim = [v for state in trainer.optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.dim() > 0]
    return {"state_bytes": local_bytes(params) + local_bytes(grads) + local_bytes(optim),
            "step_s": statistics.median(times[1:])}  # the first step pays for lazy initialisation


def worker(rank: int, world: int, port: int, args, tok_path: str, tmp: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    results = {}
    if rank == 0:  # the baseline, in the process that also measures rank 0 of every strategy
        results["none"] = measure(build("none", args, tok_path, tmp), args.steps)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    for strategy in ("ddp", "fsdp", "tp"):
        results[strategy] = measure(build(strategy, args, tok_path, tmp), args.steps)
    if rank == 0:
        Path(tmp, "rank0.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def main() -> None:
    import tempfile

    import torch.multiprocessing as mp

    from ilql.tasks.randomwalks import build_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tok_path = str(Path(tmp) / "tok")
        build_tokenizer(21).save_pretrained(tok_path)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(worker, args=(2, port, args, tok_path, tmp), nprocs=2, join=True)
        results = json.loads(Path(tmp, "rank0.json").read_text())
    base = results["none"]
    rows = []
    print(f"GPT-2 {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, global batch {args.batch_size}, 2 CPU ranks (gloo)")
    print(f"{'strategy':<10}{'state/rank MB':>15}{'ratio':>8}{'step s':>10}{'ratio':>8}")
    for name, r in results.items():
        row = dict(strategy=name, state_mb=r["state_bytes"] / 2**20, state_ratio=r["state_bytes"] / base["state_bytes"],
                   step_s=r["step_s"], step_ratio=r["step_s"] / base["step_s"])
        rows.append(row)
        print(f"{name:<10}{row['state_mb']:>15.2f}{row['state_ratio']:>8.3f}{row['step_s']:>10.4f}{row['step_ratio']:>8.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
