"""Child process of tests/test_resume.py: a tiny randomwalks training run in WORKDIR.

Usage: python resume_child.py WORKDIR [--resume]. With ILQL_FAULT_INJECT=point:step set, the
run SIGKILLs itself at that point (see ilql.checkpoint.fault_point). Not collected by pytest.
"""

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)

import ilql  # noqa: E402
from ilql.tasks.randomwalks import build_tokenizer, generate_random_walks  # noqa: E402

TOTAL_STEPS = 12


def config(workdir: str) -> ilql.TRLConfig:
    return ilql.default_ilql_config().evolve(
        train=dict(
            seq_length=11, batch_size=16, epochs=100, total_steps=TOTAL_STEPS, checkpoint_interval=4,
            eval_interval=3, seed=7, checkpoint_dir=os.path.join(workdir, "ckpts"), progress_bar=False,
            keep_last_checkpoints=2,
        ),
        tokenizer=dict(tokenizer_path=os.path.join(workdir, "tokenizer")),
        optimizer=dict(kwargs=dict(lr=1e-3, betas=[0.9, 0.95], eps=1e-8, weight_decay=1e-6)),
        scheduler=dict(name="cosine_annealing", kwargs=dict(T_max=20, eta_min=1e-5)),
        method=dict(alpha=0.1, steps_for_target_q_sync=2, beta=1.0,
                    gen_kwargs=dict(max_new_tokens=4, top_k=5, beta=[0, 2], temperature=1.0)),
    )


def main() -> None:
    workdir, resume = sys.argv[1], "--resume" in sys.argv[2:]
    from transformers import GPT2Config

    task = generate_random_walks(n_walks=40, seed=3)  # 40 walks / batch 16: 3 batches an epoch
    tokenizer = build_tokenizer(task.n_nodes)
    tokenizer.save_pretrained(os.path.join(workdir, "tokenizer"))
    model_config = GPT2Config(
        n_layer=1, n_embd=32, n_head=4, n_positions=16, vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    ilql.train(
        model_path=model_config,
        samples=task.samples,
        rewards=task.rewards,
        eval_prompts=task.eval_prompts[:4],
        metric_fn=task.metric_fn,
        stop_sequences=["|"],
        config=config(workdir),
        resume_from_checkpoint="latest" if resume else None,
    )


if __name__ == "__main__":
    main()
