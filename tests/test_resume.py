"""Fault tolerance: exact resume after SIGKILL, atomic checkpoints, `ilql train --resume`.

The crash tests run tests/resume_child.py, which trains in forked children: in one,
ILQL_FAULT_INJECT=point:step makes a child SIGKILL itself at a fixed point (mid-run, mid-save),
so the crash is deterministic; in the other the driver SIGKILLs children after fixed delays,
wherever they are. The save tests fork children that only write files.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ilql
from ilql import checkpoint as ckpt

CHILD = Path(__file__).with_name("resume_child.py")
SIGKILLED = -signal.SIGKILL


def run_driver(root: Path, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env.pop(ckpt.FAULT_ENV, None)
    done = subprocess.run([sys.executable, str(CHILD), str(root), *args], env=env, capture_output=True, text=True,
                          timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def step_losses(workdir: Path):
    records = [json.loads(line) for line in (workdir / "ckpts" / "stats.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k.startswith("losses/") or k == "step"} for r in records if "losses/loss" in r]


def assert_same_tensors(dir_a: Path, dir_b: Path, name: str) -> None:
    a, b = load_file(str(dir_a / name)), load_file(str(dir_b / name))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{name}: {key} differs"


def test_sigkill_mid_run_and_mid_save_then_resume_is_bit_exact(tmp_path):
    report = run_driver(tmp_path)
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    assert report["reference"] == 0
    # 1. killed right after step 6: checkpoint_4 (mid-epoch: 3 batches an epoch) is the newest
    assert report["after_step"] == SIGKILLED
    assert report["after_step_seen"] == {"steps": [4], "partial": 0, "problems": {"checkpoint_0000004": None}}
    # 2. resumed, then killed while writing checkpoint_8: a partial save, checkpoint_4 intact
    assert report["mid_save"] == SIGKILLED
    assert report["mid_save_seen"] == {"steps": [4], "partial": 1, "problems": {"checkpoint_0000004": None}}
    # 3. resumed again: skips (and reports) the partial save, finishes
    assert report["final"] == 0, report["final_log"]
    assert "partial checkpoint" in report["final_log"]
    assert_same_run(reference, crashed)


def assert_same_run(reference: Path, crashed: Path) -> None:
    """Same per-step losses, final weights, optimizer/RNG state and best checkpoint."""
    losses = step_losses(crashed)
    assert [r["step"] for r in losses] == list(range(1, 13))
    assert losses == step_losses(reference)
    final = "ckpts/checkpoint_0000012"
    for name in ("model.safetensors", "ilql_heads.safetensors", ckpt.STATE_TENSORS):
        assert_same_tensors(reference / final, crashed / final, name)
    assert_same_tensors(reference / "ckpts/best_checkpoint", crashed / "ckpts/best_checkpoint", "ilql_heads.safetensors")
    # keep_last_checkpoints=2, the best one apart, no leftovers of the crashed saves
    assert sorted(p.name for p in (crashed / "ckpts").iterdir()) == [
        "best_checkpoint", "checkpoint_0000008", "checkpoint_0000012", "stats.jsonl"
    ]


def test_sigkill_at_arbitrary_moments_then_resume_is_bit_exact(tmp_path):
    """The driver kills children after fixed fractions of a run's duration, wherever they are
    (loading, training, evaluating, saving, pruning); each resumes from the latest checkpoint."""
    report = run_driver(tmp_path, "--random-kills")
    assert report["reference"] == 0
    assert report["final"] == 0, report["final_log"]
    assert SIGKILLED in report["statuses"], report["statuses"]
    assert_same_run(tmp_path / "reference", tmp_path / "crashed")


def save_in_child(root: Path, step: int, fault: str = None) -> int:
    """Save a small checkpoint in a forked child (pure file I/O there), which SIGKILLs itself
    at `fault`; its exit status, negative for a signal."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.environ.pop(ckpt.FAULT_ENV, None)
            if fault:
                os.environ[ckpt.FAULT_ENV] = fault
            payload = bytes([step]) * 1000
            ckpt.write_checkpoint_dir(root / ckpt.BEST_NAME, lambda d: (d / "weights.bin").write_bytes(payload), step)
            code = 0
        finally:
            os._exit(code)
    for _ in range(600):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("the saving child hung")


@pytest.mark.parametrize("point", ["mid_save", "before_publish", "mid_replace"])
def test_sigkill_while_replacing_a_checkpoint_keeps_the_previous_one(tmp_path, point):
    assert save_in_child(tmp_path, 1) == 0
    assert save_in_child(tmp_path, 2, fault=f"{point}:2") == SIGKILLED
    ckpt.recover_replaced(tmp_path)  # what resume does first
    best = tmp_path / ckpt.BEST_NAME
    assert ckpt.verify_checkpoint(best) is None
    assert ckpt.read_manifest(best)["step"] == 1
    assert (best / "weights.bin").read_bytes() == bytes([1]) * 1000


def _fake_checkpoint(root: Path, step: int) -> Path:
    def write(d):
        (d / "a.bin").write_bytes(b"x" * step)

    return ckpt.write_checkpoint_dir(root / f"checkpoint_{step:07d}", write, step)


def test_resume_picks_the_newest_complete_checkpoint_and_reports_damaged_ones(tmp_path):
    for step in (1, 2, 3):
        _fake_checkpoint(tmp_path, step)
    (tmp_path / "checkpoint_0000003" / "a.bin").write_bytes(b"y" * 3)  # same size, other bytes
    (tmp_path / "checkpoint_0000004").mkdir()  # no manifest
    (tmp_path / ".checkpoint_0000005.tmp-abc").mkdir()  # an interrupted save
    reports = []
    found = ckpt.find_latest_checkpoint(tmp_path, report=reports.append)
    assert found == tmp_path / "checkpoint_0000002"
    assert len(reports) == 3
    assert any("sha256" in r and "checkpoint_0000003" in r for r in reports)
    assert any("no manifest" in r and "checkpoint_0000004" in r for r in reports)
    assert any("partial" in r and ".checkpoint_0000005.tmp-abc" in r for r in reports)
    (tmp_path / "checkpoint_0000002" / "a.bin").unlink()
    assert "missing" in ckpt.verify_checkpoint(tmp_path / "checkpoint_0000002")


def test_prune_keeps_the_last_n_and_the_best(tmp_path):
    for step in range(1, 6):
        _fake_checkpoint(tmp_path, step)
    ckpt.write_checkpoint_dir(tmp_path / ckpt.BEST_NAME, lambda d: (d / "a.bin").write_bytes(b"b"), 2, "best")
    (tmp_path / ".checkpoint_0000009.tmp-zz").mkdir()
    ckpt.prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.BEST_NAME, "checkpoint_0000004", "checkpoint_0000005"]
    ckpt.prune_checkpoints(tmp_path, keep_last=None)
    assert len(ckpt.list_checkpoints(tmp_path)) == 2


# ------------------------------------------------------------------------ the CLI and train()
@pytest.fixture
def cli_run(tmp_path, tiny_gpt2_config, saved_tokenizer):
    """`ilql train` arguments for a tiny model on a few walks."""
    from ilql.tasks.randomwalks import generate_random_walks

    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    ilql.AutoModelForCausalLMWithILQLHeads.from_config(tiny_gpt2_config).save_pretrained(model_dir)
    task = generate_random_walks(n_walks=24, seed=5)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": c, "reward": r}) + "\n"
                            for (p, c), r in zip(task.samples, task.rewards)))
    config = ilql.default_ilql_config().evolve(
        train=dict(seq_length=11, batch_size=8, total_steps=4, checkpoint_interval=2, eval_interval=100,
                   checkpoint_dir=str(tmp_path / "ckpts"), progress_bar=False),
        tokenizer=dict(tokenizer_path=saved_tokenizer),
    )
    config.save_yaml(tmp_path / "cfg.yaml")
    return ["train", "--config", str(tmp_path / "cfg.yaml"), "--data", str(data), "--model", str(model_dir)]


def test_cli_resume_continues_from_the_latest_checkpoint(tmp_path, cli_run):
    from ilql.cli import main

    assert main(cli_run) == 0
    assert main(cli_run + ["--set", "train.total_steps=6", "--resume"]) == 0
    records = [json.loads(line) for line in (tmp_path / "ckpts" / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "losses/loss" in r] == [1, 2, 3, 4, 5, 6]
    assert ckpt.read_manifest(tmp_path / "ckpts" / "checkpoint_0000006")["step"] == 6


def test_resume_latest_without_a_checkpoint_starts_from_step_zero(tmp_path, cli_run):
    from ilql.cli import main

    with pytest.warns(UserWarning, match="no complete checkpoint"):
        assert main(cli_run + ["--resume"]) == 0
    records = [json.loads(line) for line in (tmp_path / "ckpts" / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "losses/loss" in r] == [1, 2, 3, 4]


def test_resume_refuses_other_data_or_batch_size_and_bad_arguments(tmp_path, cli_run):
    from ilql.cli import main

    assert main(cli_run) == 0
    latest = tmp_path / "ckpts" / "checkpoint_0000004"
    config = ilql.TRLConfig.load_yaml(tmp_path / "cfg.yaml")
    samples, rewards = ilql.data.load_jsonl(cli_run[4])
    model = cli_run[6]
    with pytest.raises(ilql.DataError, match="differ"):
        ilql.train(model_path=model, samples=samples[:-1], rewards=rewards[:-1], config=config,
                   resume_from_checkpoint=str(latest))
    with pytest.raises(ilql.ConfigError, match="train.batch_size"):
        ilql.train(model_path=model, samples=samples, rewards=rewards,
                   config=config.evolve(train=dict(batch_size=4)), resume_from_checkpoint="latest")
    with pytest.raises(ilql.ConfigError, match="not a directory"):
        ilql.train(model_path=model, samples=samples, rewards=rewards, config=config,
                   resume_from_checkpoint=str(tmp_path / "nope"))
    with pytest.raises(ilql.DataTypeError, match="resume_from_checkpoint"):
        ilql.train(model_path=model, samples=samples, rewards=rewards, config=config, resume_from_checkpoint=3)
    (latest / "ilql_heads.safetensors").write_bytes(b"garbage")
    with pytest.raises(ilql.TrainingError, match="ilql_heads.safetensors"):
        ilql.train(model_path=model, samples=samples, rewards=rewards, config=config,
                   resume_from_checkpoint=str(latest))


@pytest.mark.parametrize("group_by_length", [False, True])
def test_in_process_resume_mid_epoch_matches_the_uninterrupted_run(tmp_path, tiny_gpt2_config, saved_tokenizer,
                                                                   group_by_length):
    import shutil

    from ilql.tasks.randomwalks import generate_random_walks

    task = generate_random_walks(n_walks=20, seed=6)  # batch 8: 3 batches an epoch

    def config(name):
        return ilql.default_ilql_config().evolve(
            train=dict(seq_length=11, batch_size=8, total_steps=7, checkpoint_interval=4, eval_interval=100,
                       checkpoint_dir=str(tmp_path / name), progress_bar=False, group_by_length=group_by_length),
            tokenizer=dict(tokenizer_path=saved_tokenizer),
            method=dict(steps_for_target_q_sync=2, alpha=0.5),
        )

    def train(name, resume=None):
        return ilql.train(model_path=tiny_gpt2_config, samples=task.samples, rewards=task.rewards,
                          config=config(name), resume_from_checkpoint=resume)

    reference = train("a")
    shutil.copytree(tmp_path / "a" / "checkpoint_0000004", tmp_path / "b" / "checkpoint_0000004")
    torch.manual_seed(123)  # the resume must not depend on the state it starts from
    resumed = train("b", resume="latest")
    losses = lambda t: [(r["step"], r["losses/loss"]) for r in t.history if "losses/loss" in r]  # noqa: E731
    assert losses(resumed) == losses(reference)[4:]
    for (name, a), b in zip(reference.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_resuming_an_older_checkpoint_warns_about_later_ones(tmp_path, cli_run):
    from ilql.cli import main

    assert main(cli_run) == 0
    with pytest.warns(UserWarning, match=r"resuming at step 2 .*later checkpoints \(steps 4\)"):
        assert main(cli_run + ["--resume", str(tmp_path / "ckpts" / "checkpoint_0000002")]) == 0
    records = [json.loads(line) for line in (tmp_path / "ckpts" / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "losses/loss" in r] == [1, 2, 3, 4]


@pytest.mark.parametrize("edit", ["drop_key", "bad_tensors", "escape"])
def test_a_tampered_checkpoint_raises_a_training_error(tmp_path, cli_run, edit):
    from ilql.cli import main

    assert main(cli_run) == 0
    latest = tmp_path / "ckpts" / "checkpoint_0000004"
    if edit == "drop_key":
        state = json.loads((latest / ckpt.STATE_JSON).read_text())
        del state["epoch"]
        (latest / ckpt.STATE_JSON).write_text(json.dumps(state))
    elif edit == "bad_tensors":
        (latest / ckpt.STATE_TENSORS).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    manifest = ckpt.build_manifest(latest, 4, "train")  # a consistent manifest: the contents are the problem
    if edit == "escape":
        manifest["files"]["../../outside"] = {"size": 1, "sha256": "0"}
    ckpt.write_json_atomic(latest / ckpt.MANIFEST, manifest)
    config = ilql.TRLConfig.load_yaml(tmp_path / "cfg.yaml")
    samples, rewards = ilql.data.load_jsonl(cli_run[4])
    expected = {"drop_key": "malformed.*epoch", "bad_tensors": "malformed", "escape": "outside the checkpoint"}[edit]
    with pytest.raises(ilql.TrainingError, match=f"cannot resume from .*{expected}"):
        ilql.train(model_path=cli_run[6], samples=samples, rewards=rewards, config=config,
                   resume_from_checkpoint=str(latest))
