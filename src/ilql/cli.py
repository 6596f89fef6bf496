"""The `ilql` command: `ilql demo randomwalks`, `ilql train`, `ilql generate`."""

from __future__ import annotations

import argparse
import json
import resource
import sys
from typing import List, Optional


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def demo_randomwalks(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .tasks.randomwalks import run

    rows = []
    for seed in args.seeds:
        overrides = {"train.total_steps": args.steps} if args.steps else {}
        trainer, _ = run(seed=seed, output_dir=f"{args.output_dir}/seed{seed}", config_overrides=overrides)
        final = [r for r in trainer.history if any(k.startswith("metrics/") for k in r)][-1]
        optimality = {k.split("@")[1]: v for k, v in final.items() if k.startswith("metrics/optimality@")}
        step_times = [r["time/step"] for r in trainer.history if "time/step" in r]
        train_sec = sum(step_times) / max(1, len(step_times))
        rows.append((seed, optimality, train_sec, trainer.train_seconds / trainer.step))

    settings = list(rows[0][1])
    table = Table(title="randomwalks: mean optimality after training (1 = shortest paths)")
    table.add_column("seed")
    for s in settings:
        table.add_column(s, justify="right")
    table.add_column("s/step (train)", justify="right")
    table.add_column("s/step (wall, incl. eval)", justify="right")
    for seed, optimality, train_sec, wall_sec in rows:
        table.add_row(str(seed), *[f"{optimality[s]:.3f}" for s in settings], f"{train_sec:.3f}", f"{wall_sec:.3f}")
    means = {s: sum(r[1][s] for r in rows) / len(rows) for s in settings}
    table.add_row("mean", *[f"{means[s]:.3f}" for s in settings], "", "")
    console = Console()
    console.print(table)
    console.print(f"peak RSS: {_peak_rss_mib():.0f} MiB")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            per_seed = [dict(seed=s, optimality=o, sec_per_train_step=t, sec_per_step_wall=w) for s, o, t, w in rows]
            json.dump({"per_seed": per_seed,
                       "mean": means, "peak_rss_mib": _peak_rss_mib()}, f, indent=2)
    return 0


def demo_sentiment(args) -> int:
    import numpy as np
    from rich.console import Console
    from rich.table import Table

    from .tasks.sentiment import run

    rows = []
    for seed in args.seeds:
        trainer, task = run(seed=seed, output_dir=f"{args.output_dir}/seed{seed}", steps=args.steps or 600)
        final = [r for r in trainer.history if any(k.startswith("metrics/") for k in r)][-1]
        scores = {k.split("@")[1]: v for k, v in final.items() if k.startswith("metrics/vader@")}
        rows.append((seed, float(np.mean(task.rewards)), scores, trainer.train_seconds))

    settings = list(rows[0][2])
    table = Table(title="sentiment: mean VADER compound score of guided reviews (dataset: mean reward)")
    for column in ("seed", "dataset", *settings, "train s"):
        table.add_column(column, justify="right")
    for seed, dataset_mean, scores, sec in rows:
        table.add_row(str(seed), f"{dataset_mean:+.3f}", *[f"{scores[s]:+.3f}" for s in settings], f"{sec:.0f}")
    means = {s: sum(r[2][s] for r in rows) / len(rows) for s in settings}
    dataset_mean = sum(r[1] for r in rows) / len(rows)
    if len(rows) > 1:
        table.add_row("mean", f"{dataset_mean:+.3f}", *[f"{means[s]:+.3f}" for s in settings], "")
    console = Console()
    console.print(table)
    console.print(f"peak RSS: {_peak_rss_mib():.0f} MiB")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"per_seed": [dict(seed=s, dataset_mean_reward=d, vader=v, train_seconds=t) for s, d, v, t in rows],
                       "mean": means, "dataset_mean_reward": dataset_mean, "peak_rss_mib": _peak_rss_mib()}, f, indent=2)
    return 0


DEMOS = {  # task: (function, default seeds, default output directory)
    "randomwalks": (demo_randomwalks, [1000, 1002, 1004], "runs/randomwalks"),
    "sentiment": (demo_sentiment, [1000], "runs/sentiment"),
}


def demo_command(args) -> int:
    func, seeds, output_dir = DEMOS[args.task]
    args.seeds = args.seeds or seeds
    args.output_dir = args.output_dir or output_dir
    return func(args)


def parse_columns(items: Optional[List[str]]):
    """--columns text=review reward=score -> {"text": "review", "reward": "score"}."""
    if not items:
        return None
    columns = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise SystemExit(f"--columns expects NAME=COLUMN (e.g. text=review), got {item!r}")
        columns[key] = value
    return columns


def train_command(args) -> int:
    from .config import TRLConfig, default_ilql_config
    from .trainer import train

    config = TRLConfig.load_yaml(args.config) if args.config else default_ilql_config()
    if args.set:
        overrides = {}
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep:
                raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
            import yaml

            overrides[key] = yaml.safe_load(value)
        config = TRLConfig.update(config, overrides)
    trainer = train(
        model_path=args.model, dataset=args.data, columns=parse_columns(args.columns), config=config,
        resume_from_checkpoint=args.resume,
    )
    if args.output_dir:
        trainer.save_pretrained(args.output_dir)
    return 0


def generate_command(args) -> int:
    import torch
    from transformers import AutoTokenizer

    from .generation import check_gen_kwargs
    from .modeling import AutoModelForCausalLMWithILQLHeads
    from .trainer import trim_at_stop

    gen_kwargs = dict(
        beta=args.beta, max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, advantage_clip=args.advantage_clip,
        weighting=args.weighting, filter_on=args.filter_on, num_beams=args.num_beams, best_of=args.best_of,
        rank_by=args.rank_by, rank_weight=args.rank_weight, stop_sequences=args.stop,
        sample_over=args.sample_over, heads_dtype=args.heads_dtype,
    )
    check_gen_kwargs(gen_kwargs, prefix="ilql generate")  # bad flags fail before the model loads
    model = AutoModelForCausalLMWithILQLHeads.from_pretrained(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    generator = torch.Generator().manual_seed(args.seed)
    for prompt in args.prompt:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        if ids.shape[1] == 0:
            start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            ids = torch.tensor([[start]])
        out = model.generate(
            ids, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tokenizer=tokenizer,
            generator=generator, return_dict=True, **gen_kwargs,
        )
        text = tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)
        print(prompt + trim_at_stop(text, args.stop))
        if args.stats:
            print(f"  advantage={out.advantage[0]:.4f}  behaviour_logprob={out.behaviour_logprob[0]:.4f}  "
                  f"kl={out.kl[0]:.4f}  new_tokens={int(out.num_new_tokens[0])}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ilql", description="Offline RL fine-tuning of causal LMs with ILQL.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run a built-in task end to end")
    demo.add_argument("task", choices=list(DEMOS), help="the built-in task")
    demo.add_argument("--seeds", type=int, nargs="+", default=None,
                      help="one run per seed (default: randomwalks 1000 1002 1004, sentiment 1000)")
    demo.add_argument("--steps", type=int, default=None,
                      help="optimizer steps (default: the task's, randomwalks 200, sentiment 600)")
    demo.add_argument("--output-dir", default=None, help="checkpoints and logs go here (default: runs/TASK)")
    demo.add_argument("--json", default=None, help="also write the results to this JSON file")
    demo.set_defaults(func=demo_command)

    tr = sub.add_parser("train", help="train on a JSONL, CSV or Parquet file of samples and rewards")
    tr.add_argument("--config", help="a YAML config (sections method/model/optimizer/scheduler/tokenizer/train)")
    tr.add_argument("--data", required=True, help=".jsonl, .csv or .parquet: one sample per row with 'reward' "
                    "(a number, or a list with one per output segment) or 'token_rewards', and 'text', "
                    "'prompt'+'completion', 'messages' (a chat), 'dialogue' (a list of strings), or "
                    "'prompt'+'chosen'+'rejected' (a preference pair: +1/-1)")
    tr.add_argument("--columns", nargs="*", metavar="NAME=COLUMN",
                    help="the file's column names where they differ, e.g. text=review reward=score")
    tr.add_argument("--model", default=None, help="local model directory (default: model.model_path)")
    tr.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. method.tau=0.8")
    tr.add_argument("--output-dir", default=None, help="save the final model and tokenizer here")
    tr.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                    help="resume from CHECKPOINT (a checkpoint directory), or without a value from the newest "
                    "complete checkpoint under train.checkpoint_dir (a fresh start if there is none)")
    tr.set_defaults(func=train_command)

    gen = sub.add_parser("generate", help="guided generation from a saved model")
    gen.add_argument("--model", required=True, help="a directory written by ilql (model + tokenizer)")
    gen.add_argument("--prompt", nargs="+", required=True)
    gen.add_argument("--beta", type=float, default=1.0, help="weight of the advantage (0 = the plain LM)")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--min-new-tokens", type=int, default=0, help="no EOS before this many tokens")
    gen.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=20, help="0 = off")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    gen.add_argument("--filter-on", choices=["guided", "behaviour"], default="guided",
                     help="apply top-k/top-p after adding the advantage (trlx) or on the behaviour policy (ILQL)")
    gen.add_argument("--weighting", choices=["exp", "sign"], default="exp",
                     help="guidance beta*A (exp) or beta*sign(A) (sign)")
    gen.add_argument("--advantage-clip", type=float, default=None, help="clip A to [-c, c]")
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--stop", nargs="+", default=None, metavar="STRING", help="stop strings (trimmed from outputs)")
    gen.add_argument("--num-beams", type=int, default=1, help="beam search over the guided scores")
    gen.add_argument("--best-of", type=int, default=1, help="draw N samples, keep the best by --rank-by")
    gen.add_argument("--rank-by", choices=["advantage", "logprob", "mix"], default="advantage")
    gen.add_argument("--rank-weight", type=float, default=1.0, help="mix: advantage + w * logprob")
    gen.add_argument("--sample-over", choices=["vocab", "candidates"], default="vocab",
                     help="candidates: draw among the top-k survivors (faster, same distribution)")
    gen.add_argument("--heads-dtype", choices=["float32", "bfloat16", "float16"], default=None,
                     help="run the V / target Q heads on a copy in this dtype (faster, approximate)")
    gen.add_argument("--stats", action="store_true", help="print summed advantage, behaviour log-prob and KL")
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=generate_command)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import ILQLError

    try:
        return args.func(args)
    except ILQLError as e:
        print(f"ilql: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
