"""torch.distributed on CPU: 2 ranks over gloo, started here with torch.multiprocessing.

One module-scoped launch runs every 2-rank scenario of tests/distributed_worker.py (DDP,
FSDP2 and tensor-parallel heads, each through the trainer's own `learn()` or `train_step`);
the single-process references run in this process. Dropout is off, so every strategy must
reproduce the single-process losses up to float rounding.
"""

import importlib.util
import json
import os
import socket
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import distributed_worker as worker  # noqa: E402

from ilql import AutoModelForCausalLMWithILQLHeads, ConfigError, default_ilql_config  # noqa: E402
from ilql.parallel import Parallel, ShardedBatchSampler, shard_slice  # noqa: E402

TOL = 1e-5
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
HALF = worker.STEPS // 2
RESUME_AT = (5, 6)  # checkpoints of the FSDP learn() run: an epoch boundary, mid-epoch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tokenizer_path, tmp, jobs, world_size=2, timeout=300):
    """Run `jobs` on `world_size` ranks; a rank that fails fails the launch, and a hang (a
    collective some rank never joins) fails it after `timeout` seconds instead of blocking."""
    import time

    import torch.multiprocessing as mp

    args = (world_size, _free_port(), tokenizer_path, str(tmp), jobs)
    context = mp.start_processes(worker.main, args=args, nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world_size}-rank launch did not finish in {timeout} s (a hang?)")
    return {name: json.loads((tmp / f"{name}.json").read_text()) for name, _, _ in jobs}


def _losses(history):
    return [r["losses/loss"] for r in history if "losses/loss" in r]


def _evals(history):
    return [r for r in history if any(k.startswith("metrics/") for k in r)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from ilql.tasks.randomwalks import build_tokenizer

    tmp = tmp_path_factory.mktemp("distributed")
    tok = str(tmp / "tokenizer")
    build_tokenizer(21).save_pretrained(tok)
    out = {
        "ref": worker.scenario_learn(tok, tmp, "none"),  # checkpoints in ckpts_none
        "ref_llama": worker.scenario_learn(tok, tmp, "none", kind="llama", train=dict(checkpoint_dir=str(tmp / "ckpts_llama"))),
        "ref_bf16": worker.scenario_losses(tok, tmp, "none", train=dict(mixed_precision="bf16")),
        # a sharded checkpoint written by 1 rank, to be resumed by 2
        "one_rank": worker.scenario_save(tok, tmp, "none", path=str(tmp / "one_rank")),
    }
    jobs = [
        ["ddp", "learn", {"strategy": "ddp"}],
        # a sharded checkpoint after every step
        ["fsdp", "learn", {"strategy": "fsdp", "train": {"checkpoint_interval": 1, "keep_last_checkpoints": None}}],
        ["tp", "learn", {"strategy": "tp"}],  # GPT-2: tied embedding and LM head
        # Llama: trunk sharded by its tensor-parallel plan too, untied LM head
        ["tp_llama", "learn", {"strategy": "tp", "kind": "llama", "train": {"checkpoint_dir": str(tmp / "ckpts_tp_llama")}}],
        ["fsdp_llama_chunked_off", "losses", {"strategy": "fsdp", "kind": "llama", "method": {"chunk_size": None}}],
        ["from_one_rank", "resume", {"strategy": "fsdp", "path": str(tmp / "one_rank")}],
        ["fsdp_bf16", "losses", {"strategy": "fsdp", "train": {"mixed_precision": "bf16"}}],
        ["fsdp_recompute", "losses", {"strategy": "fsdp", "train": {"activation_checkpointing": True}}],
        ["ddp_accumulate", "losses", {"strategy": "ddp", "train": {"gradient_accumulation_steps": 2}}],
        ["fsdp_accumulate", "losses", {"strategy": "fsdp", "train": {"gradient_accumulation_steps": 3}}],
    ]
    if HAS_DEEPSPEED:  # the optional extra
        jobs.append(["zero3", "learn", {"strategy": "deepspeed"}])
    out.update(_launch(tok, tmp, jobs))
    # 2-rank FSDP checkpoints resumed by one process without any process group: at the end
    # of the first epoch (5 batches) and in the middle of the second
    for step in RESUME_AT:
        out[f"from_two_ranks_{step}"] = worker.scenario_learn(
            tok, tmp, "none", resume=str(tmp / "ckpts_fsdp" / f"checkpoint_{step:07d}"),
            train=dict(checkpoint_dir=str(tmp / f"ckpts_resumed_{step}")),
        )
    out["tmp"] = tmp
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "tp"])
def test_per_step_losses_equal_single_process(runs, strategy):
    ref, got = _losses(runs["ref"]["history"]), _losses(runs[strategy]["history"])
    assert len(ref) == len(got) == worker.STEPS >= 10
    assert max(abs(a - b) for a, b in zip(ref, got)) < TOL, (ref, got)
    assert ref[0] != pytest.approx(ref[-1], abs=1e-2)  # training moved: the check is not vacuous


def test_llama_tensor_parallel_trunk_and_fsdp_reference_loss_path(runs):
    ref = _losses(runs["ref_llama"]["history"])
    for name, got in (("tp_llama", _losses(runs["tp_llama"]["history"])), ("fsdp", runs["fsdp_llama_chunked_off"]["losses"])):
        assert len(got) == worker.STEPS
        assert max(abs(a - b) for a, b in zip(ref, got)) < TOL, (name, ref, got)
    # the trunk really was sharded (attention and MLP projections), and decoding through the
    # sharded trunk's KV cache gives the single-process evaluation
    sharded = runs["tp_llama"]["sharded_trunk_params"]
    assert "layers.0.self_attn.q_proj.weight" in sharded and "layers.1.mlp.down_proj.weight" in sharded
    assert "norm.weight" not in sharded
    ref_evals, tp_evals = _evals(runs["ref_llama"]["history"]), _evals(runs["tp_llama"]["history"])
    assert len(ref_evals) == len(tp_evals) == 2
    for a, b in zip(ref_evals, tp_evals):
        assert b == pytest.approx(a, abs=1e-4)


def test_fsdp_activation_checkpointing_and_bf16(runs):
    """Recomputing blocks changes nothing; bf16 parameters (FSDP's MixedPrecisionPolicy) stay
    within bf16 rounding of a single process autocasting to bf16."""
    ref = _losses(runs["ref"]["history"])
    recomputed = runs["fsdp_recompute"]["losses"]
    assert max(abs(a - b) for a, b in zip(ref, recomputed)) < TOL
    ref_bf16, got = runs["ref_bf16"]["losses"], runs["fsdp_bf16"]["losses"]
    assert len(got) == worker.STEPS
    assert max(abs(a - b) for a, b in zip(ref_bf16, got)) < 2e-2, (ref_bf16, got)
    assert max(abs(a - b) for a, b in zip(ref, got)) > 1e-6  # bf16 did take effect


@pytest.mark.parametrize("name", ["ddp_accumulate", "fsdp_accumulate"])
def test_gradient_accumulation_over_ranks(runs, name):
    """Chunks of a rank's batch, gradients reduced after the last: the single-process curve."""
    ref, got = _losses(runs["ref"]["history"]), runs[name]["losses"]
    assert len(got) == worker.STEPS
    assert max(abs(a - b) for a, b in zip(ref, got)) < TOL, (ref, got)


def test_gradient_accumulation_single_process(tmp_path, saved_tokenizer):
    """Uneven chunks (8 rows in 3) weighted by their actions give the whole batch's loss."""
    whole, _ = worker.make_trainer(saved_tokenizer, tmp_path, "none")
    chunked, _ = worker.make_trainer(saved_tokenizer, tmp_path, "none", train=dict(gradient_accumulation_steps=3))
    assert worker.run_steps(chunked, 3) == pytest.approx(worker.run_steps(whole, 3), abs=1e-6)


def test_activation_checkpointing_single_process(tmp_path, saved_tokenizer):
    plain, _ = worker.make_trainer(saved_tokenizer, tmp_path, "none")
    recompute, _ = worker.make_trainer(saved_tokenizer, tmp_path, "none", train=dict(activation_checkpointing=True))
    assert recompute.model.base_model.is_gradient_checkpointing and not plain.model.base_model.is_gradient_checkpointing
    assert worker.run_steps(recompute, 3) == pytest.approx(worker.run_steps(plain, 3), abs=1e-6)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "tp"])
def test_evaluation_split_over_ranks_and_gathered(runs, strategy):
    """Greedy decoding: each data-parallel rank decodes half of the prompts; the gathered
    metrics equal the single-process ones, and only rank 0 wrote the log."""
    ref, got = _evals(runs["ref"]["history"]), _evals(runs[strategy]["history"])
    assert [r["step"] for r in got] == [r["step"] for r in ref] == [HALF, worker.STEPS]
    for a, b in zip(ref, got):
        assert set(a) == set(b)
        for key in a:
            assert b[key] == pytest.approx(a[key], abs=1e-4), key
    lines = (runs["tmp"] / f"ckpts_{strategy}" / "stats.jsonl").read_text().splitlines()
    assert len(lines) == len(runs[strategy]["history"])  # one writer


@pytest.mark.parametrize("strategy", ["fsdp", "tp"])
def test_sharded_runs_save_full_hf_checkpoints(runs, strategy):
    """Rank 0 gathers the shards into an ordinary checkpoint that `from_pretrained` opens."""
    ref = AutoModelForCausalLMWithILQLHeads.from_pretrained(runs["tmp"] / "ckpts_none" / "checkpoint_0000010")
    got_dir = runs["tmp"] / f"ckpts_{strategy}" / "checkpoint_0000010"
    got = AutoModelForCausalLMWithILQLHeads.from_pretrained(got_dir)
    assert (got_dir / "sharded").is_dir()
    final = AutoModelForCausalLMWithILQLHeads.from_pretrained(runs["tmp"] / f"final_{strategy}_gpt2")
    for key, value in got.state_dict().items():  # save_pretrained after the last step: the same weights
        torch.testing.assert_close(final.state_dict()[key], value, msg=key)
    got_state = got.state_dict()
    # Adam turns float rounding in near-zero gradients into ~1e-5 weight differences
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(got_state[key], value, atol=1e-4, rtol=1e-4, msg=key)


@pytest.mark.parametrize("step", RESUME_AT)
def test_sharded_checkpoint_from_two_ranks_resumes_on_one(runs, step):
    ref = _losses(runs["ref"]["history"])[step:]
    got = _losses(runs[f"from_two_ranks_{step}"]["history"])
    assert len(got) == worker.STEPS - step
    assert max(abs(a - b) for a, b in zip(ref, got)) < TOL, (ref, got)


def test_sharded_checkpoint_from_one_rank_resumes_on_two(runs):
    ref = _losses(runs["ref"]["history"])
    assert runs["one_rank"]["losses"] == pytest.approx(ref[:HALF], abs=TOL)
    assert runs["from_one_rank"]["step"] == HALF
    got = runs["from_one_rank"]["losses"]
    assert len(got) == worker.STEPS - HALF
    assert max(abs(a - b) for a, b in zip(ref[HALF:], got)) < TOL, (ref, got)


# ------------------------------------------------------------------ without a process group
def test_sharded_batches_keep_the_seeded_order():
    batches = [list(range(0, 8)), list(range(8, 13)), [13]]  # 8, 5 and a 1-sample tail
    ranks = [list(ShardedBatchSampler(batches, r, 2)) for r in range(2)]
    assert ranks[0] == [[0, 1, 2, 3], [8, 9, 10]] and ranks[1] == [[4, 5, 6, 7], [11, 12]]
    assert [shard_slice(range(5), r, 3) for r in range(3)] == [[0, 1], [2, 3], [4]]


def test_strategy_config_is_validated():
    with pytest.raises(ConfigError, match="train.strategy"):
        default_ilql_config().evolve(train=dict(strategy="zero3"))
    with pytest.raises(ConfigError, match="train.cpu_offload"):
        default_ilql_config().evolve(train=dict(strategy="ddp", cpu_offload=True))
    with pytest.raises(ConfigError, match="train.gradient_accumulation_steps"):
        default_ilql_config().evolve(train=dict(gradient_accumulation_steps=0))


def test_cpu_offload_without_a_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = default_ilql_config().evolve(train=dict(strategy="fsdp", cpu_offload=True))
    with pytest.raises(ConfigError, match="cpu_offload"):
        Parallel.from_config(config)


def test_global_batch_smaller_than_the_ranks_is_refused():
    from torch.utils.data import DataLoader

    parallel = Parallel(strategy="ddp", rank=0, world_size=4)
    with pytest.raises(ConfigError, match="train.batch_size"):
        parallel.shard_loader(DataLoader(list(range(10)), batch_size=3))


def test_strategy_without_a_launcher_names_torchrun(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    config = default_ilql_config().evolve(train=dict(strategy="fsdp"))
    with pytest.raises(ConfigError, match="torchrun"):
        Parallel.from_config(config)


# ------------------------------------------------------- DeepSpeed ZeRO-3 (optional extra)
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="the deepspeed extra is not installed")
def test_deepspeed_zero3_matches_single_process(runs):
    """deepspeed.initialize (ZeRO-3, the trainer's AdamW, no clipping) with Polyak averaging
    on gathered partitions: the single-process losses, evaluation and final weights."""
    zero3 = runs["zero3"]
    ref, got = _losses(runs["ref"]["history"]), _losses(zero3["history"])
    assert len(got) == worker.STEPS
    assert max(abs(a - b) for a, b in zip(ref, got)) < 1e-4, (ref, got)
    for a, b in zip(_evals(runs["ref"]["history"]), _evals(zero3["history"])):
        assert b == pytest.approx(a, abs=1e-4)
    ref_model = AutoModelForCausalLMWithILQLHeads.from_pretrained(runs["tmp"] / "final_none_gpt2")
    got_model = AutoModelForCausalLMWithILQLHeads.from_pretrained(runs["tmp"] / "final_deepspeed_gpt2")
    got_state = got_model.state_dict()
    for key, value in ref_model.state_dict().items():
        torch.testing.assert_close(got_state[key], value, atol=1e-4, rtol=1e-4, msg=key)
