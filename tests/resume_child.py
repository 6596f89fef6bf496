"""Driver process of tests/test_resume.py (not collected by pytest).

Usage: python resume_child.py ROOT [--random-kills]. Imports ilql once, then runs each training in a forked
child (one import instead of four): an uninterrupted reference run in ROOT/reference, and in
ROOT/crashed a run that SIGKILLs itself after step 6, a resume that SIGKILLs itself while
writing checkpoint 8 (ILQL_FAULT_INJECT, see ilql.checkpoint.fault_point) and a final resume.
Prints a JSON report of exit statuses and of the checkpoints seen between the runs.

With --random-kills, ROOT/crashed is instead trained by children that the driver itself
SIGKILLs after fixed delays, wherever they happen to be (loading, training, evaluating,
saving, pruning), each resuming from the latest checkpoint, until one finishes.
"""

import json
import os
import signal
import sys
import time
import traceback

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


import ilql  # noqa: E402
from ilql import checkpoint as ckpt  # noqa: E402
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


def train_once(workdir: str, resume: bool) -> None:
    from transformers import GPT2Config

    torch.set_num_threads(1)
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


def in_child(workdir: str, resume: bool = False, fault: str = None, kill_after: float = None) -> int:
    """Run one training in a forked child; its exit status, negative for a signal. With
    `kill_after`, the driver SIGKILLs the child after that many seconds if it still runs."""
    log = os.path.join(workdir, f"log-{fault or 'done'}.txt")
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.environ.pop(ckpt.FAULT_ENV, None)
            if fault:
                os.environ[ckpt.FAULT_ENV] = fault
            train_once(workdir, resume)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    done, status = 0, 0
    if kill_after is not None:
        deadline = time.monotonic() + kill_after
        while not done and time.monotonic() < deadline:
            time.sleep(0.01)
            done, status = os.waitpid(pid, os.WNOHANG)
        if not done:
            os.kill(pid, signal.SIGKILL)
    if not done:
        _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def checkpoints_seen(workdir: str) -> dict:
    root = os.path.join(workdir, "ckpts")
    return {
        "steps": [step for step, _ in ckpt.list_checkpoints(root)],
        "partial": len(ckpt.partial_checkpoints(root)),
        "problems": {p.name: ckpt.verify_checkpoint(p) for _, p in ckpt.list_checkpoints(root)},
    }


def random_kills(crashed: str, report: dict, reference_seconds: float) -> None:
    """Kill each child after a growing fraction of the reference run's duration, then let the
    last one finish; record what each kill left behind."""
    report["statuses"], report["seen"] = [], []
    for fraction in (0.4, 0.65, 0.9, None):
        kill_after = None if fraction is None else fraction * reference_seconds
        status = in_child(crashed, resume=True, kill_after=kill_after)
        report["statuses"].append(status)
        report["seen"].append(checkpoints_seen(crashed))
        if status != -9:
            break
    with open(os.path.join(crashed, "log-done.txt"), encoding="utf-8") as f:
        report["final_log"] = f.read()[-4000:]
    report["final"] = report["statuses"][-1]


def main() -> None:
    root = sys.argv[1]
    reference, crashed = os.path.join(root, "reference"), os.path.join(root, "crashed")
    os.makedirs(reference), os.makedirs(crashed)
    start = time.monotonic()
    report = {"reference": in_child(reference)}
    if "--random-kills" in sys.argv[2:]:
        random_kills(crashed, report, time.monotonic() - start)
        print(json.dumps(report))
        return
    report["after_step"] = in_child(crashed, fault="after_step:6")
    report["after_step_seen"] = checkpoints_seen(crashed)
    report["mid_save"] = in_child(crashed, resume=True, fault="mid_save:8")
    report["mid_save_seen"] = checkpoints_seen(crashed)
    report["final"] = in_child(crashed, resume=True)
    with open(os.path.join(crashed, "log-done.txt"), encoding="utf-8") as f:
        report["final_log"] = f.read()[-4000:]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
