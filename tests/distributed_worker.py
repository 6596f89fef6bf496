"""One rank of the CPU process groups that tests/test_distributed.py starts (gloo backend).

Each rank sets the environment torchrun would set, so `ilql.parallel.Parallel.from_config`
takes its torchrun path. Scenarios run one after another in the same process group; rank 0
writes what every scenario measured to ``<tmp>/<name>.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)

STEPS = 10


def tiny_model_config(kind: str, tokenizer):
    """A 2-layer, 32-wide model without dropout (dropout would draw different masks per rank)."""
    from transformers import GPT2Config, LlamaConfig

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if kind == "gpt2":  # tied input embedding and LM head
        return GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=len(tokenizer),
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    return LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=64, vocab_size=len(tokenizer), **ids)


def make_trainer(tokenizer_path: str, tmp: str, strategy: str, kind: str = "gpt2", **overrides):
    """An `ILQLTrainer` on 40 random walks, batch 8, with the same seeds on every rank."""
    import ilql
    from ilql.data import make_episodes
    from ilql.tasks.randomwalks import generate_random_walks
    from ilql.trainer import ILQLTrainer, load_model, load_tokenizer, set_seed

    walks = generate_random_walks(n_walks=40, seed=1002)
    train = dict(seq_length=11, batch_size=8, eval_batch_size=2, epochs=100, total_steps=STEPS, eval_interval=1000,
                 checkpoint_interval=1000, checkpoint_dir=str(Path(tmp) / f"ckpts_{strategy}"), progress_bar=False,
                 strategy=strategy)
    train.update(overrides.pop("train", {}))
    config = ilql.default_ilql_config().evolve(
        train=train,
        tokenizer=dict(tokenizer_path=tokenizer_path),
        optimizer=dict(kwargs=dict(lr=1e-3, **overrides.pop("optimizer_kwargs", {}))),
        method=dict(steps_for_target_q_sync=2, alpha=0.5, gen_kwargs=dict(max_new_tokens=4, top_k=0, beta=1, temperature=0),
                    **overrides.pop("method", {})),
    )
    set_seed(config.train.seed)
    tokenizer = load_tokenizer(config)
    episodes = make_episodes(walks.samples, walks.rewards, tokenizer, config.train.seq_length)
    model = load_model(tiny_model_config(kind, tokenizer), config)
    metric_fn = lambda samples, **kw: walks.metric(samples)  # noqa: E731
    # 5 prompts in batches of 2: ranks decode 3 and 2 prompts, in 2 and 1 batches (a collective
    # inside decoding would hang)
    return ILQLTrainer(config, model, tokenizer, episodes, walks.eval_prompts[:5], metric_fn, ["|"]), walks


def run_steps(trainer, n: int):
    """`n` optimizer steps through the trainer's own loader and train_step; their losses."""
    losses = []
    while len(losses) < n:
        for batch in trainer.loader:
            losses.append(trainer.train_step(batch)["losses/loss"])
            if len(losses) == n:
                break
    return losses


def scenario_losses(tokenizer_path, tmp, strategy, kind="gpt2", **overrides):
    trainer, _ = make_trainer(tokenizer_path, tmp, strategy, kind, **overrides)
    return {"losses": run_steps(trainer, STEPS)}


def scenario_save(tokenizer_path, tmp, strategy, path, kind="gpt2", **overrides):
    """Half the run (one epoch), then a sharded checkpoint of model, optimizer and counters."""
    from ilql.parallel import save_sharded

    trainer, _ = make_trainer(tokenizer_path, tmp, strategy, kind, **overrides)
    losses = run_steps(trainer, STEPS // 2)
    save_sharded(path, trainer.model, trainer.optimizer, {"step": trainer.step, "scheduler": json.dumps(trainer.scheduler.state_dict())})
    return {"losses": losses}


def scenario_resume(tokenizer_path, tmp, strategy, path, kind="gpt2", **overrides):
    """A fresh trainer loads the checkpoint and runs the second half (the second epoch)."""
    from ilql.parallel import load_sharded

    trainer, _ = make_trainer(tokenizer_path, tmp, strategy, kind, **overrides)
    extra = load_sharded(path, trainer.model, trainer.optimizer, {"step": 0, "scheduler": ""})
    trainer.step = extra["step"]
    trainer.scheduler.load_state_dict(json.loads(extra["scheduler"]))
    for _ in trainer.loader:  # replay the first epoch's draws: the loader generator moves on
        pass
    return {"losses": run_steps(trainer, STEPS - STEPS // 2), "step": extra["step"]}


def scenario_learn(tokenizer_path, tmp, strategy, kind="gpt2", resume=None, **overrides):
    """`learn()` with greedy evaluation at steps 5 and 10 and checkpoints at steps 3, 6, 9 and
    10 (optionally resumed from a checkpoint first); the logged history."""
    train = {"eval_interval": STEPS // 2, "checkpoint_interval": 3, **overrides.pop("train", {})}
    trainer, _ = make_trainer(tokenizer_path, tmp, strategy, kind, train=train, **overrides)
    if resume is not None:
        trainer.load_checkpoint(resume)
    trainer.learn()
    trainer.save_pretrained(Path(tmp) / f"final_{strategy}_{kind}")  # gathered on rank 0 under fsdp / tp
    return {"history": [{k: v for k, v in r.items() if not k.startswith("time/")} for r in trainer.history],
            "sharded_trunk_params": sharded_trunk_params(trainer.model)}


def sharded_trunk_params(model):
    """Names of the trunk's parameters that are DTensors (sharded by "tp" or "fsdp")."""
    from torch.distributed.tensor import DTensor

    trunk = model.base_model.base_model
    return sorted(n for n, p in trunk.named_parameters() if isinstance(p, DTensor))


SCENARIOS = {"losses": scenario_losses, "save": scenario_save, "resume": scenario_resume, "learn": scenario_learn}


def main(rank: int, world_size: int, port: int, tokenizer_path: str, tmp: str, jobs) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    try:
        for name, kind, kwargs in jobs:
            result = SCENARIOS[kind](tokenizer_path, tmp, **kwargs)
            if rank == 0:
                Path(tmp, f"{name}.json").write_text(json.dumps(result))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":  # torchrun tests/distributed_worker.py TOKENIZER TMP JOBS_JSON
    main(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["MASTER_PORT"]),
         sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
