"""The training loop and `train(...)`, the entry point trlx users know.

Flow: validate everything -> episodes -> batches -> model -> `ilql_loss` -> optimizer, with
the target Q heads Polyak-averaged every `steps_for_target_q_sync` optimizer steps, guided
generation + `metric_fn` every `eval_interval` steps (one run per value of any list in
`gen_kwargs`), checkpoints every `checkpoint_interval` steps, the best one kept apart.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PretrainedConfig

from .config import TRLConfig, default_ilql_config
from .data import Episode, build_loader, make_episodes, validate_prompts
from . import checkpoint as ckpt
from .errors import ConfigError, DataError, DataTypeError, ILQLError, TrainingError
from .loss import ilql_loss, ilql_loss_chunked
from .generation import swept_values
from .modeling import AutoModelForCausalLMWithILQLHeads
from .parallel import SHARDED_DIR, Parallel, load_trainer_checkpoint, save_trainer_checkpoint

MetricFn = Callable[..., Dict[str, Any]]


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_tokenizer(config: TRLConfig):
    tok_config = config.tokenizer
    tokenizer = AutoTokenizer.from_pretrained(tok_config.tokenizer_path, **tok_config.tokenizer_extra_configs)
    # neither side is saved with a tokenizer: set both at load
    tokenizer.padding_side = tok_config.padding_side
    tokenizer.truncation_side = tok_config.truncation_side
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"the tokenizer at {tok_config.tokenizer_path} has no eos_token; ILQL ends every output with it")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_path: Union[str, PretrainedConfig], config: TRLConfig) -> AutoModelForCausalLMWithILQLHeads:
    method = config.method
    if isinstance(model_path, PretrainedConfig):
        model = AutoModelForCausalLMWithILQLHeads.from_config(model_path, two_qs=method.two_qs, alpha=method.alpha)
    else:
        model = AutoModelForCausalLMWithILQLHeads.from_pretrained(
            model_path, two_qs=method.two_qs, alpha=method.alpha, **config.model.model_extra_configs
        )
    model.freeze_bottom_layers(config.model.num_layers_unfrozen)
    return model


def build_optimizer(params, config: TRLConfig) -> torch.optim.Optimizer:
    kwargs = dict(config.optimizer.kwargs)
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    classes = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
    try:
        return classes[config.optimizer.name](params, **kwargs)
    except TypeError as e:
        raise ConfigError(f"optimizer.kwargs do not fit {config.optimizer.name}: {e}") from None


def build_scheduler(optimizer, config: TRLConfig, total_steps: int):
    name, kwargs = config.scheduler.name, dict(config.scheduler.kwargs)
    try:
        if name == "cosine_annealing":
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, **kwargs)
        if name == "linear":
            end = kwargs.pop("end_factor", 0.0)
            return torch.optim.lr_scheduler.LinearLR(
                optimizer, start_factor=1.0, end_factor=end, total_iters=kwargs.pop("total_iters", total_steps)
            )
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    except TypeError as e:
        raise ConfigError(f"scheduler.kwargs do not fit {name}: {e}") from None


def gen_kwargs_sweep(gen_kwargs: Dict[str, Any]) -> List[Tuple[str, Dict[str, Any]]]:
    """One (suffix, kwargs) per combination of the list-valued entries, e.g.
    ``beta=[0, 1]`` -> [("beta=0", {..., beta: 0}), ("beta=1", {..., beta: 1})]."""
    swept = {k: swept_values(k, v) for k, v in gen_kwargs.items() if swept_values(k, v) is not None}
    fixed = {k: v for k, v in gen_kwargs.items() if k not in swept}
    runs = []
    for values in itertools.product(*swept.values()):
        chosen = dict(zip(swept, values))
        suffix = ",".join(f"{k}={v}" for k, v in chosen.items())
        runs.append((suffix, {**fixed, **chosen}))
    return runs


def trim_at_stop(text: str, stop_sequences: Optional[Sequence[str]]) -> str:
    cut = len(text)
    for stop in stop_sequences or ():
        at = text.find(stop)
        if stop and at != -1:
            cut = min(cut, at)
    return text[:cut]


def _mean(values: Any, name: str) -> float:
    array = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    if array.size == 0:
        raise DataError(f"metric_fn returned no values for {name!r}")
    return float(array.mean())


def training_autocast(device: torch.device, mixed_precision: str):
    """bf16 autocast for train.mixed_precision="bf16" (the losses compute in float32 anyway)."""
    if mixed_precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.mixed_precision='bf16' but this GPU does not support bfloat16; use 'no'")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed_precision == "bf16")


class ILQLTrainer:
    """Runs ILQL on prepared episodes. Built by `train(...)`; `learn()` runs the loop."""

    def __init__(
        self,
        config: TRLConfig,
        model: AutoModelForCausalLMWithILQLHeads,
        tokenizer,
        episodes: List[Episode],
        eval_prompts: Sequence[str] = (),
        metric_fn: Optional[MetricFn] = None,
        stop_sequences: Optional[Sequence[str]] = None,
        logit_mask: Optional[torch.Tensor] = None,
    ):
        self.config = config
        self.tokenizer = tokenizer
        # torch.distributed (train.strategy): device, model wrapping, data shards, rank 0 writes
        self.parallel = Parallel.from_config(config)
        self.device = self.parallel.device
        self.model = self.parallel.wrap(model)
        self.eval_prompts = list(eval_prompts)
        self.metric_fn = metric_fn
        self.stop_sequences = list(stop_sequences or [])
        self.logit_mask = None if logit_mask is None else logit_mask.to(self.device)
        self.generator = torch.Generator().manual_seed(config.train.seed)
        self.loader = build_loader(
            episodes, config.train.batch_size, tokenizer.pad_token_id, self.generator, config.train.group_by_length
        )
        self.loader = self.parallel.shard_loader(self.loader)
        self.total_steps = min(config.train.epochs * len(self.loader), config.train.total_steps)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(params, config)
        self.scheduler = build_scheduler(self.optimizer, config, self.total_steps)
        self.model, self.optimizer = self.parallel.attach_optimizer(self.model, self.optimizer)  # deepspeed
        self.step = 0
        self.best_score = -math.inf
        # the data order position, checkpointed so that a resume replays no batch twice
        self.epoch, self.batch_in_epoch = 0, 0
        self._epoch_start_rng = self.generator.get_state()
        self.nonfinite_in_a_row, self.nonfinite_total = 0, 0
        self.data_fingerprint = ckpt.dataset_fingerprint(episodes)
        self.num_episodes = len(episodes)
        self.checkpoint_dir = Path(config.train.checkpoint_dir)
        self.log_path = Path(config.train.logging_dir or config.train.checkpoint_dir) / "stats.jsonl"
        self.history: List[Dict[str, Any]] = []

    # ------------------------------------------------------------------------------ training
    def loss(self, batch) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The ILQL loss of a batch: chunked (bounded memory) unless method.chunk_size is None,
        under bf16 autocast with train.mixed_precision="bf16", through a compiled trunk with
        train.compile. Both paths give the same gradients (tests/test_chunked_loss.py)."""
        m, train = self.config.method, self.config.train
        if train.compile:
            self.model.compile_trunk()
        hparams = dict(
            actions=batch.actions, rewards=batch.rewards, dones=batch.dones,
            tau=m.tau, gamma=m.gamma, cql_scale=m.cql_scale, awac_scale=m.awac_scale, beta=m.beta,
        )
        with training_autocast(self.device, train.mixed_precision):
            if m.chunk_size is not None and self.parallel.chunked_loss:
                inputs = self.model.loss_inputs(
                    batch.input_ids, batch.attention_mask, batch.actions_ixs, batch.states_ixs, batch.actions
                )
                return ilql_loss_chunked(inputs=inputs, chunk_size=m.chunk_size, **hparams)
            out = self.model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                actions_ixs=batch.actions_ixs,
                states_ixs=batch.states_ixs,
                actions=batch.actions,
            )
            out, hparams["actions"] = self.parallel.vocab_reduce(out, batch.actions)  # "tp" only
            return ilql_loss(logits=out.logits, qs=out.qs, target_qs=out.target_qs, vs=out.vs, **hparams)

    def train_step(self, batch) -> Dict[str, float]:
        self.model.train()  # dropout on for every step, whatever evaluation did before
        self.optimizer.zero_grad(set_to_none=True)
        # forward + backward in train.gradient_accumulation_steps chunks; means over the global batch
        loss, stats = self.parallel.forward_backward(
            self.loss, batch.to(self.device), self.model, self.config.train.gradient_accumulation_steps
        )
        if self._skip_nonfinite(loss, stats):
            return {"nonfinite/skipped": float(self.nonfinite_total)}
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        if self.step % self.config.method.steps_for_target_q_sync == 0:
            self.model.sync_target_q_heads()
        if self.step % self.config.train.log_interval and self.step < self.total_steps:
            return {}  # no host sync between logging steps
        return {k: v.item() for k, v in stats.items()}

    def _skip_nonfinite(self, loss: torch.Tensor, stats: Dict[str, torch.Tensor]) -> bool:
        """True when this step's loss or gradients are not finite: the gradients are dropped,
        the optimizer and scheduler do not step, and the skip is counted; after
        `train.max_nonfinite_steps` in a row training stops with a `TrainingError`.

        The common (finite) case costs fused norms and one host sync."""
        grads = self.parallel.local_grads(self.model)  # sharded (fsdp / tp): this rank's shards
        flags = [torch.isfinite(loss.detach()).all()]
        if grads:
            flags.append(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())
        if self.parallel.on_all_ranks(torch.stack(flags).all()):
            self.nonfinite_in_a_row = 0
            return False
        bad_terms = [k for k, v in stats.items() if k.startswith("losses/") and not bool(torch.isfinite(v).all())]
        if not bad_terms and not bool(torch.isfinite(loss.detach()).all()):
            bad_terms = ["losses/loss"]
        named = [n for n, p in self.model.named_parameters() if p.grad is not None]  # the order of `grads`
        bad_grads = [n for n, g in zip(named, grads) if not bool(g.isfinite().all())]
        if self.parallel.on_all_ranks(torch.tensor(not bad_terms and not bad_grads)):
            self.nonfinite_in_a_row = 0  # only a norm overflowed: every value is finite
            return False
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        if bad_terms:
            what = "non-finite loss terms: " + ", ".join(f"{k}={stats[k].item() if k in stats else loss.item()}" for k in bad_terms)
        else:
            what = f"non-finite gradients in {', '.join(bad_grads[:5])}" + (" ..." if len(bad_grads) > 5 else "")
        limit = self.config.train.max_nonfinite_steps
        if self.nonfinite_in_a_row >= limit:
            raise TrainingError(
                f"step {self.step + 1}: {what}; {self.nonfinite_in_a_row} non-finite steps in a row reached "
                f"train.max_nonfinite_steps={limit}, stopping (check the learning rate, rewards and data)"
            )
        warnings.warn(f"step {self.step + 1} skipped: {what} ({self.nonfinite_in_a_row} in a row, limit {limit})")
        return True

    def _epoch_batches(self):
        """The batches of the current epoch. After a resume mid-epoch the loader generator holds
        the epoch's starting state again, so the same order is drawn and the batches the
        checkpoint had consumed are skipped."""
        skip = self.batch_in_epoch
        if skip == 0:
            self._epoch_start_rng = self.generator.get_state()
        for index, batch in enumerate(self.loader):
            if index < skip:
                continue
            self.batch_in_epoch = index + 1
            yield batch
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def learn(self) -> "ILQLTrainer":
        train = self.config.train
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        bar = tqdm(
            total=self.total_steps, initial=self.step, desc="ilql",
            disable=None if train.progress_bar and self.parallel.is_main else True,  # one bar: rank 0's
            dynamic_ncols=True,
        )
        start = time.perf_counter()
        while self.step < self.total_steps:
            for batch in self._epoch_batches():
                t0 = time.perf_counter()
                stats = self.train_step(batch)
                if "nonfinite/skipped" in stats:
                    self._log({"step": self.step, **stats})
                    continue
                bar.update(1)
                if stats:  # train_step returns statistics every train.log_interval steps
                    stats.update(step=self.step, lr=self.scheduler.get_last_lr()[0], **{"time/step": time.perf_counter() - t0})
                    self._log(stats)
                    bar.set_postfix(loss=f"{stats['losses/loss']:.4f}")
                last = self.step >= self.total_steps
                if self.step % train.eval_interval == 0 or last:
                    self.evaluate()
                if self.step % train.checkpoint_interval == 0 or last:
                    self.save_checkpoint(self.checkpoint_dir / f"checkpoint_{self.step:07d}")
                ckpt.fault_point("after_step", self.step)
                if last:
                    break
        bar.close()
        self.train_seconds = time.perf_counter() - start
        return self

    def _log(self, record: Dict[str, Any]) -> None:
        self.history.append(record)
        if not self.parallel.is_main:
            return
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    # ---------------------------------------------------------------------------- evaluation
    def generate_texts(self, prompts: Sequence[str], return_kl: bool = False, **gen_kwargs):
        """Guided generation for a list of prompts; returns the decoded outputs, trimmed at
        the first stop sequence (the trainer's and any in `gen_kwargs`), and with
        ``return_kl=True`` also each sample's estimated KL to the behaviour policy."""
        batch_size = self.config.train.eval_batch_size or self.config.train.batch_size
        bos = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
        stops = list(dict.fromkeys(self.stop_sequences + list(gen_kwargs.pop("stop_sequences", None) or [])))
        call = dict(
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            logit_mask=self.logit_mask,
            stop_sequences=stops or None,
            tokenizer=self.tokenizer,
        )
        call.update(gen_kwargs, return_dict=True)
        outputs, kls = [], []
        for i in range(0, len(prompts), batch_size):
            encoded = [self.tokenizer(p, add_special_tokens=False).input_ids or [bos] for p in prompts[i : i + batch_size]]
            width = max(map(len, encoded))
            ids = torch.full((len(encoded), width), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, tokens in enumerate(encoded):  # left padding
                ids[row, width - len(tokens) :] = torch.tensor(tokens)
                mask[row, width - len(tokens) :] = 1
            out = self.model.generate(
                ids.to(self.device), attention_mask=mask.to(self.device), generator=self._eval_generator(), **call
            )
            texts = self.tokenizer.batch_decode(out.sequences[:, width:], skip_special_tokens=True)
            outputs.extend(trim_at_stop(t, stops) for t in texts)
            kls.extend(out.kl.tolist())
        return (outputs, kls) if return_kl else outputs

    def _eval_generator(self) -> torch.Generator:
        # its own stream, so that evaluation never moves the training RNG
        if not hasattr(self, "_eval_rng") or self._eval_rng[0] != self.step:
            gen = torch.Generator(device=self.device).manual_seed(self.config.train.seed + 7919 * self.step)
            self._eval_rng = (self.step, gen)
        return self._eval_rng[1]

    def evaluate(self) -> Dict[str, float]:
        if not self.eval_prompts or self.metric_fn is None:
            return {}
        results: Dict[str, float] = {}
        examples = []
        score = -math.inf
        for suffix, kwargs in gen_kwargs_sweep(self.config.method.gen_kwargs):
            with self.parallel.generation_context(self.model):  # each data-parallel rank decodes its share
                texts, kls = self.generate_texts(self.parallel.split(self.eval_prompts), return_kl=True, **kwargs)
                outputs, kls = self.parallel.gather(texts), self.parallel.gather(kls)
            samples = [p + o for p, o in zip(self.eval_prompts, outputs)]
            metrics = self.metric_fn(samples=samples, prompts=list(self.eval_prompts), outputs=outputs)
            if not isinstance(metrics, dict) or not metrics:
                raise DataTypeError(f"metric_fn must return a non-empty dict of lists, got {type(metrics).__name__}")
            tag = f"@{suffix}" if suffix else ""
            for name, values in metrics.items():
                results[f"metrics/{name}{tag}"] = _mean(values, name)
            # the price of the metric: estimated KL(guided || behaviour policy) per sample
            results[f"eval/kl{tag}"] = _mean(kls, "kl")
            best_name = self.config.train.best_metric or next(iter(metrics))
            if best_name in metrics:
                score = max(score, _mean(metrics[best_name], best_name))
            first = next(iter(metrics))
            for p, o, v in list(zip(self.eval_prompts, outputs, metrics[first]))[:3]:
                examples.append((suffix, p, o, f"{float(v):.3f}"))
        self._log({"step": self.step, **results})
        self._print_eval(results, examples, first)
        if self.config.train.save_best and score > self.best_score:
            self.best_score = score
            self.save_checkpoint(self.checkpoint_dir / "best_checkpoint")
        return results

    def _print_eval(self, results, examples, metric_name) -> None:
        if not self.parallel.is_main:
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"evaluation at step {self.step}")
        for column in ("setting", "prompt", "output", metric_name):
            table.add_column(column, overflow="fold")
        for row in examples:
            table.add_row(*[r[:80] for r in row])
        console = Console()
        console.print(table)
        # reward/KL trade-off: one row per gen_kwargs setting
        trade = Table(title="metric vs KL to the behaviour policy")
        for column in ("setting", metric_name, "KL"):
            trade.add_column(column, justify="right")
        for key, kl in results.items():
            if key.startswith("eval/kl"):
                tag = key[len("eval/kl"):]
                value = results.get(f"metrics/{metric_name}{tag}", float("nan"))
                trade.add_row(tag.lstrip("@") or "-", f"{value:.4f}", f"{kl:.4f}")
        console.print(trade)
        console.print("  ".join(f"{k}={v:.4f}" for k, v in results.items()))

    # ---------------------------------------------------------------------------- checkpoints
    def save_pretrained(self, directory: Union[str, os.PathLike]) -> None:
        """Model, heads and tokenizer in `directory`, openable with `from_pretrained`."""
        full = self.parallel.full_state_dict(self.model)  # fsdp / tp: gathered on rank 0 (collective)
        if not self.parallel.is_main:
            return
        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            self._write_checkpoint(tmp, state_dict=full)
            from .modeling import publish_directory

            publish_directory(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def save_checkpoint(self, directory: Union[str, os.PathLike]) -> Path:
        """A resumable training checkpoint: model, heads, tokenizer, config, optimizer,
        scheduler, counters, data position and RNG states. Written to a temporary directory,
        manifest last, then renamed into place (see `ilql.checkpoint`); afterwards only the
        newest `train.keep_last_checkpoints` step checkpoints are kept (the best one apart)."""
        directory = Path(directory)
        if self.parallel.gathers_weights:  # sharded weights: every rank takes part
            save_trainer_checkpoint(self, directory)
            return directory
        if not self.parallel.is_main:
            return directory
        kind = "best" if directory.name == ckpt.BEST_NAME else "train"
        ckpt.write_checkpoint_dir(directory, self._write_training_checkpoint, self.step, kind)
        if kind == "train" and directory.parent.resolve() == self.checkpoint_dir.resolve():
            ckpt.prune_checkpoints(self.checkpoint_dir, self.config.train.keep_last_checkpoints)
        return directory

    def _write_training_checkpoint(self, directory: Path) -> None:
        self._write_checkpoint(directory)
        state, tensors = self.training_state()
        ckpt.save_tensors(directory / ckpt.STATE_TENSORS, tensors)
        ckpt.write_json_atomic(directory / ckpt.STATE_JSON, state)

    def training_state(self) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
        """Everything besides the weights that an exact resume needs, as (JSON, tensors)."""
        # even when the epoch is used up: its sampler still draws from the generator when its
        # iterator runs out (after the last batch), so the next epoch's state does not exist
        # yet; the resume replays and skips the finished epoch, which makes that draw
        epoch, batch, loader_rng = self.epoch, self.batch_in_epoch, self._epoch_start_rng
        optim_json, tensors = ckpt.split_optimizer_state(self.optimizer.state_dict())
        rng_json, rng_tensors = ckpt.capture_rng_state()
        tensors.update(rng_tensors)
        tensors["rng/loader_epoch_start"] = loader_rng
        eval_step = None
        if hasattr(self, "_eval_rng"):
            eval_step = self._eval_rng[0]
            tensors["rng/eval"] = self._eval_rng[1].get_state()
        state = {
            "format": ckpt.FORMAT_VERSION,
            "step": self.step,
            "epoch": epoch,
            "batch_in_epoch": batch,
            "best_score": self.best_score if math.isfinite(self.best_score) else None,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "nonfinite_total": self.nonfinite_total,
            "eval_rng_step": eval_step,
            "num_episodes": self.num_episodes,
            "data_fingerprint": self.data_fingerprint,
            "batch_size": self.config.train.batch_size,
            "rng": rng_json,
            "optimizer": optim_json,
            "scheduler": self.scheduler.state_dict(),
        }
        try:
            json.dumps(state, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise TrainingError(f"the training state cannot be written as JSON ({e}); check scheduler.kwargs") from None
        return state, tensors

    def load_checkpoint(self, directory: Union[str, os.PathLike]) -> None:
        """Restore a checkpoint written by `save_checkpoint`, so that `learn()` continues
        exactly where it stopped. The checkpoint is verified against its manifest first."""
        directory = Path(directory)
        if (directory / SHARDED_DIR).is_dir():  # written under fsdp / tp, on any number of ranks
            return load_trainer_checkpoint(self, directory)
        if self.parallel.gathers_weights:
            raise TrainingError(
                f"cannot resume from {directory} with train.strategy={self.parallel.strategy!r}: it has no "
                f"'{SHARDED_DIR}' state (a 'none' or 'ddp' run wrote it); resume it with one of those strategies"
            )
        problem = ckpt.verify_checkpoint(directory)
        if problem is not None:
            raise TrainingError(f"cannot resume from {directory}: {problem}")
        if not (directory / ckpt.STATE_JSON).is_file() or not (directory / ckpt.STATE_TENSORS).is_file():
            raise TrainingError(f"cannot resume from {directory}: it holds a model but no training state")
        try:
            self._restore(directory)
        except ILQLError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError, SafetensorError) as e:  # edited files
            raise TrainingError(f"cannot resume from {directory}: its training state is malformed ({e!r})") from e
        self._truncate_log()

    def _restore(self, directory: Path) -> None:
        state = json.loads((directory / ckpt.STATE_JSON).read_text(encoding="utf-8"))
        self._check_resumable(directory, state)
        tensors = ckpt.load_tensors(directory / ckpt.STATE_TENSORS)
        self._load_weights(directory)
        self.optimizer.load_state_dict(ckpt.join_optimizer_state(state["optimizer"], tensors, self.optimizer.state_dict()))
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.best_score = -math.inf if state["best_score"] is None else state["best_score"]
        self.nonfinite_in_a_row, self.nonfinite_total = state["nonfinite_in_a_row"], state["nonfinite_total"]
        self._epoch_start_rng = tensors["rng/loader_epoch_start"]
        self.generator.set_state(self._epoch_start_rng)
        if state.get("eval_rng_step") is not None and "rng/eval" in tensors:
            gen = torch.Generator(device=self.device)
            gen.set_state(tensors["rng/eval"])
            self._eval_rng = (state["eval_rng_step"], gen)
        ckpt.restore_rng_state(state["rng"], tensors)

    def _check_resumable(self, directory: Path, state: Dict[str, Any]) -> None:
        if state.get("format") != ckpt.FORMAT_VERSION:
            raise TrainingError(f"cannot resume from {directory}: unknown checkpoint format {state.get('format')!r}")
        if state["batch_size"] != self.config.train.batch_size:
            raise ConfigError(
                f"train.batch_size is {self.config.train.batch_size} but {directory} was trained with "
                f"{state['batch_size']}; resume with the same batch size"
            )
        if state["num_episodes"] != self.num_episodes or state["data_fingerprint"] != self.data_fingerprint:
            raise DataError(
                f"the data differ from the data {directory} was trained on ({self.num_episodes} vs "
                f"{state['num_episodes']} samples, or other contents/tokenizer/seq_length); resume with the same data"
            )

    def _load_weights(self, directory: Path) -> None:
        """Model and heads from the checkpoint's safetensors files, bit for bit."""
        from safetensors.torch import load_file

        base = self.model.base_model
        state: Dict[str, torch.Tensor] = {}
        for path in sorted(directory.glob("model*.safetensors")):
            state.update(load_file(str(path), device=str(self.device)))
        live = base.state_dict()
        loaded = {live[k].data_ptr() for k in state if k in live}
        result = base.load_state_dict(state, strict=False) if state else None
        # a tied weight (e.g. the LM head) is not saved; any other gap means another layout
        if result is None or result.unexpected_keys or any(live[k].data_ptr() not in loaded for k in result.missing_keys):
            from transformers import AutoModelForCausalLM

            reference = AutoModelForCausalLM.from_pretrained(
                str(directory), trust_remote_code=False, use_safetensors=True  # never unpickle
            )
            base.load_state_dict(reference.state_dict())
        heads = load_file(str(directory / "ilql_heads.safetensors"), device=str(self.device))
        self.model.ilql_heads.load_state_dict(heads, strict=True)

    def _truncate_log(self) -> None:
        """Drop the log lines of steps after the checkpoint (they will be run again) and reload
        the kept ones into `history`, so the log reads as if the run had never stopped."""
        if not self.log_path.is_file():
            return
        kept = []
        for line in self.log_path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by the crash
            if isinstance(record, dict) and record.get("step", 0) <= self.step:
                kept.append(record)
        tmp = self.log_path.with_name(f".{self.log_path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.log_path)
        self.history = kept

    def resolve_resume(self, resume_from_checkpoint: Union[str, os.PathLike]) -> Optional[Path]:
        """The checkpoint to resume from: ``"latest"`` (or a directory of checkpoints) means the
        newest complete one under it, skipping and reporting partial ones; None if there is none."""
        latest = str(resume_from_checkpoint) == "latest"
        root = self.checkpoint_dir if latest else Path(resume_from_checkpoint)
        ckpt.recover_replaced(self.checkpoint_dir)
        if not latest and not ckpt.list_checkpoints(root):
            return root  # a checkpoint itself; `load_checkpoint` verifies it
        found = ckpt.find_latest_checkpoint(root)
        if found is None and not latest:
            raise TrainingError(f"cannot resume: no complete checkpoint under {root}")
        if found is None:
            warnings.warn(f"no complete checkpoint under {root}: training starts from step 0")
        return found

    def _write_checkpoint(self, directory: Path, state_dict=None) -> None:
        self.model.write_files(directory, state_dict=state_dict)
        self.tokenizer.save_pretrained(str(directory))
        self.config.save_yaml(directory / "ilql_train_config.yaml")


def train(
    model_path: Optional[Union[str, PretrainedConfig]] = None,
    reward_fn: Optional[Callable] = None,
    dataset: Optional[Tuple[Sequence[Any], Sequence[float]]] = None,
    samples: Optional[Sequence[Any]] = None,
    rewards: Optional[Sequence[float]] = None,
    prompts: Optional[Sequence[str]] = None,
    eval_prompts: Optional[Sequence[str]] = None,
    metric_fn: Optional[MetricFn] = None,
    config: Optional[TRLConfig] = None,
    stop_sequences: Optional[Sequence[str]] = None,
    logit_mask: Optional[torch.Tensor] = None,
    resume_from_checkpoint: Optional[Union[str, os.PathLike]] = None,
    columns: Optional[Dict[str, str]] = None,
) -> ILQLTrainer:
    """Train a causal LM with ILQL on `samples` labelled with `rewards`; returns the trainer.

    model_path: a local transformers directory, or a `transformers.PretrainedConfig` to train
        from scratch (default: ``config.model.model_path``).
    samples: strings, ``[prompt, completion]`` pairs or ``[prompt, output, prompt, output, ...]``
        dialogues; rewards: one per sample: a finite number (on the last action), a list with one
        number per output segment (per-turn), or `ilql.TokenRewards` (one per output token).
    dataset: instead of samples/rewards: a ``(samples, rewards)`` pair, a path to a JSONL, CSV or
        Parquet file, a `datasets.Dataset`, or a list of records such as preference triples
        ``{"prompt", "chosen", "rejected"}`` (see `ilql.sources` for the column conventions);
        `columns` renames the columns, e.g. ``{"text": "review", "reward": "score"}``.
    eval_prompts, metric_fn: evaluation; ``metric_fn(samples=..., prompts=..., outputs=...)``
        returns a dict of lists whose means are logged per gen_kwargs setting.
    stop_sequences: generated outputs are cut at the first of these.
    logit_mask: optional bool [vocab, vocab]; ``logit_mask[last_token]`` marks tokens that may
        not follow ``last_token`` during evaluation.
    resume_from_checkpoint: a checkpoint directory, a directory of checkpoints, or
        ``"latest"`` (the newest complete one under ``train.checkpoint_dir``; a fresh start if
        there is none). Model, heads, optimizer, scheduler, counters, data position and RNG
        states are restored, so the run ends exactly as an uninterrupted one would.

    Every input is checked before the model is loaded.
    """
    config = config or default_ilql_config()
    if not isinstance(config, TRLConfig):
        raise DataTypeError(f"config must be a TRLConfig, got {type(config).__name__}")
    if reward_fn is not None or prompts is not None:
        raise ConfigError(
            "ilql trains offline: reward_fn/prompts (online RL) are not supported; label your samples "
            "and pass samples= and rewards="
        )
    if dataset is not None:
        if samples is not None or rewards is not None:
            raise ConfigError("give either dataset= or samples= and rewards=, not both")
        from .sources import resolve_dataset

        samples, rewards = resolve_dataset(dataset, columns)
    elif columns is not None:
        raise ConfigError("columns= names the columns of dataset=; it has no meaning with samples=")
    if samples is None or rewards is None:
        raise DataError("train() needs samples= and rewards= (one reward per sample)")
    eval_prompts = validate_prompts(eval_prompts)
    if metric_fn is not None and not callable(metric_fn):
        raise DataTypeError(f"metric_fn must be callable, got {type(metric_fn).__name__}")
    if metric_fn is not None and not eval_prompts:
        eval_prompts = [""] * (config.train.eval_batch_size or config.train.batch_size)
    stop_sequences = validate_prompts(stop_sequences, "stop_sequences")
    _validate_resume(resume_from_checkpoint)

    set_seed(config.train.seed)
    tokenizer = load_tokenizer(config)
    # checks every sample and reward first (errors name the sample), then tokenizes
    episodes = make_episodes(
        samples, rewards, tokenizer, config.train.seq_length, standardize_rewards=config.method.standardize_rewards,
        cache_dir=config.train.data_cache_dir,
    )
    model = load_model(model_path if model_path is not None else config.model.model_path, config)
    vocab = model.ilql_heads.vocab_size
    if len(tokenizer) > vocab:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has only {vocab}")
    trainer = ILQLTrainer(config, model, tokenizer, episodes, eval_prompts, metric_fn, stop_sequences, logit_mask)
    if resume_from_checkpoint is not None:
        resume_path = trainer.resolve_resume(resume_from_checkpoint)
        if resume_path is not None:
            trainer.load_checkpoint(resume_path)
            newer = [s for s, _ in ckpt.list_checkpoints(trainer.checkpoint_dir) if s > trainer.step]
            if newer:  # an explicit older checkpoint: the later ones are from the run being redone
                warnings.warn(
                    f"resuming at step {trainer.step} while {trainer.checkpoint_dir} holds later checkpoints "
                    f"(steps {', '.join(map(str, newer))}); they are replaced as training reaches their steps"
                )
        else:
            trainer._truncate_log()  # a run killed before its first checkpoint: its lines are redone
    return trainer.learn()


def _validate_resume(resume_from_checkpoint: Any) -> None:
    if resume_from_checkpoint is None or resume_from_checkpoint == "latest":
        return
    if not isinstance(resume_from_checkpoint, (str, os.PathLike)):
        raise DataTypeError(
            f"resume_from_checkpoint must be a directory or 'latest', got {type(resume_from_checkpoint).__name__}"
        )
    if not Path(resume_from_checkpoint).is_dir():
        raise ConfigError(f"resume_from_checkpoint: {resume_from_checkpoint} is not a directory")
