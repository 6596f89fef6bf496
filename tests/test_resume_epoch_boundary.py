"""Resuming a checkpoint written right after an epoch's last batch (single process).

The loader's sampler draws from its generator once more when its iterator runs out, which
happens after the checkpoint of the epoch's last step; the resume must replay that draw."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import distributed_worker as worker  # noqa: E402


def test_resume_at_an_epoch_boundary_continues_the_same_run(tmp_path, saved_tokenizer):
    # 40 walks in batches of 8: 5 steps per epoch, a checkpoint at step 5
    train = dict(checkpoint_interval=5, eval_interval=1000)
    ref, _ = worker.make_trainer(saved_tokenizer, tmp_path, "none", train=dict(train, checkpoint_dir=str(tmp_path / "ref")))
    ref.metric_fn = None
    ref.learn()
    resumed, _ = worker.make_trainer(saved_tokenizer, tmp_path, "none", train=dict(train, checkpoint_dir=str(tmp_path / "res")))
    resumed.metric_fn = None
    resumed.load_checkpoint(tmp_path / "ref" / "checkpoint_0000005")
    resumed.learn()
    expected = [r["losses/loss"] for r in ref.history if "losses/loss" in r][5:]
    got = [r["losses/loss"] for r in resumed.history if "losses/loss" in r]
    assert len(got) == len(expected) == worker.STEPS - 5
    assert got == expected  # the same batches in the same order: bit for bit
