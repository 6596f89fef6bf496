"""Configuration: dataclasses with trlx's names and defaults, merging, YAML and validation.

A `TRLConfig` has six sections (method, model, optimizer, scheduler, tokenizer, train).
Every value is checked when a section is built, so a bad value fails with an error that names
its dotted key (e.g. ``method.tau``) and the allowed range before any model is loaded.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import yaml

from .errors import ConfigError

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULERS = ("cosine_annealing", "linear", "constant")
STRATEGIES = ("none", "ddp", "fsdp", "tp", "deepspeed")  # train.strategy; see ilql.parallel
MIXED_PRECISIONS = ("no", "bf16")


def _check(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {expected}, got {value!r}")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _type_matches(value: Any, expected: Any) -> bool:
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if expected is Any:
        return True
    if origin is Union:
        return any(_type_matches(value, a) for a in args)
    if expected is type(None):
        return value is None
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is str:
        return isinstance(value, str)
    if origin in (dict, Dict) or expected is dict:
        return isinstance(value, dict)
    if origin in (list, List) or expected is list:
        return isinstance(value, (list, tuple))
    return True


def _describe(expected: Any) -> str:
    args = [a for a in typing.get_args(expected) if a is not type(None)] if typing.get_origin(expected) is Union else []
    if args:
        return " or ".join(_describe(a) for a in args) + " or null"
    origin = typing.get_origin(expected) or expected
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping",
             list: "a list"}
    return names.get(origin, str(expected))


def _positive_int(section: str, name: str, value: Any) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    _check(ok, f"{section}.{name}", "a positive integer", value)


@dataclass
class _Section:
    """Shared construction logic: build from a dict, rejecting keys the section lacks."""

    @classmethod
    def from_dict(cls, config: Dict[str, Any]):
        if not isinstance(config, dict):
            raise ConfigError(f"{cls._name()} must be a mapping, got {type(config).__name__}")
        allowed = [f.name for f in dataclasses.fields(cls) if f.init]
        unknown = sorted(set(config) - set(allowed))
        if unknown:
            raise ConfigError(
                f"unknown key {cls._name()}.{unknown[0]}; allowed keys: {', '.join(allowed)}"
            )
        cls._check_types(config)
        return cls(**copy.deepcopy(config))

    @classmethod
    def _check_types(cls, config: Dict[str, Any]) -> None:
        """Reject a value of the wrong type (a number where a mapping belongs, a string for a
        count) with the key's name, before a section's own range checks can trip over it."""
        hints = typing.get_type_hints(cls)
        for name, value in config.items():
            expected = hints.get(name, Any)
            if not _type_matches(value, expected):
                raise ConfigError(f"{cls._name()}.{name} must be {_describe(expected)}, got {value!r}")

    @classmethod
    def _name(cls) -> str:
        return _SECTION_NAMES.get(cls.__name__, cls.__name__)

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.init}


@dataclass
class ModelConfig(_Section):
    """Which causal LM to train.

    model_path: a local directory with a transformers checkpoint (or a hub name, which only
        works where the hub is reachable).
    num_layers_unfrozen: how many of the last transformer blocks train; -1 trains all of them.
    """

    model_path: str = "gpt2"
    model_arch_type: str = "causal"
    num_layers_unfrozen: int = -1
    model_extra_configs: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        _check(self.model_arch_type == "causal", "model.model_arch_type", "'causal'", self.model_arch_type)
        ok = isinstance(self.num_layers_unfrozen, int) and self.num_layers_unfrozen >= -1
        _check(ok, "model.num_layers_unfrozen", "-1 (all) or an integer >= 0", self.num_layers_unfrozen)


@dataclass
class TokenizerConfig(_Section):
    """Which tokenizer to use and how it pads (generation) and truncates (training)."""

    tokenizer_path: str = "gpt2"
    padding_side: str = "left"
    truncation_side: str = "right"
    tokenizer_extra_configs: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("padding_side", "truncation_side"):
            value = getattr(self, name)
            _check(value in ("left", "right"), f"tokenizer.{name}", "'left' or 'right'", value)


@dataclass
class OptimizerConfig(_Section):
    """Optimizer name (adamw, adam, sgd) and its keyword arguments."""

    name: str = "adamw"
    kwargs: Dict[str, Any] = field(
        default_factory=lambda: dict(lr=5.0e-5, betas=[0.9, 0.95], eps=1.0e-8, weight_decay=1.0e-6)
    )

    def __post_init__(self):
        _check(self.name in OPTIMIZERS, "optimizer.name", f"one of {', '.join(OPTIMIZERS)}", self.name)
        lr = self.kwargs.get("lr", 1e-3)
        _check(_is_number(lr) and lr > 0, "optimizer.kwargs.lr", "a positive number", lr)


@dataclass
class SchedulerConfig(_Section):
    """Learning-rate schedule: cosine_annealing (kwargs T_max, eta_min), linear, or constant."""

    name: str = "cosine_annealing"
    kwargs: Dict[str, Any] = field(default_factory=lambda: dict(T_max=1.0e12, eta_min=5.0e-5))

    def __post_init__(self):
        _check(self.name in SCHEDULERS, "scheduler.name", f"one of {', '.join(SCHEDULERS)}", self.name)


@dataclass
class TrainConfig(_Section):
    """The training loop. Steps count optimizer steps.

    The run lasts min(epochs * batches_per_epoch, total_steps) steps. Evaluation runs every
    `eval_interval` steps and at the end; checkpoints are written every `checkpoint_interval`
    steps under `checkpoint_dir`, and the best one (by `best_metric`, default: the first metric
    that `metric_fn` returns, best over the beta sweep) to `checkpoint_dir/best_checkpoint`.
    Per-step statistics go to `logging_dir/stats.jsonl` (`logging_dir` defaults to
    `checkpoint_dir`).
    """

    seq_length: int = 64
    epochs: int = 100
    total_steps: int = 1000
    batch_size: int = 128
    checkpoint_interval: int = 1000
    eval_interval: int = 100
    pipeline: str = "PromptPipeline"
    trainer: str = "AccelerateILQLTrainer"
    checkpoint_dir: str = "ckpts"
    logging_dir: Optional[str] = None
    save_best: bool = True
    best_metric: Optional[str] = None
    eval_batch_size: Optional[int] = None
    seed: int = 1000
    tracker: Optional[str] = None
    project_name: str = "ilql"
    tags: List[str] = field(default_factory=list)
    progress_bar: bool = True
    # fault tolerance: training checkpoints kept besides the best one (None keeps all), and
    # how many non-finite steps in a row are skipped before training stops with an error
    keep_last_checkpoints: Optional[int] = 3
    max_nonfinite_steps: int = 10
    # data: batches of similar-length episodes (less padding), and a directory where tokenized
    # episodes are cached, keyed by data + tokenizer + settings (None: no cache)
    group_by_length: bool = False
    data_cache_dir: Optional[str] = None
    # speed: "bf16" autocasts the model's matmuls (losses stay float32); compile runs the trunk
    # through torch.compile; statistics are copied to the host (a sync) every log_interval steps
    mixed_precision: str = "no"
    compile: bool = False
    log_interval: int = 1
    # scale-out (see ilql.parallel and docs/distributed.md): "none", "ddp", "fsdp" (FSDP2; with
    # cpu_offload its parameters and optimizer states live on the CPU) or "tp" (vocabulary-
    # parallel heads); launch with torchrun for anything but "none"
    strategy: str = "none"
    cpu_offload: bool = False
    # recompute each transformer block in backward instead of keeping its activations
    activation_checkpointing: bool = False
    # split each batch into this many chunks, one forward/backward each, one optimizer step
    gradient_accumulation_steps: int = 1
    # strategy "deepspeed" (optional extra): entries merged into ilql's DeepSpeed config (ZeRO-3)
    deepspeed_config: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("seq_length", "epochs", "total_steps", "batch_size", "checkpoint_interval", "eval_interval"):
            _positive_int("train", name, getattr(self, name))
        if self.eval_batch_size is not None:
            _positive_int("train", "eval_batch_size", self.eval_batch_size)
        ok = isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0
        _check(ok, "train.seed", "an integer >= 0", self.seed)
        _check(self.tracker in (None, "jsonl"), "train.tracker", "None or 'jsonl'", self.tracker)
        if self.keep_last_checkpoints is not None:
            _positive_int("train", "keep_last_checkpoints", self.keep_last_checkpoints)
        _positive_int("train", "max_nonfinite_steps", self.max_nonfinite_steps)
        _check(isinstance(self.group_by_length, bool), "train.group_by_length", "true or false", self.group_by_length)
        ok = self.data_cache_dir is None or isinstance(self.data_cache_dir, str)
        _check(ok, "train.data_cache_dir", "None or a directory path", self.data_cache_dir)
        _check(self.strategy in STRATEGIES, "train.strategy", f"one of {', '.join(STRATEGIES)}", self.strategy)
        _check(isinstance(self.cpu_offload, bool), "train.cpu_offload", "true or false", self.cpu_offload)
        _check(not self.cpu_offload or self.strategy == "fsdp", "train.cpu_offload", "false unless train.strategy is 'fsdp'", self.cpu_offload)
        ok = isinstance(self.activation_checkpointing, bool)
        _check(ok, "train.activation_checkpointing", "true or false", self.activation_checkpointing)
        _positive_int("train", "gradient_accumulation_steps", self.gradient_accumulation_steps)
        _check(isinstance(self.deepspeed_config, dict), "train.deepspeed_config", "a mapping", self.deepspeed_config)
        ok = self.strategy != "deepspeed" or self.gradient_accumulation_steps == 1
        _check(ok, "train.gradient_accumulation_steps", "1 with train.strategy 'deepspeed'", self.gradient_accumulation_steps)
        ok = self.mixed_precision in MIXED_PRECISIONS
        _check(ok, "train.mixed_precision", f"one of {', '.join(map(repr, MIXED_PRECISIONS))}", self.mixed_precision)
        _check(isinstance(self.compile, bool), "train.compile", "true or false", self.compile)
        _positive_int("train", "log_interval", self.log_interval)


@dataclass
class ILQLConfig(_Section):
    """ILQL's hyperparameters (Snell et al. 2022), with trlx's names and defaults.

    tau: expectile of the V regression, in (0, 1).        gamma: discount, in [0, 1].
    cql_scale: weight of the CQL penalty (>= 0).           awac_scale: weight of the AWAC LM loss (>= 0).
    alpha: Polyak rate of the target Q heads, in (0, 1]:  target <- alpha * q + (1 - alpha) * target.
    beta: advantage temperature of the AWAC weights exp(beta * (Q - V)); 0 = behaviour cloning.
    steps_for_target_q_sync: optimizer steps between Polyak updates of the target heads.
    two_qs: train two Q heads (double Q-learning) and use their minimum.
    standardize_rewards: rescale rewards to zero mean and unit variance over the dataset.
    gen_kwargs: keyword arguments of `generate` used at evaluation; a list value (for example
        beta=[0, 1, 4]) runs one evaluation per value.
    chunk_size: positions per chunk of the vocabulary-sized cross entropies (CQL, AWAC) in
        training: memory grows with chunk_size x vocab instead of batch x actions x vocab, with
        the same gradients. None uses the straightforward reference loss over full-vocabulary
        tensors (needed only for LMs whose output layer is not a plain linear layer).
    """

    name: str = "ilqlconfig"
    tau: float = 0.7
    gamma: float = 0.99
    cql_scale: float = 0.1
    awac_scale: float = 1.0
    alpha: float = 0.001
    beta: float = 0.0
    steps_for_target_q_sync: int = 5
    two_qs: bool = True
    standardize_rewards: bool = True
    gen_kwargs: Dict[str, Any] = field(
        default_factory=lambda: dict(max_new_tokens=56, top_k=20, beta=1, temperature=1.0)
    )
    chunk_size: Optional[int] = 256

    def __post_init__(self):
        _check(_is_number(self.tau) and 0 < self.tau < 1, "method.tau", "in (0, 1)", self.tau)
        _check(_is_number(self.gamma) and 0 <= self.gamma <= 1, "method.gamma", "in [0, 1]", self.gamma)
        _check(_is_number(self.alpha) and 0 < self.alpha <= 1, "method.alpha", "in (0, 1]", self.alpha)
        for name in ("cql_scale", "awac_scale", "beta"):
            value = getattr(self, name)
            _check(_is_number(value) and value >= 0, f"method.{name}", "a finite number >= 0", value)
        _positive_int("method", "steps_for_target_q_sync", self.steps_for_target_q_sync)
        _check(isinstance(self.two_qs, bool), "method.two_qs", "true or false", self.two_qs)
        if self.chunk_size is not None:
            _positive_int("method", "chunk_size", self.chunk_size)
        if not isinstance(self.gen_kwargs, dict):
            raise ConfigError(f"method.gen_kwargs must be a mapping, got {self.gen_kwargs!r}")
        for key, value in self.gen_kwargs.items():
            if isinstance(value, (list, tuple)) and len(value) == 0:
                raise ConfigError(f"method.gen_kwargs.{key} is an empty list; give at least one value")
        from .generation import check_gen_kwargs  # lazy: keeps torch out of config import time

        check_gen_kwargs(self.gen_kwargs, prefix="method.gen_kwargs", sweep=True)


_SECTION_NAMES = {
    "ModelConfig": "model",
    "TokenizerConfig": "tokenizer",
    "OptimizerConfig": "optimizer",
    "SchedulerConfig": "scheduler",
    "TrainConfig": "train",
    "ILQLConfig": "method",
}
_SECTIONS = {
    "method": ILQLConfig,
    "model": ModelConfig,
    "optimizer": OptimizerConfig,
    "scheduler": SchedulerConfig,
    "tokenizer": TokenizerConfig,
    "train": TrainConfig,
}


def _merge(base: Dict[str, Any], overrides: Dict[str, Any], path: str = "") -> Dict[str, Any]:
    """Deep-merge `overrides` into a copy of `base`. Keys may be dotted ("method.tau"); nested
    mappings (including kwargs) merge key by key, so one override keeps the other defaults."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        head, _, rest = str(key).partition(".")
        if rest:
            value = {rest: value}
        if path == "" and head not in _SECTIONS:
            raise ConfigError(f"unknown config section {head!r}; allowed: {', '.join(_SECTIONS)}")
        if isinstance(value, dict) and isinstance(out.get(head), dict):
            out[head] = _merge(out[head], value, f"{path}{head}.")
        else:
            out[head] = copy.deepcopy(value)
    return out


@dataclass
class TRLConfig:
    """The full configuration of a run (the name trlx users know)."""

    method: ILQLConfig = field(default_factory=ILQLConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_dict(cls, config: Dict[str, Any]) -> "TRLConfig":
        if not isinstance(config, dict):
            raise ConfigError(f"a config must be a mapping of sections, got {type(config).__name__}")
        unknown = sorted(set(config) - set(_SECTIONS))
        if unknown:
            raise ConfigError(f"unknown config section {unknown[0]!r}; allowed: {', '.join(_SECTIONS)}")
        return cls(**{name: _SECTIONS[name].from_dict(config.get(name, {})) for name in _SECTIONS})

    def to_dict(self) -> Dict[str, Dict[str, Any]]:
        return {name: getattr(self, name).to_dict() for name in _SECTIONS}

    @classmethod
    def load_yaml(cls, path: Union[str, Path]) -> "TRLConfig":
        """Read a YAML file (safe loader). Sections it leaves out keep their defaults."""
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not a valid UTF-8 YAML file ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a config must be a mapping of sections, got {type(data).__name__}")
        return cls.from_dict(_merge(cls().to_dict(), data))

    def save_yaml(self, path: Union[str, Path]) -> None:
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(_plain(self.to_dict()), f, sort_keys=False)

    @classmethod
    def update(cls, baseconfig: Union["TRLConfig", Dict[str, Any]], config: Dict[str, Any]) -> "TRLConfig":
        """Return `baseconfig` with `config` merged in. Keys may be nested dicts or dotted
        paths like ``"method.tau"``; an unknown key raises `ConfigError`."""
        base = baseconfig.to_dict() if isinstance(baseconfig, TRLConfig) else baseconfig
        return cls.from_dict(_merge(cls().to_dict(), _merge(base, config)))

    def evolve(self, **sections: Dict[str, Any]) -> "TRLConfig":
        """A copy with the given sections updated, e.g. ``evolve(train=dict(batch_size=8))``."""
        return TRLConfig.update(self, sections)

    def __str__(self) -> str:
        return yaml.safe_dump(_plain(self.to_dict()), sort_keys=False)


def _plain(obj: Any) -> Any:
    """Tuples to lists so that YAML stays readable by the safe loader."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def default_ilql_config() -> TRLConfig:
    """trlx's default ILQL configuration (gpt2, batch 128, 1000 steps, tau 0.7, ...)."""
    return TRLConfig()
