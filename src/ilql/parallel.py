"""Scale-out on torch.distributed: data parallel (DDP), sharded data parallel (FSDP2) and
tensor-parallel vocabulary heads, launched with ``torchrun`` on one node or many.

`Parallel` is the one object the trainer consults. With ``train.strategy = "none"`` every
method is the identity, so single-process training pays nothing. Otherwise:

- "ddp":  every rank holds the whole model; gradients are averaged by DDP.
- "fsdp": FSDP2 ``fully_shard`` of every transformer block and of the root (embeddings, LM
          head, ILQL heads); parameters, gradients and optimizer states are sharded.
- "tp":   the LM head and the Q / target-Q heads are sharded over the vocabulary (DTensor,
          ``Shard(0)`` of their weight), and the trunk by its architecture's tensor-parallel
          plan where it has one (Llama); every rank sees the same batch; the losses are
          computed vocabulary-parallel, without gathering a full-vocabulary tensor.

Data parallel ranks split every global batch of the single-process run (same seeded order),
and the loss is normalised by the number of actions in the *global* batch, so per-step losses
and updates equal the single-process run's (up to float rounding).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler

from . import checkpoint as ckpt
from .errors import ConfigError, TrainingError


# ----------------------------------------------------------------------- process group setup
def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_process_group(backend: Optional[str] = None) -> None:
    """Join the process group described by torchrun's environment (idempotent)."""
    if dist.is_initialized():
        return
    if not launched_by_torchrun():
        raise ConfigError(
            "train.strategy needs a torch.distributed launch (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT "
            "are unset): run `torchrun --nproc_per_node N ...`, or set train.strategy to 'none'"
        )
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    atexit.register(_leave_process_group)


def _leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------- data sharding
class ShardedBatchSampler(Sampler[List[int]]):
    """Each data-parallel rank takes its contiguous slice of every global batch of `batches`.

    Wrapping the single-process batch sampler (not re-sampling) keeps its seeded order, so
    the ranks together see exactly the batches a single process would. A last batch with
    fewer samples than ranks is skipped on every rank (no rank may get an empty batch)."""

    def __init__(self, batches: Sampler, rank: int, world_size: int):
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __iter__(self) -> Iterator[List[int]]:
        for batch in self.batches:
            if len(batch) >= self.world_size:
                yield shard_slice(list(batch), self.rank, self.world_size)

    def __len__(self) -> int:
        n = len(self.batches)
        batch_size = getattr(self.batches, "batch_size", None)
        sampler = getattr(self.batches, "sampler", None)
        if batch_size and sampler is not None and not getattr(self.batches, "drop_last", False):
            tail = len(sampler) % batch_size
            if 0 < tail < self.world_size:
                n -= 1
        return n


def shard_slice(items: Sequence[Any], rank: int, world_size: int) -> List[Any]:
    """Rank `rank`'s contiguous part of `items`; sizes differ by at most one."""
    base, extra = divmod(len(items), world_size)
    start = rank * base + min(rank, extra)
    return list(items[start : start + base + (rank < extra)])


# ------------------------------------------------------- vocabulary-parallel autograd helpers
class _CopyToGroup(torch.autograd.Function):
    """Identity forward; all-reduce (sum) of the gradient backward: the input of a layer
    whose output is split over ranks gets every rank's share of its gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromGroup(torch.autograd.Function):
    """All-reduce (sum) forward; identity backward: every rank computes the same loss from
    the reduced value, so each local term's gradient is just the incoming gradient."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def vocab_parallel_logsumexp(x_local: torch.Tensor, group) -> torch.Tensor:
    """logsumexp over the last (vocabulary) dimension split over the ranks of `group`."""
    m = x_local.detach().amax(-1, keepdim=True)
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # an all -inf row stays -inf
    s = _ReduceFromGroup.apply(torch.exp(x_local - m).sum(-1), group)
    return m.squeeze(-1) + torch.log(s)


def vocab_parallel_taken_and_rest(x_local: torch.Tensor, actions: torch.Tensor, start: int, group) -> torch.Tensor:
    """``[x_a, logsumexp_{a' != a} x_a']`` per position, from a vocabulary shard of x.

    ILQL's loss sees a vocabulary-sized tensor only through the value of the taken action and
    the cross entropy ``logsumexp_a' x - x_a``; both are functions of these two numbers (the
    cross entropy of the 2-column row with target 0 is ``logsumexp(x_a, rest) - x_a``). So the
    unchanged `ilql_loss` run on this [..., 2] tensor with actions = 0 gives the full-vocabulary
    loss and gradients, while no rank ever holds more than its shard."""
    x_local = x_local.float()  # as the reference loss's cross entropy, whatever the compute dtype
    n = x_local.shape[-1]
    ids = actions - start
    inside = (ids >= 0) & (ids < n)
    safe = ids.clamp(0, max(n - 1, 0))
    picked = x_local.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * inside.to(x_local.dtype)
    taken = _ReduceFromGroup.apply(picked, group)
    is_taken = F.one_hot(safe, n).bool() & inside.unsqueeze(-1)
    rest = vocab_parallel_logsumexp(x_local.masked_fill(is_taken, float("-inf")), group)
    return torch.stack([taken, rest.to(taken.dtype)], dim=-1)


def _gather_last_dim(x_local: torch.Tensor, full_size: int, group) -> torch.Tensor:
    """All-gather shards of the last dimension (torch.chunk sizes: the last may be short)."""
    world = dist.get_world_size(group)
    chunk = -(-full_size // world)
    padded = F.pad(x_local, (0, chunk - x_local.shape[-1]))
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat(parts, dim=-1)[..., :full_size]


# ------------------------------------------------------------------ vocabulary-parallel layers
class VocabParallelLinear(nn.Module):
    """A Linear whose output (vocabulary) dimension is sharded: the weight and bias are
    DTensors placed ``Shard(0)`` on a 1-D device mesh. The output is this rank's vocabulary
    slice ``[start, start + local)``, or the whole vocabulary with ``gather_output`` (decoding)."""

    def __init__(self, linear: nn.Linear, mesh, weight: Optional[nn.Parameter] = None):
        super().__init__()
        from torch.distributed.tensor import Shard, distribute_tensor

        self.mesh = mesh
        self.group = mesh.get_group()
        self.out_features = linear.weight.shape[0]
        trainable = linear.weight.requires_grad
        if weight is None:  # src rank 0's values: every rank starts from the same weights
            weight = nn.Parameter(distribute_tensor(linear.weight.detach(), mesh, [Shard(0)]), requires_grad=trainable)
        self.weight = weight
        bias = getattr(linear, "bias", None)
        self.bias = None
        if bias is not None:
            self.bias = nn.Parameter(distribute_tensor(bias.detach(), mesh, [Shard(0)]), requires_grad=bias.requires_grad)
        chunk = -(-self.out_features // mesh.size())
        self.start = min(mesh.get_local_rank() * chunk, self.out_features)
        self.gather_output = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            x = _CopyToGroup.apply(x, self.group)
        bias = None if self.bias is None else self.bias.to_local()
        local = F.linear(x, self.weight.to_local(), bias)
        return _gather_last_dim(local, self.out_features, self.group) if self.gather_output else local

    def at_actions(self, h: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """The output at the given vocabulary ids only (h: [..., in], actions: [..., A])."""
        weight = self.weight.to_local()
        n = weight.shape[0]
        ids = actions - self.start
        inside = (ids >= 0) & (ids < n)
        safe = ids.clamp(0, max(n - 1, 0))
        out = (h.unsqueeze(-2) @ weight[safe].unsqueeze(-1)).squeeze(-1).squeeze(-1)
        if self.bias is not None:
            out = out + self.bias.to_local()[safe]
        return _ReduceFromGroup.apply(out * inside.to(out.dtype), self.group)


class VocabParallelEmbedding(nn.Module):
    """An input embedding sharded over the vocabulary (rows), sharing its DTensor weight with
    a tied `VocabParallelLinear` LM head. Out-of-shard ids contribute zeros; a sum over the
    ranks assembles every embedding."""

    def __init__(self, embedding: nn.Embedding, mesh):
        super().__init__()
        from torch.distributed.tensor import Shard, distribute_tensor

        self.group = mesh.get_group()
        self.weight = nn.Parameter(
            distribute_tensor(embedding.weight.detach(), mesh, [Shard(0)]), requires_grad=embedding.weight.requires_grad
        )
        chunk = -(-embedding.weight.shape[0] // mesh.size())
        self.start = min(mesh.get_local_rank() * chunk, embedding.weight.shape[0])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to_local()
        ids = input_ids - self.start
        inside = (ids >= 0) & (ids < weight.shape[0])
        out = F.embedding(ids.clamp(0, max(weight.shape[0] - 1, 0)), weight) * inside.unsqueeze(-1).to(weight.dtype)
        return _ReduceFromGroup.apply(out, self.group)


def shard_vocabulary_heads(model, mesh) -> None:
    """Replace the LM head and the last layer of every Q / target-Q head by vocabulary-parallel
    layers (a tied input embedding is sharded with the LM head, sharing its DTensor)."""
    heads = model.ilql_heads
    for head in [*heads.q_heads, *heads.target_q_heads]:
        head[-1] = VocabParallelLinear(head[-1], mesh)
    base = model.base_model
    lm_head = base.get_output_embeddings()
    embedding = base.get_input_embeddings()
    if lm_head.weight is embedding.weight:
        if lm_head.weight.shape[0] != embedding.weight.shape[0]:
            raise ConfigError("train.strategy='tp': a tied LM head must have the input embedding's vocabulary size")
        new_embedding = VocabParallelEmbedding(embedding, mesh)
        base.set_input_embeddings(new_embedding)
        base.set_output_embeddings(VocabParallelLinear(lm_head, mesh, weight=new_embedding.weight))
    else:
        base.set_output_embeddings(VocabParallelLinear(lm_head, mesh))


def shard_trunk(model, mesh) -> bool:
    """Tensor-parallel trunk through the architecture's own plan (transformers'
    ``config.base_model_tp_plan``, e.g. Llama: q/k/v/gate/up column-wise, o/down row-wise) with
    torch's ColwiseParallel / RowwiseParallel. False (trunk left replicated) without a plan."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    config = model.config
    plan = getattr(config, "base_model_tp_plan", None)
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    if not plan or any(style not in styles for style in plan.values()):
        return False
    size = mesh.size()
    for name in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(config, name, None)
        if heads is not None and heads % size:
            raise ConfigError(f"train.strategy='tp' over {size} ranks needs {name} ({heads}) divisible by {size}")
    parallelize_module(model.base_model.base_model, mesh, {key: styles[style]() for key, style in plan.items()})
    return True


# ------------------------------------------------------------------------------- DDP wrapper
class _DDP(torch.nn.parallel.DistributedDataParallel):
    """DDP whose forward synchronises gradients and which otherwise behaves like the wrapped
    model (generate, sync_target_q_heads, write_files, config ... reach `module`)."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)

    def loss_inputs(self, *args, **kwargs):
        """The chunked-loss forward, run through DDP's forward so its gradients are reduced."""
        self.module.forward = self.module.loss_inputs  # an instance attribute shadows forward
        try:
            return self(*args, **kwargs)
        finally:
            del self.module.forward


# ------------------------------------------------------------------------------- the object
@dataclasses.dataclass
class Parallel:
    """What the trainer asks about distribution. Build it with `Parallel.from_config`."""

    strategy: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mixed_precision: str = "no"
    cpu_offload: bool = False
    activation_checkpointing: bool = False
    deepspeed_config: Dict[str, Any] = dataclasses.field(default_factory=dict)
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    mesh: Any = None

    @classmethod
    def from_config(cls, config) -> "Parallel":
        """From ``config.train`` (strategy, mixed_precision, cpu_offload) and torchrun's
        environment; joins the process group unless the strategy is "none"."""
        train = config.train
        strategy = getattr(train, "strategy", "none")
        cuda = torch.cuda.is_available()
        checkpointing = getattr(train, "activation_checkpointing", False)
        if strategy == "none":
            return cls(device=torch.device("cuda" if cuda else "cpu"), activation_checkpointing=checkpointing)
        if getattr(train, "cpu_offload", False) and not cuda:
            raise ConfigError("train.cpu_offload moves FSDP shards from the GPU to the host: it needs a GPU; set it to false")
        init_process_group()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
        mesh = None
        if strategy in ("fsdp", "tp"):
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        return cls(
            strategy=strategy,
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=local_rank,
            mixed_precision=getattr(train, "mixed_precision", "no"),
            cpu_offload=getattr(train, "cpu_offload", False),
            activation_checkpointing=checkpointing,
            deepspeed_config=dict(getattr(train, "deepspeed_config", {}) or {}),
            device=device,
            mesh=mesh,
        )

    # ---------------------------------------------------------------------------- roles
    @property
    def is_main(self) -> bool:
        """Only rank 0 writes logs, checkpoints and prints."""
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return 0 if self.strategy in ("none", "tp") else self.rank

    @property
    def dp_size(self) -> int:
        """Data-parallel degree: how many ranks split each batch (tensor parallel: 1)."""
        return 1 if self.strategy in ("none", "tp") else self.world_size

    @property
    def chunked_loss(self) -> bool:
        """Whether the chunked loss may run: it reads the LM / Q heads' weights after the
        forward, which vocabulary-parallel layers and ZeRO-3's partitioned weights forbid."""
        return self.strategy not in ("tp", "deepspeed")

    @property
    def gathers_weights(self) -> bool:
        """Whether saving needs every rank (the weights are sharded: fsdp, tp, deepspeed)."""
        return self.strategy in ("fsdp", "tp", "deepspeed")

    @property
    def splits_evaluation(self) -> bool:
        """Whether ranks decode different prompts: only where decoding runs no collective
        (tp and ZeRO-3 gather weights inside every forward, so all ranks decode together)."""
        return self.strategy in ("ddp", "fsdp") and self.world_size > 1

    def barrier(self) -> None:
        if self.strategy != "none":
            dist.barrier()

    # --------------------------------------------------------------------------- models
    def wrap(self, model):
        """Move `model` to this rank's device and distribute it; returns the model to train
        (the same object for fsdp / tp, a delegating DDP wrapper for ddp)."""
        model = model.to(self.device)
        if self.activation_checkpointing:
            # non-reentrant: works under FSDP2 and with frozen (requires_grad=False) inputs
            model.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.strategy == "ddp":
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            return _DDP(model, device_ids=device_ids)
        if self.strategy == "fsdp":
            return self._fully_shard(model)
        if self.strategy == "tp":
            shard_trunk(model, self.mesh)
            shard_vocabulary_heads(model, self.mesh)
        return model

    def attach_optimizer(self, model, optimizer):
        """Under "deepspeed": ``deepspeed.initialize`` (ZeRO-3 by default) with the trainer's
        optimizer; returns the engine (which passes other attributes to the model) and an
        optimizer whose ``step`` is the engine's. Identity otherwise. The LR scheduler keeps
        the client optimizer, whose param_groups ZeRO keeps using."""
        if self.strategy != "deepspeed":
            return model, optimizer
        return _deepspeed_initialize(model, optimizer, self)

    def _fully_shard(self, model):
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        from .modeling import _transformer_blocks

        kwargs: Dict[str, Any] = dict(mesh=self.mesh)
        if self.mixed_precision == "bf16":
            # bf16 parameters and compute; gradients reduced and stored in fp32
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if self.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        for block in _transformer_blocks(model.base_model):
            fully_shard(block, **kwargs)
        # the heads stay in the root unit: the losses read their weights (and the LM head's)
        # after the forward returns, and the root unit is only resharded after backward
        fully_shard(model, **kwargs)
        register_fsdp_forward_method(model, "loss_inputs")  # the chunked-loss forward
        return model

    # ----------------------------------------------------------------------------- data
    def shard_loader(self, loader: DataLoader) -> DataLoader:
        """The same loader, yielding only this rank's slice of every global batch."""
        if self.dp_size == 1:
            return loader
        if loader.batch_sampler is None:
            raise ConfigError("train.strategy: data-parallel training needs a DataLoader with a batch size")
        batch_size = getattr(loader.batch_sampler, "batch_size", None)
        if batch_size is not None and batch_size < self.dp_size:
            raise ConfigError(
                f"train.batch_size is the global batch: {batch_size} cannot be split over {self.dp_size} "
                f"data-parallel ranks; use at least {self.dp_size}"
            )
        return DataLoader(
            loader.dataset,
            batch_sampler=ShardedBatchSampler(loader.batch_sampler, self.dp_rank, self.dp_size),
            collate_fn=loader.collate_fn,
            num_workers=loader.num_workers,
            pin_memory=loader.pin_memory,
            generator=loader.generator,  # each epoch's iterator draws a seed from it, as before
        )

    def split(self, items: Sequence[Any]) -> List[Any]:
        """This rank's contiguous part of `items` (evaluation prompts)."""
        return shard_slice(items, self.dp_rank, self.dp_size) if self.splits_evaluation else list(items)

    def gather(self, items: Sequence[Any]) -> List[Any]:
        """Concatenate every rank's `items` in rank order (the inverse of `split`)."""
        if not self.splits_evaluation:
            return list(items)
        parts: List[Any] = [None] * self.world_size
        dist.all_gather_object(parts, list(items))
        return [x for part in parts for x in part]

    # ----------------------------------------------------------------------------- loss
    def vocab_reduce(self, out, actions: torch.Tensor):
        """Under "tp", reduce the vocabulary-sharded logits and Q values to the two numbers
        per position the loss needs (see `vocab_parallel_taken_and_rest`)."""
        if self.strategy != "tp":
            return out, actions
        group = self.mesh.get_group()
        start = self._vocab_start(out.logits.shape[-1])

        def reduce(x):
            return vocab_parallel_taken_and_rest(x, actions, start, group)

        out = dataclasses.replace(out, logits=reduce(out.logits), qs=[reduce(q) for q in out.qs])
        return out, torch.zeros_like(actions)

    def _vocab_start(self, local_size: int) -> int:
        sizes = [None] * self.world_size
        if not hasattr(self, "_starts"):
            dist.all_gather_object(sizes, local_size)
            self._starts = [sum(sizes[:r]) for r in range(self.world_size)]
        return self._starts[self.rank]

    def forward_backward(self, loss_fn, batch, model, micro_batches: int = 1):
        """Forward and backward of one optimizer step: this rank's part of the global batch,
        in `micro_batches` row chunks (gradient accumulation) whose gradients are reduced over
        the ranks only after the last chunk.

        Every chunk's loss is a mean over its own actions; it is weighted by
        ``n_chunk / n_global`` (the global batch's actions, all ranks and chunks), times the
        data-parallel degree that DDP's / FSDP's gradient averaging divides by. The gradients,
        the returned (detached) loss and the statistics (means over actions) therefore equal
        one pass over the whole global batch in a single process."""
        count = lambda b: b.dones[:, :-1].sum().to(torch.float64)  # noqa: E731  (actions)
        total = count(batch)
        if self.dp_size > 1:
            dist.all_reduce(total)
        total = total.clamp(min=1)
        chunks = [rows for rows in torch.arange(batch.dones.shape[0]).tensor_split(micro_batches) if len(rows)]
        loss_sum, stat_sums = None, {}
        for i, rows in enumerate(chunks):
            chunk = type(batch)(**{k: v[rows.to(v.device)] for k, v in vars(batch).items()})
            weight = count(chunk) / total
            with self._gradient_sync(model, i == len(chunks) - 1):
                loss, stats = loss_fn(chunk)
                scaled = loss * (weight * self.dp_size).to(loss.dtype)
                model.backward(scaled) if self.strategy == "deepspeed" else scaled.backward()
            loss_sum = loss.detach().double() * weight + (0 if loss_sum is None else loss_sum)
            for k, v in stats.items():
                stat_sums[k] = v.detach().double() * weight + stat_sums.get(k, 0)
        names = list(stat_sums)
        packed = torch.stack([loss_sum] + [stat_sums[k] for k in names])
        if self.dp_size > 1:
            dist.all_reduce(packed)
        return packed[0].float(), {k: packed[i + 1].float() for i, k in enumerate(names)}

    @contextlib.contextmanager
    def _gradient_sync(self, model, sync: bool):
        """Skip the gradient reduction of DDP / FSDP for all but the last accumulated chunk."""
        if self.strategy == "ddp" and not sync:
            with model.no_sync():
                yield
        elif self.strategy == "fsdp":
            model.set_requires_gradient_sync(sync)
            yield
        else:
            yield

    def local_grads(self, model) -> List[torch.Tensor]:
        """The gradients this rank holds, as plain tensors (a DTensor gives its local shard)."""
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in model.parameters() if p.grad is not None]
        return [g.to_local() if isinstance(g, DTensor) else g for g in grads]

    def on_all_ranks(self, flag: torch.Tensor) -> bool:
        """True when `flag` holds on every rank, so that all ranks take the same branch."""
        if self.strategy == "none":
            return bool(flag)
        flag = flag.detach().to(torch.int32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag)

    # ----------------------------------------------------------------------- generation
    @contextlib.contextmanager
    def generation_context(self, model):
        """Make the model usable by `generate` outside its forward: FSDP units stay gathered
        (so no collective runs while ranks decode different prompts); vocabulary-parallel
        layers return the whole vocabulary."""
        if self.strategy == "fsdp":
            from torch.distributed.fsdp import FSDPModule

            units = [m for m in model.modules() if isinstance(m, FSDPModule)]
            for unit in units:
                unit.unshard()
                if unit is not model:
                    unit.set_reshard_after_forward(False, recurse=False)
            try:
                yield
            finally:
                for unit in units:
                    if unit is not model:
                        unit.set_reshard_after_forward(True, recurse=False)
                    unit.reshard()
        elif self.strategy == "tp":
            layers = [m for m in model.modules() if isinstance(m, VocabParallelLinear)]
            for layer in layers:
                layer.gather_output = True
            try:
                yield
            finally:
                for layer in layers:
                    layer.gather_output = False
        else:
            yield

    # ----------------------------------------------------------------------- checkpoints
    def full_state_dict(self, model) -> Optional[Dict[str, torch.Tensor]]:
        """A full (unsharded) CPU state dict of `model` on rank 0 (collective: every rank
        must call it); None where the model's own state dict already is full (none / ddp)."""
        if self.strategy in ("none", "ddp"):
            return None
        if self.strategy == "deepspeed":
            import deepspeed

            module = model.module
            with deepspeed.zero.GatheredParameters(list(module.parameters())):
                return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if self.is_main else {}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=options)


def save_sharded(directory, model, optimizer, extra: Optional[Dict[str, Any]] = None) -> None:
    """A resumable sharded checkpoint (torch.distributed.checkpoint): every rank writes its
    shards of the model and optimizer; `extra` (step, scheduler state ...) goes along.
    Collective under a process group. It reloads on any number of ranks and any strategy."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state, "extra": extra or {}}, checkpoint_id=str(directory))


def load_sharded(directory, model, optimizer, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Load a `save_sharded` checkpoint into `model`/`optimizer` (resharding as needed);
    returns its `extra` dict, of which `extra` names the keys to read (with placeholders)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state, "extra": dict(extra or {})}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return state["extra"]


# ------------------------------------------------------------ trainer checkpoints (fsdp / tp)
SHARDED_DIR = "sharded"  # inside a checkpoint: the torch.distributed.checkpoint state


def _trainer_extra(trainer) -> Dict[str, Any]:
    """Counters and data position a resume needs besides weights and optimizer states.

    The position is always (epoch, batches done, the loader generator at the epoch's start),
    even when the epoch is used up: the sampler still draws from the generator when its
    iterator runs out, after the last batch, so the state at save time is not yet the next
    epoch's; replaying (and skipping) the finished epoch on resume makes that draw."""
    epoch, batch, loader_rng = trainer.epoch, trainer.batch_in_epoch, trainer._epoch_start_rng
    best = trainer.best_score if trainer.best_score != float("-inf") else None
    counters = dict(step=trainer.step, epoch=epoch, batch_in_epoch=batch, best_score=best,
                    scheduler=trainer.scheduler.state_dict(), world_size=dist.get_world_size() if dist.is_initialized() else 1)
    return {"counters": json.dumps(counters), "loader_rng": loader_rng}


def save_trainer_checkpoint(trainer, directory) -> None:
    """A training checkpoint under "fsdp" / "tp" (collective: every rank calls it).

    Rank 0 writes the full model in Hugging Face format (gathered from the shards: it opens
    with `from_pretrained`), tokenizer and config; every rank writes its shards of model and
    optimizer to ``<checkpoint>/sharded`` (torch.distributed.checkpoint), which reloads on any
    number of ranks and strategies. The directory is published atomically by rank 0."""
    parallel, directory = trainer.parallel, Path(directory)
    full = parallel.full_state_dict(trainer.model)
    shards = directory.with_name(f".{directory.name}.sharded-tmp")  # the same path on every rank
    if parallel.is_main:
        shutil.rmtree(shards, ignore_errors=True)
        shards.parent.mkdir(parents=True, exist_ok=True)
    parallel.barrier()
    resumable = parallel.strategy != "deepspeed"  # ZeRO-3 weights: the full model only
    if resumable:
        save_sharded(shards, trainer.model, trainer.optimizer, _trainer_extra(trainer))
    parallel.barrier()
    if parallel.is_main:
        def write(tmp: Path) -> None:
            trainer.model.write_files(tmp, state_dict=full)
            trainer.tokenizer.save_pretrained(str(tmp))
            trainer.config.save_yaml(tmp / "ilql_train_config.yaml")
            if resumable:
                os.replace(shards, tmp / SHARDED_DIR)

        kind = "best" if directory.name == ckpt.BEST_NAME else "train"
        ckpt.write_checkpoint_dir(directory, write, trainer.step, kind)
        if kind == "train" and directory.parent.resolve() == trainer.checkpoint_dir.resolve():
            ckpt.prune_checkpoints(trainer.checkpoint_dir, trainer.config.train.keep_last_checkpoints)
    parallel.barrier()


def load_trainer_checkpoint(trainer, directory) -> None:
    """Resume from a checkpoint with a ``sharded`` state (written by any number of ranks),
    whatever this run's strategy and number of ranks."""
    directory = Path(directory)
    if trainer.parallel.strategy == "deepspeed":
        raise TrainingError(f"cannot resume from {directory} with train.strategy='deepspeed': resume with fsdp")
    problem = ckpt.verify_checkpoint(directory)
    if problem is not None:
        raise TrainingError(f"cannot resume from {directory}: {problem}")
    template = {"counters": "", "loader_rng": trainer.generator.get_state()}
    extra = load_sharded(directory / SHARDED_DIR, trainer.model, trainer.optimizer, template)
    counters = json.loads(extra["counters"])
    trainer.scheduler.load_state_dict(counters["scheduler"])
    trainer.step, trainer.epoch, trainer.batch_in_epoch = counters["step"], counters["epoch"], counters["batch_in_epoch"]
    trainer.best_score = float("-inf") if counters["best_score"] is None else counters["best_score"]
    trainer._epoch_start_rng = extra["loader_rng"]
    trainer.generator.set_state(trainer._epoch_start_rng)
    trainer._truncate_log()


# -------------------------------------------------------------- DeepSpeed (optional extra)
class _EngineOptimizer:
    """The trainer's view of a DeepSpeed engine's optimizer: ``step`` runs ``engine.step()``."""

    def __init__(self, engine, client):
        self.engine, self.client = engine, client

    def step(self) -> None:
        self.engine.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.engine.optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def param_groups(self):
        return self.client.param_groups


def _deepspeed_initialize(model, optimizer, parallel: "Parallel"):
    try:
        import deepspeed
    except ImportError:
        raise ConfigError("train.strategy='deepspeed' needs the optional extra: pip install 'ilql[deepspeed]'") from None

    # head_at_actions reads the target heads' last weights without calling that layer: ZeRO-3
    # must gather them whenever the heads' forward runs
    heads = model.ilql_heads
    for target in heads.target_q_heads:
        for param in target[-1].parameters():
            deepspeed.zero.register_external_parameter(heads, param)
    config = {
        "train_micro_batch_size_per_gpu": 1,  # only consulted for logging: ilql feeds the batches
        "gradient_accumulation_steps": 1,
        # no parameter kept whole on every rank: Polyak averaging updates the partitions
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_force_ds_cpu_optimizer": False,  # the trainer's torch optimizer, also on CPU
        "gradient_clipping": 0.0,  # as the trainer: no clipping unless asked for
        **parallel.deepspeed_config,
    }
    config.setdefault("train_batch_size", config["train_micro_batch_size_per_gpu"] * parallel.world_size)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    # Polyak averaging on partitioned weights: gather them, update on rank 0, re-partition
    model.sync_target_q_heads = lambda: _zero3_sync_target_q_heads(heads)
    return engine, _EngineOptimizer(engine, optimizer)


def _zero3_sync_target_q_heads(heads) -> None:
    import deepspeed

    params = [p for head in (*heads.q_heads, *heads.target_q_heads) for p in head.parameters()]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        if dist.get_rank() == 0:
            heads.sync_target_q_heads()
